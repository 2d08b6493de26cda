"""Security settings reach aiokafka as it expects them; the SASL password comes from its file."""

from __future__ import annotations

import ssl
from pathlib import Path

from allocd.config import KafkaSettings
from allocd.kafka_conn import connection_options


def test_plaintext_passes_no_security_options() -> None:
    opts = connection_options(KafkaSettings(bootstrap_servers="k:9092"))
    assert opts == {"bootstrap_servers": "k:9092", "client_id": "allocd", "security_protocol": "PLAINTEXT"}


def test_sasl_scram_over_tls_reads_the_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    opts = connection_options(
        KafkaSettings(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="allocd",
            sasl_password_file=str(secret),
        )
    )
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("allocd", "s3cret")
    assert isinstance(opts["ssl_context"], ssl.SSLContext)


def test_sasl_plaintext_has_no_tls_context(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p")
    opts = connection_options(
        KafkaSettings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="u",
            sasl_password_file=str(secret),
        )
    )
    assert "ssl_context" not in opts
    assert opts["sasl_plain_password"] == "p"
