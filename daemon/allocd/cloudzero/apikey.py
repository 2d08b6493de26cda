"""The CloudZero API key: read from an environment variable or a file (a Kubernetes secret mount).

The key is a secret. Nothing here formats it: `repr`, `str` and every error name only where it comes from.
A rotated secret is picked up with `reload()`, which re-reads the source (the client asks for the key on
every request, so a reload takes effect on the next one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from allocd.errors import ConfigError

__all__ = ["ApiKey"]

# A key travels as an HTTP header value: visible ASCII only. Rejecting anything else here keeps the HTTP
# library from raising an error of its own that might quote the value.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class ApiKey:
    """The API key and where it comes from. `get()` reads the source on first use; `reload()` re-reads it.

    Build it with `ApiKey.from_env(name)`, `ApiKey.from_file(path)` or, for tests and tools that already
    hold the value, `ApiKey.from_value(value)`.
    """

    __slots__ = ("_environ", "_file", "_fixed", "_source", "_value", "_var")

    def __init__(
        self,
        *,
        env: str | None = None,
        file: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if (env is None) == (file is None):
            raise ValueError("ApiKey needs exactly one source: env= or file=")
        self._var = env
        self._file = Path(file) if file is not None else None
        self._environ = environ
        self._fixed: str | None = None
        self._source = f"env:{env}" if env is not None else f"file:{self._file}"
        self._value: str | None = None

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] | None = None) -> ApiKey:
        return cls(env=name, environ=environ)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ApiKey:
        return cls(file=path)

    @classmethod
    def from_value(cls, value: str, source: str = "value") -> ApiKey:
        """A key already in hand (tests, the emulator's tools). `source` is what repr and errors show."""
        key = cls(env=source)
        key._fixed = value
        key._source = source
        key._value = key._read()
        return key

    @property
    def source(self) -> str:
        """Where the key comes from, e.g. `file:/var/run/secrets/cloudzero/api-key` — safe to log."""
        return self._source

    def get(self) -> str:
        """The key, stripped of surrounding whitespace. Raises ConfigError (naming the source) if missing."""
        if self._value is None:
            self._value = self._read()
        return self._value

    def reload(self) -> bool:
        """Re-read the source; True if the key changed. On error ConfigError is raised and the key kept."""
        fresh = self._read()
        changed = fresh != self._value
        self._value = fresh
        return changed

    def _read(self) -> str:
        if self._file is not None:
            try:
                raw = self._file.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigError(self._source, "the API key file does not exist") from None
            except (OSError, UnicodeDecodeError) as exc:
                # The exception's own text names the path and the OS error, never the content.
                problem = f"cannot read the API key file ({type(exc).__name__})"
                raise ConfigError(self._source, problem) from None
        elif self._fixed is not None:
            raw = self._fixed
        else:
            environ = os.environ if self._environ is None else self._environ
            raw = environ.get(self._var or "", "")
        value = raw.strip()
        if not value:
            raise ConfigError(self._source, "the API key is missing or empty")
        if not _HEADER_SAFE.fullmatch(value):
            raise ConfigError(self._source, "the API key contains whitespace or non-printable characters")
        return value

    def __repr__(self) -> str:
        return f"ApiKey(source={self._source!r}, ****)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the secret into whatever holds the bytes; nothing in allocd needs it.
        raise TypeError("ApiKey cannot be pickled")
