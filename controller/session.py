"""The controller's side of one agent session: :class:`openexample.session.Session` plus
the controller's rules, sans-I/O.

The shared session does the handshake, version checks, echo liveness and barriers. On
top of it the controller asks for FEATURES as soon as the version is agreed, validates
the agent's FEATURES_REPLY (unusable FEATURES end the session), validates every PKG_IN
against the declared models and limits, and refuses what an agent may not send. What is
left comes out as the events below, for :class:`controller.core.ControllerCore`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from openexample.errors import ProtocolError, bad_request, hello_failed
from openexample.identity import Identity, Kind
from openexample.privacy import NO_NOISE, PrivacyNoise
from openexample.session import Closed, Output, PeerHello, Received, Session, State
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn, validate_features, validate_pkg_in

__all__ = [
    "AgentSession",
    "Closed",
    "Expected",
    "HandshakeRefused",
    "Output",
    "PkgInReceived",
    "Ready",
    "ReplyReceived",
    "RuleRemoved",
    "State",
]


@dataclass(slots=True)
class Ready:
    """FEATURES validated: the agent's models are known, resync goes out now."""

    agent_id: str
    models: dict[str, pb.ModelDescriptor]


@dataclass(slots=True)
class HandshakeRefused:
    """FEATURES_REPLY refused (HELLO_FAILED sent; the session closes next): the agent
    speaks for another identity, or declares a model its detectors do not fit."""

    claimed_agent_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Expected:
    """What the controller's detectors for a model were trained for."""

    input_shape: tuple[int, ...]
    classes: int
    model_digest: str = ""  # of the model the detectors were trained with ("": unknown)
    # the privacy noise their thresholds were calibrated on (openexample/privacy.py)
    privacy: PrivacyNoise = NO_NOISE
    # the layer activations they read (name, one item's shape), where they come from
    # (ModelConfig.activations: auto, agent, reference) and whether the controller's
    # reference copy can compute them
    activations: tuple[tuple[str, tuple[int, ...]], ...] = ()
    activations_from: str = "auto"
    computes_activations: bool = False

    def asks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The activations to ask agents for (none when the controller computes them)."""
        return () if self.activations_from == "reference" else self.activations


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


log = logging.getLogger(__name__)

_BAD_XID = pb.BAD_REQUEST_CODE_BAD_XID

# Bodies an agent may send once configured, besides PKG_IN, ERROR and VIGILANCE_REMOVED.
_REPLIES = frozenset({"barrier_reply", "stats_reply", "role_reply"})


class AgentSession:
    """One agent's stream as the controller sees it."""

    def __init__(
        self,
        controller_id: str,
        *,
        now: float,
        identity: Identity | None = None,
        authenticated: bool = True,
        expected: Mapping[str, Expected] | None = None,
        **options: Any,
    ) -> None:
        """``identity``: what the peer's verified certificate says (None: no TLS, or no
        identity in it); ``authenticated``: the channel is mTLS, so an identity is
        required and the agent may only speak for it; ``expected``: per model id, what
        its detectors were trained for (a FEATURES_REPLY that declares otherwise is
        refused). ``options``: :class:`openexample.session.Session`'s (limits, echo,
        handshake)."""
        self.session = Session(controller_id, now=now, **options)
        self.identity = identity
        self.authenticated = authenticated
        self.expected = dict(expected or {})
        self.peer = ""  # the transport's view of the peer (for ListAgents), set by the shell
        self.agent_id = ""
        # PKG_IN xids admitted and not answered yet: a request is answered once.
        self.in_flight: set[int] = set()
        self.in_flight_items = 0
        self.declared_batch = 0  # FEATURES_REPLY.max_batch_items (0: the protocol limit)
        self.models: dict[str, pb.ModelDescriptor] = {}
        # per model, the activations this agent sends (asked, and declared as asked)
        self.activations: dict[str, frozenset[str]] = {}
        self.pkg_in_count = 0

    # -- what the core reads --

    @property
    def state(self) -> State:
        return self.session.state

    @property
    def configured(self) -> bool:
        return self.session.configured

    @property
    def opened_at(self) -> float:
        return self.session.opened_at

    # -- outbound --

    def start(self) -> list[pb.Envelope]:
        return self.session.start()

    def request(self, body: Message) -> pb.Envelope:
        return self.session.request(body)

    def reply_to(self, xid: int, body: Message) -> pb.Envelope:
        return self.session.reply_to(xid, body)

    def answered(self, xid: int, items: int) -> None:
        """A PKG_IN was answered (PKG_OUT sent): its xid may be used again."""
        if xid in self.in_flight:
            self.in_flight.discard(xid)
            self.in_flight_items -= items

    # -- inbound --

    def receive(self, data: bytes, now: float) -> Output:
        out = self.session.receive(data, now)
        if not out.events:
            return out
        events, out.events = out.events, []
        for ev in events:
            if isinstance(ev, Received):
                try:
                    self._on_message(ev.env, out)
                except ProtocolError as err:
                    self.session.refuse(out, err.with_xid(err.xid or ev.env.xid), ev.env)
                    if ev.env.HasField("features_reply"):  # nothing to go on with
                        reason = f"{err.name}: {err.text}"
                        claimed = ev.env.features_reply.agent_id[:64]
                        out.events.append(HandshakeRefused(claimed, reason))
                        out.events.extend(self.session.close(reason).events)
            elif isinstance(ev, PeerHello):
                out.send.append(self.session.request(features_request(self.expected)))
            else:  # Established, Closed
                out.events.append(ev)
        return out

    def _on_message(self, env: pb.Envelope, out: Output) -> None:
        kind = env.WhichOneof("body")
        if kind == "pkg_in":
            if self.session.state is not State.CONFIG and self.session.state is not State.MAIN:
                raise bad_request(pb.BAD_REQUEST_CODE_UNEXPECTED, "PKG_IN before FEATURES")
            if env.xid == 0:
                raise bad_request(_BAD_XID, "PKG_IN with xid 0 (reserved for no-reply messages)")
            if env.xid in self.in_flight:
                raise bad_request(_BAD_XID, f"xid {env.xid} is already in flight")
            n = len(env.pkg_in.items)
            if self.declared_batch and n > self.declared_batch:
                raise bad_request(
                    pb.BAD_REQUEST_CODE_BAD_BATCH,
                    f"{n} items, more than the {self.declared_batch} this agent declared",
                )
            decoded = validate_pkg_in(env.pkg_in, self.models, self.session.limits)
            asked = self.activations.get(decoded.model_id, frozenset())
            for name in decoded.activations:
                if name not in asked:
                    raise bad_request(
                        pb.BAD_REQUEST_CODE_BAD_FIELD,
                        f"activation {name!r} was not asked for (FEATURES_REQUEST asked"
                        f" for {', '.join(sorted(asked)) or 'none'})",
                    )
            self.pkg_in_count += 1
            self.in_flight.add(env.xid)
            self.in_flight_items += n
            out.events.append(PkgInReceived(env.xid, decoded))
        elif kind == "features_reply":
            self._check_identity(env.features_reply.agent_id)
            models = validate_features(env.features_reply, self.session.limits)
            self._check_models(models, env.features_reply.agent_id)
            self.models = models
            self.agent_id = env.features_reply.agent_id
            self.declared_batch = env.features_reply.max_batch_items
            out.events.append(Ready(self.agent_id, self.models))
        elif kind in _REPLIES:
            out.events.append(ReplyReceived(env.xid, env))
        elif kind == "error":
            # An agent's ERROR answers one of our requests (e.g. a refused VIGILANCE_MOD).
            out.events.append(ReplyReceived(env.error.offending_xid or env.xid, env))
        elif kind == "vigilance_removed":
            out.events.append(RuleRemoved(env.vigilance_removed))
        elif kind == "role_request":
            raise bad_request(
                pb.BAD_REQUEST_CODE_BAD_TYPE, "ROLE_REQUEST: only controller identities send it"
            )
        else:
            raise bad_request(pb.BAD_REQUEST_CODE_BAD_TYPE, f"controller does not accept {kind}")

    def _check_identity(self, claimed: str) -> None:
        """An agent speaks only for the id its certificate proves (HELLO_FAILED/EPERM)."""
        if not self.authenticated:
            return  # plain text, asked for: the claim is all there is
        ident = self.identity
        eperm = pb.HELLO_FAILED_CODE_EPERM
        if ident is None:
            raise hello_failed(eperm, "the client certificate carries no openexample identity")
        if ident.kind is not Kind.AGENT:
            raise hello_failed(eperm, f"{ident} may not connect as an agent")
        if claimed != ident.name:
            raise hello_failed(
                eperm, f"agent_id {claimed[:64]!r}: the client certificate says {ident}"
            )

    def _check_models(self, models: Mapping[str, pb.ModelDescriptor], agent_id: str) -> None:
        """Each declared model that has detectors here has their input shape and class
        count, and the privacy noise their thresholds were calibrated on
        (HELLO_FAILED/INCOMPATIBLE): otherwise they would score inputs they were not
        trained for and give verdicts, not errors (other noise: another FPR); and the
        layer activations they read come from the agent or the reference copy
        (:func:`activation_plan`)."""
        plans = {}
        for model_id, m in models.items():
            want = self.expected.get(model_id)
            problem = incompatible(model_id, m, want)
            if not problem and want is not None:
                plans[model_id] = plan = activation_plan(model_id, m, want)
                problem = plan.refused
            if problem:
                raise hello_failed(pb.HELLO_FAILED_CODE_INCOMPATIBLE, problem)
        self.activations = {}
        for model_id, plan in plans.items():
            if plan.note:  # which path the activations take, once per session
                level = logging.WARNING if plan.fallback else logging.INFO
                log.log(level, "agent %r: %s", agent_id[:64], plan.note)
            self.activations[model_id] = plan.sent

    # -- time --

    def tick(self, now: float) -> Output:
        return self.session.tick(now)

    def next_deadline(self) -> float | None:
        return self.session.next_deadline()

    def close(self, reason: str) -> Output:
        return self.session.close(reason)


