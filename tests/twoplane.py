"""An in-memory two-plane harness: one ControllerCore, N AgentCores, a fake clock.

Like Faucet's ``FakeOFTable`` tests and h11's ``ConnectionPair``: no sockets, no
threads, no sleeping. Every envelope is serialized with ``SerializeToString()`` and fed
to the other side's ``on_bytes`` / ``receive``, and what each core returns is carried
out the way the real shells do (``controller/server.py`` for :class:`Step`,
``agents/transport.py`` for :class:`AgentOutput`, ``agents/guard.py`` for a caller
waiting on a :class:`Ticket`):

- ``Step.send`` goes down the agent's stream; ``Step.jobs`` are scored (or held back);
  ``Step.closed`` ends the agent's stream after what was queued before it, and the
  agent then sees the stream end (``disconnected``); ``incidents``, ``replies``,
  ``errors``, ``blocked``, ``verdicts`` and ``overloaded`` are recorded.
- ``AgentOutput.send`` goes up to the controller; ``settled`` tickets leave the waiting
  list; ``retractions`` are collected per agent; ``established`` marks MAIN; ``close``
  half-closes the stream after ``send`` (the controller then ends the session, and
  the agent sees the stream end).
- Time moves only in :meth:`TwoPlanes.advance`: ticks run at the cores'
  ``next_deadline()``, windowed PKG_IN flushes at their due time, and waiting callers
  whose budget is over get ``expire_ticket`` at their ticket's deadline.

Scoring stays out of ``controller.pipeline`` (no torch): a scorer is a function from an
:class:`InspectJob` to one ``pb.PkgOutItem`` per item, like ``score_jobs`` returns. It
takes no time on the fake clock; the PKG_OUT's ``Timings`` show the time a job was held.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agents.config import AgentConfig
from agents.core import AgentCore, AgentOutput
from agents.results import ModelInfo, Result, Ticket
from controller.config import Config
from controller.core import ControllerCore, Incident, InspectJob, ScoreTimes, Step
from openexample.identity import Identity, Kind
from openexample.v1 import openexample_pb2 as pb

MODEL_ID = "m"
SHAPE = (1, 4, 4)
N_CLASSES = 3

Scorer = Callable[[InspectJob], list[pb.PkgOutItem]]


# ---- stub scorers --------------------------------------------------------------------


def item(verdict: int, score: float = 0.0, *, detector: str = "stub") -> pb.PkgOutItem:
    """One PKG_OUT item shaped like FusedScorer's: action, score, evidence."""
    adversarial = verdict == pb.VERDICT_ADVERSARIAL
    out = pb.PkgOutItem(
        verdict=verdict,
        action=pb.VERDICT_ACTION_DROP if adversarial else pb.VERDICT_ACTION_RELEASE,
        score=score,
        threshold=0.0,
    )
    out.evidence.add(detector=detector, score=score, threshold=0.0, flagged=adversarial)
    return out


def mean_scorer(threshold: float = 0.5) -> Scorer:
    """ADVERSARIAL (DROP) when an input's mean is above ``threshold``, else BENIGN."""

    def score(job: InspectJob) -> list[pb.PkgOutItem]:
        xs = job.pkg.inputs.reshape(len(job.pkg.items), -1).astype(np.float64)
        out = []
        for mean in xs.mean(axis=1).tolist():
            flagged = mean > threshold
            verdict = pb.VERDICT_ADVERSARIAL if flagged else pb.VERDICT_BENIGN
            out.append(item(verdict, mean - threshold, detector="mean"))
        return out

    return score


def constant_scorer(verdict: int, score: float = 1.0) -> Scorer:
    """The same verdict for every item (e.g. to release held jobs as ADVERSARIAL)."""
    return lambda job: [item(verdict, score) for _ in job.pkg.items]


def benign_input(fill: float = 0.1, shape: Sequence[int] = SHAPE) -> np.ndarray:
    return np.full(shape, fill, np.float32)


def adversarial_input(fill: float = 0.9, shape: Sequence[int] = SHAPE) -> np.ndarray:
    """Above mean_scorer's threshold. Vary ``fill`` to get distinct fingerprints."""
    return np.full(shape, fill, np.float32)


# ---- the wire --------------------------------------------------------------------------

EOF = None  # end of a stream direction, queued behind what was sent before it
TO_AGENT, TO_CONTROLLER = "down", "up"


@dataclass(eq=False)
class Link:
    """One gRPC stream between an agent and the controller (one controller session)."""

    agent: AgentHandle
    sid: int
    alive: bool = True
    agent_done_writing: bool = False  # the agent asked to close: it writes no more


