"""One agent's session, sans-I/O: bytes and ``now`` in, envelopes and events out.

States: HELLO (wait for the agent's HELLO) -> FEATURES (FEATURES_REQUEST sent) ->
MAIN -> DEAD. A bad message gets a typed ERROR and the session goes on; only a
failed HELLO, unusable FEATURES, a handshake that never finishes or too many
unanswered ECHOs end it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from google.protobuf.message import Message

from openexample import messages
from openexample.errors import ProtocolError, bad_request
from openexample.limits import DEFAULT_LIMITS, Limits
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn, validate_features, validate_pkg_in


class State(enum.Enum):
    HELLO = "hello"
    FEATURES = "features"
    MAIN = "main"
    DEAD = "dead"


# --- events for the controller core ---


@dataclass(slots=True)
class Ready:
    """FEATURES validated: the session is in MAIN."""

    agent_id: str
    models: dict[str, pb.ModelDescriptor]


@dataclass(slots=True)
class PkgInReceived:
    xid: int
    pkg: DecodedPkgIn


@dataclass(slots=True)
class ReplyReceived:
    """A reply (BARRIER, STATS, ROLE) or an ERROR to a request we sent."""

    xid: int
    env: pb.Envelope


@dataclass(slots=True)
class RuleRemoved:
    notice: pb.VigilanceRemoved


@dataclass(slots=True)
class Closed:
    reason: str


Event = Ready | PkgInReceived | ReplyReceived | RuleRemoved | Closed


@dataclass(slots=True)
class Output:
    send: list[pb.Envelope] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # A typed error this session sent (for metrics), by name.
    errors: list[str] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Closed) for e in self.events)


# Bodies an agent may send in MAIN, besides the ones handled explicitly.
_REPLIES = frozenset({"barrier_reply", "stats_reply", "role_reply"})


class AgentSession:
    def __init__(
        self,
        controller_id: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
        echo_interval_s: float = 1.0,
        echo_unreplied_limit: int = 3,
        handshake_timeout_s: float = 10.0,
        now: float,
    ) -> None:
        self.controller_id = controller_id
        self.limits = limits
        self.echo_interval_s = echo_interval_s
        self.echo_unreplied_limit = echo_unreplied_limit
        self.state = State.HELLO
        self.version = messages.PROTOCOL_VERSION
        self.agent_id = ""
        self.models: dict[str, pb.ModelDescriptor] = {}
        self.opened_at = now
        self._handshake_deadline = now + handshake_timeout_s
        self._next_echo = now + echo_interval_s
        self._unreplied = 0
        self._xid = messages.XidAllocator()
        self._features_xid = 0
        self.pkg_in_count = 0

    # -- outbound --

    def start(self) -> list[pb.Envelope]:
        """Our HELLO, sent as soon as the stream is up."""
        return [messages.hello(self.controller_id, limits=self.limits)]

    def request(self, body: Message) -> pb.Envelope:
        """An envelope for a controller-initiated message, with a fresh xid."""
        return messages.envelope(body, xid=self._xid(), version=self.version)

    def reply_to(self, xid: int, body: Message) -> pb.Envelope:
        return messages.envelope(body, xid=xid, version=self.version)

    # -- inbound --

    def receive(self, data: bytes, now: float) -> Output:
        out = Output()
        if self.state is State.DEAD:
            return out
        try:
            env = messages.decode_envelope(data, self.limits)
        except ProtocolError as err:
            self._error(out, err, data)
            return out
        self._unreplied = 0  # any traffic proves the peer alive
        try:
            if self.state is State.HELLO:
                self._on_hello(env, out)
            else:
                if env.version != self.version:
                    raise bad_request(
                        pb.BAD_REQUEST_CODE_BAD_VERSION,
                        f"version {env.version}, negotiated {self.version}",
                    )
                if self.state is State.FEATURES:
                    self._on_features(env, out, now)
                else:
                    self._on_main(env, out)
        except ProtocolError as err:
            self._error(out, err.with_xid(err.xid or env.xid), data)
            # No common version, or FEATURES we cannot serve: nothing to go on with.
            if err.error_type == pb.ERROR_TYPE_HELLO_FAILED or (
                self.state is State.FEATURES and env.HasField("features_reply")
            ):
                self._die(out, f"{err.name}: {err.text}")
        return out

    def _on_hello(self, env: pb.Envelope, out: Output) -> None:
        self.version = messages.negotiate_version(env)
        self.limits = self.limits.merge(env.hello.limits)
        self.state = State.FEATURES
        req = self.request(pb.FeaturesRequest())
        self._features_xid = req.xid
        out.send.append(req)

    def _on_features(self, env: pb.Envelope, out: Output, now: float) -> None:
        kind = env.WhichOneof("body")
        if kind == "echo_request":
            out.send.append(messages.reply(env, pb.EchoReply(data=env.echo_request.data)))
            return
        if kind == "echo_reply":
            return
        if kind != "features_reply" or env.xid != self._features_xid:
            raise bad_request(pb.BAD_REQUEST_CODE_UNEXPECTED, f"{kind} before FEATURES_REPLY")
        self.models = validate_features(env.features_reply, self.limits)
        self.agent_id = env.features_reply.agent_id
        self.state = State.MAIN
        out.events.append(Ready(self.agent_id, self.models))

    def _on_main(self, env: pb.Envelope, out: Output) -> None:
        kind = env.WhichOneof("body")
        if kind == "pkg_in":
            decoded = validate_pkg_in(env.pkg_in, self.models, self.limits)
            self.pkg_in_count += 1
            out.events.append(PkgInReceived(env.xid, decoded))
        elif kind == "echo_request":
            out.send.append(messages.reply(env, pb.EchoReply(data=env.echo_request.data)))
        elif kind == "echo_reply":
            pass
        elif kind in _REPLIES:
            out.events.append(ReplyReceived(env.xid, env))
        elif kind == "error":
            # An agent's ERROR answers one of our requests (e.g. a refused VIGILANCE_MOD).
            out.events.append(ReplyReceived(env.error.offending_xid or env.xid, env))
        elif kind == "vigilance_removed":
            out.events.append(RuleRemoved(env.vigilance_removed))
        elif kind == "barrier_request":
            out.send.append(messages.reply(env, pb.BarrierReply()))
        else:
            raise bad_request(pb.BAD_REQUEST_CODE_BAD_TYPE, f"controller does not accept {kind}")

    # -- time --

    def tick(self, now: float) -> Output:
        out = Output()
        if self.state is State.DEAD:
            return out
        if self.state is not State.MAIN and now >= self._handshake_deadline:
            self._die(out, f"handshake not finished (state {self.state.value})")
            return out
        if now >= self._next_echo:
            if self._unreplied >= self.echo_unreplied_limit:
                self._die(out, f"{self._unreplied} echo requests unanswered")
                return out
            self._unreplied += 1
            self._next_echo = now + self.echo_interval_s
            if self.state is not State.HELLO:
                out.send.append(self.request(pb.EchoRequest(data=b"")))
        return out

    def next_deadline(self) -> float:
        if self.state is State.MAIN:
            return self._next_echo
        return min(self._next_echo, self._handshake_deadline)

    def close(self, reason: str) -> Output:
        out = Output()
        if self.state is not State.DEAD:
            self._die(out, reason)
        return out

    # -- helpers --

    def _error(self, out: Output, err: ProtocolError, data: bytes) -> None:
        out.send.append(messages.error_envelope(err, data, self.version))
        out.errors.append(err.name)

    def _die(self, out: Output, reason: str) -> None:
        self.state = State.DEAD
        out.events.append(Closed(reason))
