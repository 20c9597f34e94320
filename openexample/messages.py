"""Envelopes: framing, builders, xids and version negotiation.

``decode_envelope`` is the one entry point for bytes from a peer: whatever the
bytes, it returns an Envelope with a body or raises :class:`ProtocolError`.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message

from openexample.errors import ProtocolError, bad_request
from openexample.limits import DEFAULT_LIMITS, Limits
from openexample.v1 import openexample_pb2 as pb

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
XID_MAX = 0xFFFFFFFF

# Body message class -> name of its field in Envelope.body.
_BODY_FIELD: dict[type[Message], str] = {}
for _f in pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields:
    _BODY_FIELD[getattr(pb, _f.message_type.name)] = _f.name


class XidAllocator:
    """Transaction ids 1..2^32-1, wrapping; 0 stays reserved for "no reply"."""

    __slots__ = ("_next",)

    def __init__(self, start: int = 1) -> None:
        self._next = start if 0 < start <= XID_MAX else 1

    def __call__(self) -> int:
        xid = self._next
        self._next = xid + 1 if xid < XID_MAX else 1
        return xid


def envelope(body: Message, xid: int = 0, version: int = PROTOCOL_VERSION) -> pb.Envelope:
    """Wrap a body message (pb.Hello, pb.PkgIn, ...) in an Envelope."""
    field = _BODY_FIELD.get(type(body))
    if field is None:
        raise TypeError(f"{type(body).__name__} is not an OpenExample message body")
    env = pb.Envelope(version=version, xid=xid)
    getattr(env, field).CopyFrom(body)
    return env


def body_kind(env: pb.Envelope) -> str | None:
    """Name of the body field that is set ("pkg_in", "hello", ...), or None."""
    return env.WhichOneof("body")


def reply(request: pb.Envelope, body: Message) -> pb.Envelope:
    """A reply to ``request``: same xid and version."""
    return envelope(body, xid=request.xid, version=request.version)


def encode_envelope(env: pb.Envelope) -> bytes:
    return env.SerializeToString()


def peek_xid(data: bytes) -> int:
    """``Envelope.xid`` read from the wire format without parsing the message (for an
    oversize one): the top-level fields are walked (at most ``_PEEK_MAX_FIELDS``),
    length-delimited ones skipped by their length, groups skipped whole; as in the
    parser, the last xid wins. 0 when it is absent; when the bytes stop being an
    Envelope, the xid read so far."""
    i, n = 0, len(data)
    xid = depth = 0  # depth: inside groups (their fields are not the envelope's)

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while i < n and shift < 64:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
        raise ValueError("truncated varint")

    try:
        for _ in range(_PEEK_MAX_FIELDS):
            if i >= n:
                break
            tag = varint()
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                value = varint()
                if field == _XID_FIELD and depth == 0:
                    xid = value & 0xFFFFFFFF
            elif wire == 2:
                size = varint()  # (not ``i += varint()``: that adds to i as it was before)
                i += size
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 3:
                depth += 1
            elif wire == 4 and depth > 0:
                depth -= 1
            else:
                break
    except ValueError:
        pass
    return xid


_XID_FIELD = pb.Envelope.DESCRIPTOR.fields_by_name["xid"].number
# An Envelope has a handful of top-level fields; the bound keeps a hostile message of
# many tiny fields from costing more than a few milliseconds.
_PEEK_MAX_FIELDS = 4096


def decode_envelope(data: bytes, limits: Limits = DEFAULT_LIMITS) -> pb.Envelope:
    """Parse bytes from a peer. Raises BAD_REQUEST (BAD_LEN, MALFORMED, BAD_TYPE)."""
    if len(data) > limits.max_message_bytes:
        raise bad_request(
            pb.BAD_REQUEST_CODE_BAD_LEN,
            f"message of {len(data)} bytes > limit {limits.max_message_bytes}",
        ).with_xid(peek_xid(data))
    env = pb.Envelope()
    try:
        env.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:  # upb raises DecodeError
        raise bad_request(pb.BAD_REQUEST_CODE_MALFORMED, f"undecodable envelope: {exc}") from None
    if env.WhichOneof("body") is None:
        raise bad_request(pb.BAD_REQUEST_CODE_BAD_TYPE, "envelope has no body").with_xid(env.xid)
    return env


# --- version negotiation (OpenFlow 1.3 §6.3.1 with the versionbitmap element) ---


def versions_bitmap(versions: frozenset[int] | set[int] = SUPPORTED_VERSIONS) -> int:
    bitmap = 0
    for v in versions:
        if not 0 < v < 64:
            raise ValueError(f"version {v} does not fit the bitmap")
        bitmap |= 1 << v
    return bitmap


def hello(
    sender_id: str,
    *,
    versions: frozenset[int] | set[int] = SUPPORTED_VERSIONS,
    limits: Limits = DEFAULT_LIMITS,
    xid: int = 0,
) -> pb.Envelope:
    body = pb.Hello(
        versions_bitmap=versions_bitmap(versions), sender_id=sender_id, limits=limits.to_pb()
    )
    return envelope(body, xid=xid, version=max(versions))


def negotiate_version(
    peer: pb.Envelope, supported: frozenset[int] | set[int] = SUPPORTED_VERSIONS
) -> int:
    """The version to speak after the peer's HELLO: the highest one both support.

    Raises HELLO_FAILED/INCOMPATIBLE when there is none (the caller sends the ERROR
    and closes), BAD_REQUEST/UNEXPECTED when ``peer`` is not a HELLO.
    """
    if peer.WhichOneof("body") != "hello":
        raise bad_request(pb.BAD_REQUEST_CODE_UNEXPECTED, "first message must be HELLO").with_xid(
            peer.xid
        )
    mine = versions_bitmap(supported)
    theirs = peer.hello.versions_bitmap
    if theirs == 0:  # no bitmap: the peer speaks only Envelope.version
        theirs = 1 << peer.version if 0 < peer.version < 64 else 0
    common = mine & theirs
    if common == 0:
        raise ProtocolError(
            pb.ERROR_TYPE_HELLO_FAILED,
            pb.HELLO_FAILED_CODE_INCOMPATIBLE,
            f"no common version: we support {sorted(supported)}, peer bitmap {theirs:#x}",
            peer.xid,
        )
    return common.bit_length() - 1


def error_envelope(
    err: ProtocolError, offending: bytes = b"", version: int = PROTOCOL_VERSION
) -> pb.Envelope:
    """The ERROR message for ``err`` (Envelope.xid = the offending xid)."""
    return envelope(err.to_error(offending), xid=err.xid, version=version)