@dataclass(eq=False)
class AgentHandle:
    """One agent core on the harness; ``call`` is ``guard(x)``."""

    pair: TwoPlanes
    agent_id: str
    core: AgentCore
    model_id: str
    shape: tuple[int, ...]
    n_classes: int
    link: Link | None = None
    silent: bool = False  # drop everything this agent writes (a hung / partitioned peer)
    deaf: bool = False  # drop everything the controller writes to this agent
    sent: list[pb.Envelope] = field(default_factory=list)  # what reached the wire upward
    received: list[pb.Envelope] = field(default_factory=list)  # delivered to the core
    waiting: list[Ticket] = field(default_factory=list)  # callers blocked on a ticket
    settled: list[Ticket] = field(default_factory=list)
    retractions: list[Result] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)  # AgentOutput.close reasons
    established: int = 0  # times the session reached MAIN
    kicked: bool = False  # the outbox went non-empty: flush at the next pump
    flush_at: float | None = None  # a windowed flush is due (batch_window_us > 0)

    # -- state --

    @property
    def connected(self) -> bool:
        return self.link is not None

    @property
    def up(self) -> bool:
        return self.core.up

    @property
    def sid(self) -> int | None:
        return self.link.sid if self.link is not None else None

    def kinds_received(self) -> list[str]:
        return [e.WhichOneof("body") or "" for e in self.received]

    def kinds_sent(self) -> list[str]:
        return [e.WhichOneof("body") or "" for e in self.sent]

    # -- inferences --

    def logits(self, label: int) -> np.ndarray:
        row = np.zeros(self.n_classes, np.float32)
        row[label] = 3.0
        return row

    def decide(self, x: Any, *, source: str = "", label: int = 1) -> Result | Ticket:
        """``core.decide`` only; the flush it asks for runs at the next :meth:`pump`."""
        pair = self.pair
        row = self.logits(label)
        conf = float(1.0 / np.exp(row - row[label]).sum())
        x = np.asarray(x, np.float32).reshape(self.shape)
        r, flush = self.core.decide(self.model_id, x, row, label, conf, source, pair.now)
        if isinstance(r, Ticket):
            self.waiting.append(r)
        if flush:  # transport.kick(): the I/O loop flushes soon, i.e. at the next pump
            self.kicked = True
        return r

    def call(self, x: Any, *, source: str = "", label: int = 1) -> Result | Ticket:
        """One inference, as ``guard(x)``: decide, flush, deliver, score, deliver back.

        Returns the Result, or the Ticket while its verdict is pending (jobs held, a
        silent link, a batch window): :meth:`TwoPlanes.advance` past its deadline
        expires it and :meth:`TwoPlanes.release` may answer it first."""
        r = self.decide(x, source=source, label=label)
        self.pair.pump()
        return self.settle(r)

    def batch(self, xs: Any, *, source: str = "", label: int = 1) -> list[Result | Ticket]:
        """N inferences decided together: one flush, one PKG_IN (as ``guard.batch``)."""
        rs = [self.decide(x, source=source, label=label) for x in xs]
        self.pair.pump()
        return [self.settle(r) for r in rs]

    @staticmethod
    def settle(r: Result | Ticket) -> Result | Ticket:
        if isinstance(r, Ticket) and r.result is not None:
            return r.result
        return r

    def send_raw(self, env: pb.Envelope | bytes) -> None:
        """Write a hand-built message on this agent's stream (bypassing its core)."""
        assert self.link is not None, "not connected"
        data = env if isinstance(env, bytes) else env.SerializeToString()
        self.pair._wire.append((self.link, TO_CONTROLLER, data))
        self.pair.pump()

    # -- what transport.py does --

    def _kick(self) -> None:
        self.kicked = False
        window = self.core.config.batch_window_us
        if self.flush_at is not None or self.link is None:
            return
        if window > 0:
            self.flush_at = self.pair.now + window * 1e-6
        else:
            self._flush()

    def _flush(self) -> None:
        self.flush_at = None
        batches = self.core.take_outbox(self.pair.now)
        size = 0
        for b in batches:
            data = self.core.build_pkg_in(b).SerializeToString()
            size += len(data)
            self._write(data)
        if batches:
            self.core.count_sent_bytes(size)

    def _write(self, data: bytes | None) -> None:
        link = self.link
        if link is None or not link.alive or link.agent_done_writing:
            return
        if data is EOF:
            link.agent_done_writing = True
        elif self.silent:
            return
        else:
            self.sent.append(pb.Envelope.FromString(data))
        self.pair._wire.append((link, TO_CONTROLLER, data))

    def _carry_out(self, out: AgentOutput) -> None:
        for env in out.send:
            self._write(env.SerializeToString())
        for t in out.settled:
            self.settled.append(t)
            if t in self.waiting:
                self.waiting.remove(t)
        self.retractions.extend(out.retractions)
        if out.established:
            self.established += 1
        if out.close:
            self.closes.append(out.close)
            self._write(EOF)  # transport: done_writing after what was sent


