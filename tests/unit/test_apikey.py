"""The API key: sources, reload, and that the value never shows in a repr, a str or an error."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from allocd.cloudzero.apikey import ApiKey
from allocd.errors import ConfigError

SECRET = "cz-SECRET-4f1a9b"


def test_env_source_strips_whitespace() -> None:
    key = ApiKey.from_env("ALLOCD_API_KEY", environ={"ALLOCD_API_KEY": f"  {SECRET}\n"})
    assert key.get() == SECRET
    assert key.source == "env:ALLOCD_API_KEY"


def test_env_source_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOCD_TEST_KEY", SECRET)
    assert ApiKey.from_env("ALLOCD_TEST_KEY").get() == SECRET


def test_file_source_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "api-key"
    path.write_text(SECRET + "\n")
    key = ApiKey.from_file(path)
    assert key.get() == SECRET
    assert key.reload() is False
    path.write_text("cz-ROTATED-77")
    assert key.get() == SECRET  # read once, until reloaded
    assert key.reload() is True
    assert key.get() == "cz-ROTATED-77"


def test_reload_failure_keeps_the_current_key(tmp_path: Path) -> None:
    path = tmp_path / "api-key"
    path.write_text(SECRET)
    key = ApiKey.from_file(path)
    assert key.get() == SECRET
    path.write_text("   \n")
    with pytest.raises(ConfigError):
        key.reload()
    assert key.get() == SECRET


def test_repr_and_str_hide_the_key(tmp_path: Path) -> None:
    path = tmp_path / "api-key"
    path.write_text(SECRET)
    key = ApiKey.from_file(path)
    key.get()
    assert repr(key) == f"ApiKey(source='file:{path}', ****)"
    assert str(key) == repr(key)
    assert f"{key}" == repr(key)
    assert SECRET not in repr(ApiKey.from_value(SECRET))
    assert repr(ApiKey.from_value(SECRET, source="test")) == "ApiKey(source='test', ****)"


def test_missing_file_names_the_source(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(ConfigError) as err:
        ApiKey.from_file(path).get()
    assert str(path) in str(err.value)
    assert err.value.key == f"file:{path}"


@pytest.mark.parametrize("content", ["", "  \n\t"])
def test_empty_key_names_the_source(tmp_path: Path, content: str) -> None:
    path = tmp_path / "api-key"
    path.write_text(content)
    with pytest.raises(ConfigError, match="missing or empty") as err:
        ApiKey.from_file(path).get()
    assert str(path) in str(err.value)


def test_missing_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="env:ALLOCD_API_KEY"):
        ApiKey.from_env("ALLOCD_API_KEY", environ={}).get()


@pytest.mark.parametrize("bad", [f"{SECRET}\n{SECRET}", f"{SECRET} x", f"{SECRET}\x00"])
def test_unsafe_key_is_refused_without_showing_it(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "api-key"
    path.write_text(bad)
    with pytest.raises(ConfigError) as err:
        ApiKey.from_file(path).get()
    assert SECRET not in str(err.value)
    assert SECRET not in repr(err.value)


def test_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        ApiKey()
    with pytest.raises(ValueError):
        ApiKey(env="A", file="/b")


def test_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(ApiKey.from_value(SECRET))
