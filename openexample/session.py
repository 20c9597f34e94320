"""One OpenExample session, sans-I/O: bytes and ``now`` in, envelopes and events out.

Both planes drive this same object, as h11's ``Connection`` serves client and server:
the controller per agent stream, the agent per controller stream (and later the native
channel and controller-to-controller links). It knows the rules every peer follows and
nothing about which role it plays:

    HELLO ──HELLO in, version agreed──► FEATURES ──FEATURES_REPLY sent or accepted──► CONFIG
    CONFIG ──first BARRIER completed (either way)──► MAIN          any ──close──► CLOSED

- HELLO: the first message must be a HELLO with a common version (else HELLO_FAILED and
  the session closes); limits become the smaller of both sides'.
- Every later envelope must carry the negotiated version (BAD_VERSION).
- ECHO_REQUEST is answered here; BARRIER_REQUEST too (mods apply synchronously).
- Liveness: in MAIN an ECHO_REQUEST goes out every ``echo_interval_s``; any message from
  the peer counts as an answer; ``echo_unreplied_limit`` unanswered ones close the
  session. Before MAIN the handshake deadline applies instead, so a peer that never
  finishes the handshake is closed by it, not by liveness.
- Xids: requests get fresh ones (never 0, which means "no reply expected").
- A bad message gets a typed ERROR back and the session goes on; the role's own rules
  (FEATURES and PKG_IN validation on the controller, decisions on the agent) read the
  :class:`Received` events and refuse with :meth:`Session.refuse`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

from openexample import messages
from openexample.errors import ProtocolError, bad_request
from openexample.limits import DEFAULT_LIMITS, Limits
from openexample.v1 import openexample_pb2 as pb


class State(enum.Enum):
    HELLO = "hello"  # our HELLO sent, waiting for the peer's
    FEATURES = "features"  # version agreed, FEATURES exchange under way
    CONFIG = "config"  # FEATURES done; the controller is (re)configuring the agent
    MAIN = "main"  # first BARRIER done: configured and live
    CLOSED = "closed"


# Before FEATURES is done only these may flow (besides HELLO, handled first).
_HANDSHAKE_KINDS = frozenset(
    {"features_request", "features_reply", "echo_request", "echo_reply", "error"}
)


# --- events ---


@dataclass(slots=True)
class PeerHello:
    """The peer's HELLO arrived and a version was agreed."""

    peer_id: str
    version: int


@dataclass(slots=True)
class Received:
    """A message for the role to handle (everything the session does not answer)."""

    env: pb.Envelope


@dataclass(slots=True)
class Established:
    """The first BARRIER completed: the session is in MAIN."""


@dataclass(slots=True)
class Closed:
    reason: str


Event = PeerHello | Received | Established | Closed


@dataclass(slots=True)
class Output:
    send: list[pb.Envelope] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # typed errors we sent, by name

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Closed) for e in self.events)


class Sink(Protocol):
    """Where :meth:`Session.refuse` puts an ERROR: any output with these two lists
    (:class:`Output`, the agent's ``AgentOutput``)."""

    send: list[pb.Envelope]
    errors: list[str]


