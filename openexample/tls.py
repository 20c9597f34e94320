"""TLS for every listener and every client: contexts, gRPC credentials, peer identity.

Both ends of every connection authenticate (mTLS) with certificates from one CA; the
peer's :class:`~openexample.identity.Identity` is read from its verified certificate.
Plain text is allowed only when asked for, and only on loopback or Unix sockets
(:func:`check_plaintext`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openexample.addresses import UNIX, Address
from openexample.errors import ConfigError
from openexample.identity import Identity, from_der, from_pem


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signs peers, our certificate, our key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_settings(
        cls, ca: str, cert: str, key: str, *, prefix: str = "tls_", base: Path | None = None
    ) -> TlsFiles:
        """From three settings (relative paths from ``base``); ConfigError naming the
        first that is missing, unreadable or expired."""
        paths = []
        for name, value in (("ca", ca), ("cert", cert), ("key", key)):
            if not value:
                raise ConfigError(
                    f"{prefix}{name}: required (TLS is on by default; make a development CA"
                    " with `openexample-pki init DIR`, or ask for plaintext on loopback)"
                )
            p = Path(value).expanduser()
            if base is not None and not p.is_absolute():
                p = base / p
            try:
                p.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{prefix}{name}: cannot read {p} ({exc.strerror})") from None
            paths.append(p)
        files = cls(*paths)
        files.check_validity(prefix)
        return files

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def check_validity(self, prefix: str = "tls_") -> None:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
            x509.load_pem_x509_certificates(self.ca.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"{prefix}cert: not a PEM certificate ({exc})") from None
        now = dt.datetime.now(dt.UTC)
        if now > cert.not_valid_after_utc:
            raise ConfigError(
                f"{prefix}cert: {self.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        if now < cert.not_valid_before_utc:
            raise ConfigError(
                f"{prefix}cert: {self.cert} is not valid before"
                f" {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )

    def identity(self) -> Identity | None:
        """Our own identity (the URI SAN of our certificate)."""
        return from_pem(self.cert.read_bytes())


def _context(purpose: int, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
        ctx.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls: cannot load {files.cert} / {files.key}: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context that requires and verifies a client certificate (mTLS)."""
    return _context(ssl.PROTOCOL_TLS_SERVER, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client context: verifies the server's name and certificate, presents ours."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = True
    return ctx


def grpc_peer_identity(context: Any) -> Identity | None:
    """The identity in a gRPC peer's verified client certificate (None: no TLS, no
    certificate, or no identity in it)."""
    pems = context.auth_context().get("x509_pem_cert")
    return from_pem(pems[0]) if pems else None


def ssl_peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Identity | None:
    """The identity in a TLS peer's verified certificate (asyncio: the transport's
    ``ssl_object`` extra info)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return from_der(der) if der else None


def is_loopback(address: Address) -> bool:
    """A Unix socket, or a TCP host that is loopback (``localhost``, 127/8, ::1)."""
    if address.scheme == UNIX:
        return True
    host = address.host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(address: Address, what: str) -> None:
    """Plain text was asked for: only on loopback (ConfigError otherwise)."""
    if not is_loopback(address):
        raise ConfigError(
            f"{what}: plaintext only on loopback or a Unix socket, got {address}; use TLS"
        )
