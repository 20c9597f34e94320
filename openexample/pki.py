"""A development certificate authority: ``openexample-pki``.

Makes what TLS and mTLS need on every listener: a CA, and one certificate per
identity (:mod:`openexample.identity`), ECDSA P-256, each key readable by its owner
only. Layout of a PKI folder::

    ca.crt  ca.key                  the CA (keep ca.key off the production hosts)
    controller-controller-1.crt/.key    KIND-NAME.crt / .key, one pair per identity

Certificates that serve (controller, agent: an agent serves Predict; broker: the MQTT
broker between controllers) carry
``localhost``, 127.0.0.1 and ::1 (plus ``--host``) as names. For production use your
own CA: any certificate with the identity URI SAN works.

    openexample-pki init pki/ --agent plc-1 --operator alice
    openexample-pki issue pki/ reader/bob
    openexample-pki show pki/agent-plc-1.crt
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from openexample.identity import Identity, Kind, from_pem
from openexample.tls import TlsFiles

DEFAULT_DAYS = 365
_SERVING = (Kind.CONTROLLER, Kind.AGENT, Kind.BROKER)
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def make_ca(
    common_name: str = "OpenExample development CA",
    *,
    days: int = DEFAULT_DAYS * 5,
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before or _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    identity: Identity,
    *,
    hosts: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``identity`` (URI SAN), signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.kind in _SERVING:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        for host in dict.fromkeys((*_LOCAL_HOSTS, *hosts)):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
    start = not_before or _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _now() -> dt.datetime:
    # A minute in the past: clocks of hosts on one line are rarely exactly in step.
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)


def write_pair(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    crt, pem = folder / f"{stem}.crt", folder / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 (no window in which others could read the key).
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(pem, 0o600)
    return crt, pem


def stem(identity: Identity) -> str:
    return f"{identity.kind.value}-{identity.name}"


class DevPki:
    """A PKI folder: the CA and the certificates issued from it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def files(self, identity: Identity | str) -> TlsFiles:
        """The CA, certificate and key of ``identity`` (``agent/plc-1`` works)."""
        ident = Identity.parse(identity) if isinstance(identity, str) else identity
        s = stem(ident)
        return TlsFiles(self.ca, self.folder / f"{s}.crt", self.folder / f"{s}.key")

    def init(self, *, days: int = DEFAULT_DAYS * 5) -> None:
        """Make the CA if there is none (an existing one is kept)."""
        if self.ca.exists():
            return
        cert, key = make_ca(days=days)
        write_pair(self.folder, "ca", cert, key)

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = serialization.load_pem_private_key((self.folder / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def issue(
        self,
        identity: Identity | str,
        *,
        hosts: Iterable[str] = (),
        days: int = DEFAULT_DAYS,
        not_before: dt.datetime | None = None,
        overwrite: bool = True,
    ) -> TlsFiles:
        ident = Identity.parse(identity) if isinstance(identity, str) else identity
        files = self.files(ident)
        if not overwrite and files.cert.exists() and files.key.exists():
            return files
        cert, key = issue(*self._ca(), ident, hosts=hosts, days=days, not_before=not_before)
        write_pair(self.folder, stem(ident), cert, key)
        return files

    def ensure(self, identities: Iterable[Identity | str], hosts: Iterable[str] = ()) -> DevPki:
        """The CA and a certificate for each identity, made where missing."""
        self.init()
        for ident in identities:
            self.issue(ident, hosts=hosts, overwrite=False)
        return self


# ---- the command ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openexample-pki", description="A development CA and certificates for mTLS."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="make a CA and certificates (existing ones are kept)")
    i.add_argument("folder")
    i.add_argument("--controller-id", action="append", default=[], metavar="ID")
    for kind in ("agent", "operator", "reader", "caller", "broker"):
        i.add_argument(f"--{kind}", action="append", default=[], metavar="NAME")
    i.add_argument("--host", action="append", default=[], help="extra DNS name or IP to serve")
    s = sub.add_parser("issue", help="issue (or renew) one certificate")
    s.add_argument("folder")
    s.add_argument("identity", help="KIND/NAME, e.g. agent/plc-1, operator/alice")
    s.add_argument("--host", action="append", default=[])
    s.add_argument("--days", type=int, default=DEFAULT_DAYS)
    w = sub.add_parser("show", help="print a certificate's identity and validity")
    w.add_argument("cert")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError) as exc:
        print(f"openexample-pki: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "show":
        cert = x509.load_pem_x509_certificate(Path(args.cert).read_bytes())
        ident = from_pem(cert.public_bytes(serialization.Encoding.PEM))
        print(f"identity: {ident or 'none'}")
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        print(f"valid: {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC")
        return 0
    pki = DevPki(args.folder)
    if args.cmd == "issue":
        if not pki.ca.exists():
            raise ValueError(f"{pki.ca}: no CA there (run `openexample-pki init {args.folder}`)")
        files = pki.issue(args.identity, hosts=args.host, days=args.days)
        print(f"{files.cert}\n{files.key}")
        return 0
    idents = [Identity(Kind.CONTROLLER, c) for c in args.controller_id or ["controller-1"]]
    for kind in ("agent", "operator", "reader", "caller", "broker"):
        idents += [Identity(Kind(kind), n) for n in getattr(args, kind)]
    pki.ensure(idents, hosts=args.host)
    ctl = pki.files(idents[0])
    print(f"CA: {pki.ca}")
    for ident in idents:
        print(f"{ident}: {pki.files(ident).cert}")
    print(
        "\ncontroller config:\n"
        f"  tls_ca: {ctl.ca.resolve()}\n  tls_cert: {ctl.cert.resolve()}\n"
        f"  tls_key: {ctl.key.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