class TwoPlanes:
    """The controller and its agents, wired in memory. See the module docstring."""

    def __init__(
        self,
        scorer: Scorer | None = None,
        *,
        models: Sequence[str] = (MODEL_ID,),
        now: float = 0.0,
        **config: Any,
    ) -> None:
        config.setdefault("metrics_port", -1)
        self.cfg = Config(**config)
        self.now = now
        self.scorer = scorer or mean_scorer()
        self.core = ControllerCore(self.cfg, set(models), now)
        self.agents: dict[str, AgentHandle] = {}
        self.holding = False
        self.held: list[InspectJob] = []
        self._pending: list[InspectJob] = []
        self._wire: deque[tuple[Link, str, bytes | None]] = deque()
        self._links: dict[int, Link] = {}
        # What the controller's steps said, in order.
        self.scored: list[InspectJob] = []
        self.incidents: list[Incident] = []
        self.replies: dict[tuple[int, int], pb.Envelope] = {}
        self.closed: list[tuple[str, str]] = []  # (agent id, reason)
        self.errors: list[str] = []
        self.blocked: list[tuple[str, str]] = []  # (agent_id, source_id)
        self.verdicts: list[tuple[str, int]] = []
        self.overloaded = 0

    # ---- agents ----------------------------------------------------------------------

    def attach(
        self,
        agent_id: str,
        model_id: str = MODEL_ID,
        shape: Sequence[int] = SHAPE,
        *,
        n_classes: int = N_CLASSES,
        connect: bool = True,
        **overrides: Any,
    ) -> AgentHandle:
        """A new agent core (AgentConfig ``overrides``), connected unless told not to."""
        shape = tuple(shape)
        cfg = AgentConfig(agent_id=agent_id, model_id=model_id, input_shape=shape, **overrides)
        names = tuple(str(i) for i in range(n_classes))
        info = ModelInfo(model_id, shape, names, privacy=cfg.privacy)
        core = AgentCore(agent_id, [info], cfg, now=self.now)
        agent = AgentHandle(self, agent_id, core, model_id, shape, n_classes)
        self.agents[agent_id] = agent
        if connect:
            self.connect(agent)
        return agent

    def connect(self, agent: AgentHandle) -> AgentHandle:
        """Open a stream: both HELLOs, then deliver until quiet."""
        assert agent.link is None, "already connected"
        # As the mTLS shell does: the identity its certificate proves.
        sid, hello = self.core.open_session(self.now, Identity(Kind.AGENT, agent.agent_id))
        link = agent.link = self._links[sid] = Link(agent, sid)
        for env in hello:
            self._wire.append((link, TO_AGENT, env.SerializeToString()))
        agent._carry_out(agent.core.connected(self.now))
        self.pump()
        return agent

    reconnect = connect

    def disconnect(self, agent: AgentHandle, reason: str = "stream broken") -> None:
        """The stream breaks under both sides: bytes in flight are lost."""
        link = agent.link
        assert link is not None, "not connected"
        self._teardown(link, reason)
        self.pump()

    def _teardown(self, link: Link, reason: str) -> None:
        if not link.alive:
            return
        link.alive = False
        agent = link.agent
        agent.link = None
        agent.flush_at = None
        agent.kicked = False
        self._dispatch(self.core.close_session(link.sid, reason, self.now))
        self._links.pop(link.sid, None)
        agent._carry_out(agent.core.disconnected(self.now))

    # ---- delivery ----------------------------------------------------------------------

    def pump(self, limit: int = 100_000) -> None:
        """Deliver until no message is in flight and no job waits (unless held)."""
        for _ in range(limit):
            kicked = [a for a in self.agents.values() if a.kicked]
            if kicked:
                for agent in kicked:
                    agent._kick()
            elif self._wire:
                self._deliver(*self._wire.popleft())
            elif self._pending and not self.holding:
                jobs, self._pending = self._pending, []
                for job in jobs:
                    self._score(job, self.scorer)
            elif self._pending:
                self.held += self._pending
                self._pending = []
            else:
                return
        raise AssertionError(f"no quiescence after {limit} deliveries: a message loop")

    def _deliver(self, link: Link, direction: str, data: bytes | None) -> None:
        if not link.alive:
            return  # the stream is gone; so is what was in flight on it
        agent = link.agent
        if direction == TO_CONTROLLER:
            if data is EOF:  # the agent's half-close: the controller ends the stream
                self._teardown(link, "stream ended")
                return
            self._dispatch(self.core.on_bytes(link.sid, data, self.now))
        else:
            if data is EOF:  # the controller ended the stream: the agent sees EOF
                self._teardown(link, "stream ended")
                return
            if agent.deaf:
                return
            agent.received.append(pb.Envelope.FromString(data))
            agent._carry_out(agent.core.receive(data, self.now))

    def _dispatch(self, step: Step) -> None:
        """What ControllerServer._dispatch does with a Step."""
        for sid, env in step.send:
            link = self._links.get(sid)
            if link is not None and link.alive:
                self._wire.append((link, TO_AGENT, env.SerializeToString()))
        self._pending += step.jobs
        self.incidents += step.incidents
        for sid, xid, env in step.replies:
            self.replies[(sid, xid)] = env
        for sid, reason in step.closed:
            link = self._links.get(sid)
            self.closed.append((link.agent.agent_id if link else f"sid {sid}", reason))
            if link is not None and link.alive:
                self._wire.append((link, TO_AGENT, EOF))
        self.errors += step.errors
        self.blocked += [d.key for d in step.blocked]
        self.verdicts += step.verdicts
        self.overloaded += step.overloaded

    def _score(self, job: InspectJob, scorer: Scorer) -> None:
        items = scorer(job)
        assert len(items) == job.size, f"scorer gave {len(items)} items for {job.size}"
        self.scored.append(job)
        # As the server: scored in no time on the fake clock, one job per batch.
        times = ScoreTimes(self.now, self.now, job.size, (("stub", 0.0),))
        self._dispatch(self.core.on_results(job, items, self.now, times))

    # ---- a slow controller ----------------------------------------------------------

    def hold(self) -> None:
        """From now on admitted jobs wait in ``held`` until :meth:`release`."""
        self.holding = True

    def release(self, scorer: Scorer | None = None, *, keep_holding: bool = False) -> int:
        """Score the held jobs now (with ``scorer`` or the pair's) and deliver."""
        self.holding = keep_holding
        jobs, self.held = self.held, []
        for job in jobs:
            self._score(job, scorer or self.scorer)
        self.pump()
        return len(jobs)

    # ---- time ------------------------------------------------------------------------

    def _deadlines(self) -> list[tuple[float, str, Any]]:
        out: list[tuple[float, str, Any]] = []
        if (t := self.core.next_deadline()) is not None:
            out.append((t, "controller", None))
        for agent in self.agents.values():
            if (t := agent.core.next_deadline()) is not None:
                out.append((t, "agent", agent))
            if agent.flush_at is not None:
                out.append((agent.flush_at, "flush", agent))
            out += [(t.deadline, "ticket", (agent, t)) for t in agent.waiting]
        return out

    def advance(self, seconds: float, *, limit: int = 1_000_000) -> None:
        """Move the clock, running every tick, flush and ticket expiry due on the way."""
        target = self.now + seconds
        last, same = -math.inf, 0
        for _ in range(limit):
            due = [d for d in self._deadlines() if d[0] <= target]
            if not due:
                break
            t = max(min(d[0] for d in due), self.now)
            same = same + 1 if t == last else 0
            if same > 100:
                raise AssertionError(f"deadline stuck at {t}: {due}")
            last = self.now = t
            for when, kind, what in due:
                if when > t:
                    continue
                if kind == "controller":
                    self._dispatch(self.core.on_tick(t))
                elif kind == "agent":
                    what._carry_out(what.core.tick(t))
                elif kind == "flush":
                    what._flush()
                else:  # the waiter's budget is over (guard.py: expire_ticket)
                    agent, ticket = what
                    if ticket in agent.waiting:
                        agent.waiting.remove(ticket)
                        agent.core.expire_ticket(ticket, t)
            self.pump()
        else:
            raise AssertionError(f"advance({seconds}) did not finish in {limit} steps")
        self.now = target

    # ---- operator --------------------------------------------------------------------

    def admin_mod(
        self, mod: pb.VigilanceMod, *, agent_id: str = "", model_id: str = ""
    ) -> dict[str, pb.Error | None]:
        """ControllerCore.mod_rules, delivered; per agent: None, or the error (as the
        admin API's ModRules answers). Raises ProtocolError for an invalid mod."""
        step, waits = self.core.mod_rules(mod, self.now, agent_id=agent_id, model_id=model_id)
        self._dispatch(step)
        self.pump()
        out: dict[str, pb.Error | None] = {}
        for sid, mod_xid, barrier_xid, aid in waits:
            reply = self.replies.get((sid, mod_xid))
            if reply is not None and reply.HasField("error"):
                out[aid] = reply.error
            elif (sid, barrier_xid) not in self.replies:
                out[aid] = pb.Error(text="no BARRIER_REPLY in time")
            else:
                out[aid] = None
        return out