def incompatible(model_id: str, m: pb.ModelDescriptor, want: Expected | None) -> str:
    """Why a model declared as ``m`` cannot be scored by detectors trained for ``want``
    (another input shape, class count or privacy noise); "" when it can, or when there
    are no detectors for it here (None). ``m`` has been through validate_features."""
    if want is None:
        return ""
    shape, classes = tuple(m.input_shape), len(m.class_names)
    if (shape, classes) != (want.input_shape, want.classes):
        return (
            f"model {model_id!r}: the agent declares inputs {shape} and {classes}"
            f" classes; the controller's detectors for it were trained for"
            f" {want.input_shape} and {want.classes}"
        )
    noise = PrivacyNoise.from_pb(m.privacy if m.HasField("privacy") else None)
    if not noise.matches(want.privacy):
        return (
            f"model {model_id!r}: the agent's privacy noise is {noise}; the"
            f" controller's detectors for it were calibrated for {want.privacy}"
            " (give the agent that privacy, or train them with --privacy"
            f" '{noise}')"
        )
    return ""


def features_request(expected: Mapping[str, Expected]) -> pb.FeaturesRequest:
    """FEATURES_REQUEST, asking for the activations each model's detectors read."""
    req = pb.FeaturesRequest()
    for model_id, want in expected.items():
        if want.asks():
            req.activations.add(
                model_id=model_id,
                activations=[
                    pb.ActivationDescriptor(name=n, shape=list(shape)) for n, shape in want.asks()
                ],
            )
    return req


