"""Channel addresses, parsed in one place for both planes (pure: no sockets).

    grpc://HOST:PORT   the gRPC channel (also the admin API, health and reflection)
    HOST:PORT          the same, as before schemes existed
    tcp://HOST:PORT    the native channel: length-prefixed Envelope frames over TCP
    unix:///PATH       the native channel over a Unix domain socket

An IPv6 host goes in brackets (``[::1]:6653``). Port 0 means "any free port" where an
address is listened on. A bad address is a :class:`~openexample.errors.ConfigError`
naming the key and the text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from openexample.errors import ConfigError

GRPC, TCP, UNIX = "grpc", "tcp", "unix"
SCHEMES = (GRPC, TCP, UNIX)
NATIVE_SCHEMES = (TCP, UNIX)
# sockaddr_un.sun_path is 108 bytes on Linux, NUL included.
MAX_UNIX_PATH_BYTES = 107
_FORMS = "or grpc://HOST:PORT, tcp://HOST:PORT, unix:///PATH"
_BAD_HOST_CHARS = frozenset(" \t\r\n/\\@?#[]")


@dataclass(frozen=True, slots=True)
class Address:
    scheme: str  # "grpc", "tcp" or "unix"
    host: str = ""  # without brackets; "" for unix
    port: int = 0
    path: str = ""  # unix only

    @property
    def native(self) -> bool:
        """Whether this is the framed channel (tcp or unix), not gRPC."""
        return self.scheme != GRPC

    @property
    def host_port(self) -> str:
        """``host:port`` with an IPv6 host in brackets (what gRPC takes as a target)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def with_port(self, port: int) -> Address:
        return Address(self.scheme, self.host, port, self.path)

    def __str__(self) -> str:
        if self.scheme == UNIX:
            return f"unix://{self.path}"
        return f"{self.scheme}://{self.host_port}"


def _bad(key: str, text: object, why: str) -> ConfigError:
    return ConfigError(f"{key}: HOST:PORT, got {text!r} ({why}; {_FORMS})")


def parse_address(text: object, key: str = "address") -> Address:
    """One address (see the module docstring); ConfigError naming ``key`` otherwise."""
    if not isinstance(text, str):
        raise _bad(key, text, "not a string")
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = GRPC, raw
    elif scheme.lower() not in SCHEMES:
        raise _bad(key, text, f"unknown scheme {scheme!r}")
    scheme = scheme.lower()
    if scheme == UNIX:
        path = rest
        if not path:
            raise _bad(key, text, "no socket path")
        if "\0" in path:
            raise _bad(key, text, "NUL in the socket path")
        if len(path.encode()) > MAX_UNIX_PATH_BYTES:
            raise _bad(key, text, f"socket path longer than {MAX_UNIX_PATH_BYTES} bytes")
        return Address(UNIX, path=path)
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise _bad(key, text, "no port" if not colon else "no host")
    if not (port.isascii() and port.isdigit() and int(port) < 65536):
        raise _bad(key, text, "port must be 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or not all(c in "0123456789abcdefABCDEF:." for c in host):
            raise _bad(key, text, "bad IPv6 host")
    elif ":" in host:
        raise _bad(key, text, "an IPv6 host goes in brackets, [::1]:PORT")
    elif _BAD_HOST_CHARS & set(host):
        raise _bad(key, text, "bad host")
    return Address(scheme, host, int(port))


def parse_addresses(value: object, key: str = "listen") -> tuple[Address, ...]:
    """A string (one address, or several separated by commas) or a list of them.

    Errors name the entry: ``listen[1]: HOST:PORT, got 'tcp://x' (no port; ...)``.
    """
    if isinstance(value, str):
        entries = [e for e in (p.strip() for p in value.split(",")) if e]
        single = len(entries) == 1
    elif isinstance(value, Iterable) and not isinstance(value, bytes | dict):
        entries = list(value)
        single = False
    else:
        raise ConfigError(f"{key}: an address or a list of addresses, got {value!r}")
    if not entries:
        raise ConfigError(f"{key}: at least one address, got {value!r}")
    out = tuple(parse_address(e, key if single else f"{key}[{i}]") for i, e in enumerate(entries))
    seen: set[Address] = set()
    for i, a in enumerate(out):
        if a in seen and (a.scheme == UNIX or a.port != 0):
            raise ConfigError(f"{key}[{i}]: {a} is listed twice")
        seen.add(a)
    return out
