"""Who a peer is: the identity its client certificate proves, never a field it fills.

An identity is a URI SAN of the form ``spiffe://openexample/<kind>/<name>`` (a SPIFFE
ID in the ``openexample`` trust domain). The kind says what the holder may do:

=============  ==============================================================
``agent``      speak on the agent channel as agent ``<name>`` (and only as it)
``controller`` a controller: ROLE among controllers; serves TLS to agents
``operator``   the admin API, read and change rules
``reader``     the admin API, read only
``caller``     call an agent's Predict API as source ``<name>``
``broker``     the MQTT broker of the east-west bus between controllers (serves TLS)
=============  ==============================================================

A certificate with no such URI, or with more than one, proves nothing.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from openexample.limits import MAX_ID_BYTES

TRUST_DOMAIN = "openexample"
_PREFIX = f"spiffe://{TRUST_DOMAIN}/"


class Kind(enum.StrEnum):
    AGENT = "agent"
    CONTROLLER = "controller"
    OPERATOR = "operator"
    READER = "reader"
    CALLER = "caller"
    BROKER = "broker"


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Kind
    name: str

    @property
    def uri(self) -> str:
        return f"{_PREFIX}{self.kind.value}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind.value}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> Identity:
        """``agent/plc-1`` or ``spiffe://openexample/agent/plc-1``; ValueError if not."""
        rest = text.removeprefix(_PREFIX)
        if rest.startswith("spiffe://"):
            raise ValueError(f"{text!r}: not in the {TRUST_DOMAIN!r} trust domain")
        kind, sep, name = rest.partition("/")
        try:
            k = Kind(kind)
        except ValueError:
            kinds = ", ".join(k.value for k in Kind)
            raise ValueError(f"{text!r}: kind must be one of {kinds}") from None
        if not sep or not valid_name(name):
            raise ValueError(
                f"{text!r}: name must be 1..{MAX_ID_BYTES} bytes of letters, digits, . _ -"
            )
        return cls(k, name)


def valid_name(name: str) -> bool:
    return (
        0 < len(name.encode()) <= MAX_ID_BYTES
        and name.isascii()
        and all(c.isalnum() or c in "._-" for c in name)
    )


@functools.lru_cache(maxsize=1024)
def from_der(der: bytes) -> Identity | None:
    """The identity in a DER certificate's URI SANs (None: none, or ambiguous).

    The certificate must already be verified (the TLS handshake did that); this only
    reads it. Cached: a Predict caller presents the same certificate on every call.
    """
    from cryptography import x509  # imported when TLS is in use only

    cert = x509.load_der_x509_certificate(der)
    return _from_cert(cert)


@functools.lru_cache(maxsize=1024)
def from_pem(pem: bytes) -> Identity | None:
    """As :func:`from_der`, for a PEM certificate (what grpc's auth context holds)."""
    from cryptography import x509

    return _from_cert(x509.load_pem_x509_certificate(pem))


def _from_cert(cert: object) -> Identity | None:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        return None
    found = []
    for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(_PREFIX):
            try:
                found.append(Identity.parse(uri))
            except ValueError:
                return None  # a malformed identity in our domain: trust none of it
    return found[0] if len(found) == 1 else None