def _shapes(acts: Iterable[tuple[str, Iterable[int]]]) -> str:
    return ", ".join(f"{n[:64]} {tuple(s)[:8]}" for n, s in acts) or "none"


@dataclass(frozen=True, slots=True)
class ActivationPlan:
    """Where one agent's model gets the activations its detectors read."""

    sent: frozenset[str] = frozenset()  # what the agent will send: asked, declared as asked
    note: str = ""  # the path taken, logged once per session ("": no activations read)
    fallback: bool = False  # the agent declares other ones: the reference copy computes them
    refused: str = ""  # why the agent cannot be served ("": it can)


def activation_plan(model_id: str, m: pb.ModelDescriptor, want: Expected) -> ActivationPlan:
    """The agent sends what was asked that it declares with the shape asked; the
    detectors read them all from PKG_IN, else (``auto``) compute them all from the
    reference copy, else the agent is refused (HELLO_FAILED/INCOMPATIBLE)."""
    if not want.activations:
        return ActivationPlan()
    read = _shapes(want.activations)
    if not want.asks():
        note = f"model {model_id!r}: activations {read} computed by the controller (reference)"
        return ActivationPlan(note=note)
    declared = {d.name: tuple(d.shape) for d in m.activations}
    sent = frozenset(n for n, shape in want.asks() if declared.get(n) == shape)
    if len(sent) == len(want.asks()):
        return ActivationPlan(sent, f"model {model_id!r}: activations {read} sent by the agent")
    has = _shapes((d.name, d.shape) for d in m.activations)
    why = f"model {model_id!r}: the detectors read activations {read}; the agent declares {has}"
    if want.activations_from == "auto" and want.computes_activations:
        note = f"{why}: the controller's reference copy computes them"
        return ActivationPlan(sent, note, fallback=bool(m.activations))
    fix = "attach the agent with activations=[those layers]"
    if want.activations_from == "auto":
        fix += ", or give the controller a TorchScript reference_model to compute them"
    return ActivationPlan(sent, refused=f"{why} ({fix})")