class Session:
    """See the module docstring. ``our_id`` goes into our HELLO."""

    def __init__(
        self,
        our_id: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
        echo_interval_s: float = 1.0,
        echo_unreplied_limit: int = 3,
        handshake_timeout_s: float = 10.0,
        xid_start: int = 1,
        now: float,
    ) -> None:
        self.our_id = our_id
        self.our_limits = limits
        self.limits = limits  # in force: after HELLO, the smaller of both sides'
        self.echo_interval_s = echo_interval_s
        self.echo_unreplied_limit = echo_unreplied_limit
        self.state = State.HELLO
        self.version = messages.PROTOCOL_VERSION
        self.peer_id = ""
        self.opened_at = now
        self.closed_reason = ""
        self.echo_rtt_s: float | None = None
        self.received = 0  # messages from the peer, decodable or not
        self._handshake_deadline = now + handshake_timeout_s
        self._next_echo = now + echo_interval_s
        self._unreplied = 0
        self._xid = messages.XidAllocator(xid_start)
        self._features_xid = 0  # our FEATURES_REQUEST
        self._barrier_xid = 0  # our first BARRIER_REQUEST in CONFIG

    # -- outbound --

    def start(self) -> list[pb.Envelope]:
        """Our HELLO, to send as soon as the stream is up."""
        return [messages.hello(self.our_id, limits=self.our_limits, xid=self._xid())]

    def request(self, body: Message) -> pb.Envelope:
        """An envelope for a message we initiate, with a fresh xid."""
        env = messages.envelope(body, xid=self._xid(), version=self.version)
        if isinstance(body, pb.FeaturesRequest):
            self._features_xid = env.xid
        elif isinstance(body, pb.BarrierRequest) and self.state is State.CONFIG:
            self._barrier_xid = self._barrier_xid or env.xid
        return env

    def request_xid(self) -> int:
        """A fresh xid for a request built elsewhere (e.g. a PKG_IN batch built later)."""
        return self._xid()

    def reply(self, request: pb.Envelope, body: Message) -> pb.Envelope:
        """Our answer to ``request`` (same xid). Sending FEATURES_REPLY ends FEATURES."""
        if isinstance(body, pb.FeaturesReply) and self.state is State.FEATURES:
            self.state = State.CONFIG
        return messages.envelope(body, xid=request.xid, version=self.version)

    def reply_to(self, xid: int, body: Message) -> pb.Envelope:
        """An answer to the message with ``xid`` (replies built later, e.g. PKG_OUT)."""
        return messages.envelope(body, xid=xid, version=self.version)

    def notice(self, body: Message) -> pb.Envelope:
        """An unsolicited message nobody answers (xid 0), e.g. VIGILANCE_REMOVED."""
        return messages.envelope(body, xid=0, version=self.version)

    def refuse(self, out: Sink, err: ProtocolError, offending: bytes | pb.Envelope) -> None:
        """Answer a message with a typed ERROR (the role's refusals come here too)."""
        data = offending if isinstance(offending, bytes) else offending.SerializeToString()
        out.send.append(messages.error_envelope(err, data, self.version))
        out.errors.append(err.name)

    # -- inbound --

    def receive(self, data: bytes, now: float) -> Output:
        out = Output()
        if self.state is State.CLOSED:
            return out
        self.received += 1
        self._unreplied = 0  # any traffic proves the peer alive
        try:
            env = messages.decode_envelope(data, self.limits)
        except ProtocolError as err:
            self.refuse(out, err, data)
            return out
        try:
            self._dispatch(env, out, now)
        except ProtocolError as err:
            self.refuse(out, err.with_xid(err.xid or env.xid), data)
            if err.error_type == pb.ERROR_TYPE_HELLO_FAILED:
                self._close(out, f"{err.name}: {err.text}")
        return out

    def _dispatch(self, env: pb.Envelope, out: Output, now: float) -> None:
        kind = env.WhichOneof("body")
        if self.state is State.HELLO:
            self.version = messages.negotiate_version(env)
            self.limits = self.our_limits.merge(env.hello.limits)
            self.peer_id = env.hello.sender_id
            self.state = State.FEATURES
            out.events.append(PeerHello(self.peer_id, self.version))
            return
        if env.version != self.version:
            raise bad_request(
                pb.BAD_REQUEST_CODE_BAD_VERSION, f"version {env.version}, negotiated {self.version}"
            )
        if kind == "echo_request":
            out.send.append(self.reply(env, pb.EchoReply(data=env.echo_request.data)))
        elif kind == "echo_reply":
            data = env.echo_reply.data
            if len(data) == 8:  # ours carry the time they were sent
                self.echo_rtt_s = now - struct.unpack("<d", data)[0]
        elif kind == "hello":
            raise bad_request(pb.BAD_REQUEST_CODE_UNEXPECTED, "HELLO after the handshake")
        elif self.state is State.FEATURES and kind not in _HANDSHAKE_KINDS:
            raise bad_request(pb.BAD_REQUEST_CODE_UNEXPECTED, f"{kind} before FEATURES_REPLY")
        elif kind == "features_reply":
            if not self._features_xid or env.xid != self._features_xid:
                raise bad_request(pb.BAD_REQUEST_CODE_UNEXPECTED, "FEATURES_REPLY not asked for")
            self._features_xid = 0
            if self.state is State.FEATURES:
                self.state = State.CONFIG  # the role validates it and closes if unusable
            out.events.append(Received(env))
        elif kind == "barrier_request":
            out.send.append(self.reply(env, pb.BarrierReply()))
            self._establish(out, now)
        elif kind == "barrier_reply" and self._barrier_xid and env.xid == self._barrier_xid:
            self._establish(out, now)
            out.events.append(Received(env))
        else:
            out.events.append(Received(env))

    def _establish(self, out: Output, now: float) -> None:
        if self.state is State.CONFIG:
            self.state = State.MAIN
            self._next_echo = now + self.echo_interval_s  # liveness counts from here
            out.events.append(Established())

    # -- time --

    def tick(self, now: float) -> Output:
        out = Output()
        if self.state is State.CLOSED:
            return out
        if self.state is not State.MAIN:
            if now >= self._handshake_deadline:
                self._close(out, f"handshake not finished (state {self.state.value})")
            return out
        if now >= self._next_echo:
            if self._unreplied >= self.echo_unreplied_limit:
                self._close(out, f"{self._unreplied} echo requests unanswered")
                return out
            self._unreplied += 1
            self._next_echo = now + self.echo_interval_s
            out.send.append(self.request(pb.EchoRequest(data=struct.pack("<d", now))))
        return out

    def next_deadline(self) -> float | None:
        if self.state is State.CLOSED:
            return None
        if self.state is State.MAIN:
            return self._next_echo
        return self._handshake_deadline

    def close(self, reason: str) -> Output:
        out = Output()
        self._close(out, reason)
        return out

    def _close(self, out: Output, reason: str) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.closed_reason = reason
            out.events.append(Closed(reason))

    # -- introspection --

    @property
    def configured(self) -> bool:
        """FEATURES done and not closed: the peer takes PKG_IN, mods and RT pushes."""
        return self.state is State.CONFIG or self.state is State.MAIN
