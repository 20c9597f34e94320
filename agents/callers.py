"""Who is calling a served model: the source id every API of ``attach --serve`` uses.

One rule for the Predict API and the Open Inference Protocol (gRPC and REST), so a
caller is the same source, with the same rules, tracing and blocks, whichever it uses:

- authenticated listeners (mTLS): the source is the ``caller/<name>`` in the verified
  certificate; a claimed source id that differs, or a certificate of another kind, is
  refused (:class:`CallerRefused`);
- unauthenticated ones: ``unauth:<peer host>/<claimed>`` (or ``unauth:<peer host>``).
  Certificate names cannot contain ``:``, so an unauthenticated caller can never pass
  for an authenticated source, nor for another host, whatever it claims.
"""

from __future__ import annotations

from openexample.identity import Identity, Kind
from openexample.limits import MAX_ID_BYTES

UNAUTH = "unauth:"  # the prefix of every unauthenticated caller's source id


class CallerRefused(Exception):
    """The caller may not call: PERMISSION_DENIED / HTTP 403 with this text."""


class BadSource(ValueError):
    """The claimed source id cannot be used: INVALID_ARGUMENT / HTTP 400."""


def caller_source(
    claimed: str, *, authenticated: bool, identity: Identity | None, peer_host: str
) -> str:
    """The source id of a call (see the module docstring)."""
    if authenticated:
        if identity is None or identity.kind is not Kind.CALLER:
            what = f"identity {identity}" if identity is not None else "no openexample identity"
            raise CallerRefused(
                f"your certificate carries {what}; the model API takes caller/NAME certificates"
            )
        if claimed and claimed != identity.name:
            raise CallerRefused(f"source_id {claimed}: your certificate says {identity}")
        return identity.name
    source = f"{UNAUTH}{peer_host}/{claimed}" if claimed else f"{UNAUTH}{peer_host}"
    if len(source.encode()) > MAX_ID_BYTES:
        raise BadSource(
            f"source_id: too long (as {UNAUTH}{peer_host}/..., at most {MAX_ID_BYTES} bytes)"
        )
    return source


def grpc_peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``1.2.3.4`` (who an unauthenticated gRPC caller is)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer
