"""The controller's decision core, sans-I/O (Faucet's Valve, for DeSVig).

It owns the agent sessions, the controller-wide RT (for swift vigilance and resync),
workload admission (W vs W0), source tracing and incidents, and the desired vigilance
rules per agent: those live in controller/desired.py (:class:`DesiredRules`, the
durable part, ``self.durable``); the core sends their changes to the live agents. The
gRPC shim feeds it bytes, ticks and detector results, each with ``now``; it returns a
:class:`Step` saying what to send, what to score and what to record. No sockets, no
clocks, no threads.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controller.config import Config, RuleConfig, trace_params
from controller.desired import Changes, DesiredRules, DesiredState, RulesDiff
from controller.overflow import RoundTrip
from controller.session import (
    AgentSession,
    Closed,
    Expected,
    HandshakeRefused,
    Output,
    PkgInReceived,
    Ready,
    ReplyReceived,
    incompatible,
)
from controller.tracing import SourceTracer, TraceDecision
from openexample import rules, tables
from openexample.errors import ProtocolError
from openexample.identity import Identity
from openexample.perceptual import perceptual
from openexample.tensor import encode
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn, validate_pkg_in


@dataclass(slots=True)
class InspectJob:
    """A PKG_IN admitted for scoring."""

    sid: int
    xid: int
    agent_id: str
    pkg: DecodedPkgIn
    received_at: float

    @property
    def size(self) -> int:
        return len(self.pkg.items)


REMOTE_SID = -1  # InspectJob.sid of work a neighbour handed over (no session here)


@dataclass(slots=True)
class ForwardJob:
    """A PKG_IN over W0, handed to the neighbours (controller/overflow.py) and waiting
    for their answer until ``deadline`` (core time)."""

    key: int
    sid: int
    xid: int
    agent_id: str
    model_id: str
    size: int
    deadline: float
    request: cpb.WorkRequest  # what goes on the bus (its deadline: unix time, the shell's)
    sent_at: float


@dataclass(frozen=True, slots=True)
class ScoreTimes:
    """When the shell scored a job's batch, on the clock it passes as ``now``.

    The shell measures; :meth:`ControllerCore.on_results` turns these into the
    PKG_OUT's ``Timings`` (microseconds from the job's ``received_at``).
    """

    started: float  # the scoring call for the batch began
    done: float  # it returned
    batch_items: int  # items scored together (this job's and others')
    detectors: tuple[tuple[str, float], ...] = ()  # (name, seconds) per detector


def pkg_out_timings(job: InspectJob, times: ScoreTimes, now: float) -> pb.Timings:
    """The stages of ``job`` in whole microseconds. The boundaries are rounded, not the
    spans, so queue_us + score_us + reply_us == controller_us exactly."""
    t0 = job.received_at
    start = max(0, round((times.started - t0) * 1e6))
    done = max(start, round((times.done - t0) * 1e6))
    end = max(done, round((now - t0) * 1e6))
    return pb.Timings(
        queue_us=start,
        batch_items=times.batch_items,
        score_us=done - start,
        detectors=[
            pb.DetectorTiming(detector=name, us=max(0, round(s * 1e6)))
            for name, s in times.detectors
        ],
        reply_us=end - done,
        controller_us=end,
    )


@dataclass(slots=True)
class Incident:
    """An ADVERSARIAL verdict, for the journal (never the raw input)."""

    at: float
    agent_id: str
    model_id: str
    source_id: str
    label: int
    corrected_label: int | None
    score: float
    evidence: str  # JSON: [{detector, score, threshold, flagged}, ...]


@dataclass(frozen=True, slots=True)
class CoreSnapshot:
    """What metrics and the admin API read of the core (a copy; never its internals)."""

    sessions: int  # open streams, in any state
    agents: int  # configured sessions (FEATURES done)
    workload: int  # W: items admitted and not answered yet
    rt_entries: int
    blocked_sources: int
    template_rules: int  # desired rules for agents not seen yet
    agent_rules: int  # desired rules, summed over known agents


@dataclass(slots=True)
class Step(Changes):
    """What the shell carries out after a call into the core. From :class:`Changes`:
    the desired state to store before anything is sent, and the notes to log."""

    send: list[tuple[int, pb.Envelope]] = field(default_factory=list)
    jobs: list[InspectJob] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    # Replies to controller-initiated requests (sid, xid, envelope): admin waits on them.
    replies: list[tuple[int, int, pb.Envelope]] = field(default_factory=list)
    closed: list[tuple[int, str]] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)  # sessions whose FEATURES were accepted
    # Typed errors sent to agents, by name; sources blocked; overload answers.
    errors: list[str] = field(default_factory=list)
    blocked: list[TraceDecision] = field(default_factory=list)  # sources blocked, and why
    # Agents whose claimed fingerprint of a flagged input is not the controller's own
    # (its entry is not pushed): (agent_id, model_id).
    fingerprint_mismatches: list[tuple[str, str]] = field(default_factory=list)
    # Sessions closed because the same agent connected again: (sid, agent_id).
    replaced: list[tuple[int, str]] = field(default_factory=list)
    # Agents that declared models with no detectors here (agent_id, model ids): their
    # PKG_INs get UNKNOWN/NO_DETECTOR; the shell warns.
    undetected: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    # Agents that run another model file than their detectors were trained with, by its
    # digest: (agent_id, model_id, the agent's digest, the artifacts'). The shell warns.
    other_models: list[tuple[str, str, str, str]] = field(default_factory=list)
    # FEATURES refused with HELLO_FAILED (sid, claimed agent id, reason): the shell warns.
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    verdicts: list[tuple[str, int]] = field(default_factory=list)  # (model, Verdict)
    overloaded: int = 0
    # For the other controllers (controller/cluster.py), what this one decided: the
    # ADVERSARIAL RT entries it made (model, entry, expiry in core time or None: never)
    # and the sources it blocked (expiry likewise) or unblocked. Never what
    # :meth:`ControllerCore.apply_remote` applied (that came from the cluster).
    # Over W0: PKG_INs for the neighbours (the shell publishes them), and answers to
    # work a neighbour handed here (the reply-to key the shell gave, the answer).
    forwards: list[ForwardJob] = field(default_factory=list)
    answers: list[tuple[object, cpb.WorkAnswer]] = field(default_factory=list)
    rt_added: list[tuple[str, pb.LabelEntry, float | None]] = field(default_factory=list)
    blocks_added: list[tuple[tuple[str, str], float | None]] = field(default_factory=list)
    blocks_removed: list[tuple[str, str]] = field(default_factory=list)

    def merge_answers(self, other: Step) -> Step:
        """``other``'s PKG_OUTs and their counts, added to this step."""
        self.send.extend(other.send)
        self.verdicts.extend(other.verdicts)
        self.overloaded += other.overloaded
        return self

    def merge(self, other: Step) -> Step:
        """``other``'s messages, what to store and notes, added to this step (the
        parts an operator's or the config's rule changes produce)."""
        self.send.extend(other.send)
        self.persist |= other.persist
        self.persist_blocks = self.persist_blocks or other.persist_blocks
        self.notes.extend(other.notes)
        return self


def _unknown_items(n: int, reason: int) -> list[pb.PkgOutItem]:
    item = pb.PkgOutItem(
        verdict=pb.VERDICT_UNKNOWN, action=pb.VERDICT_ACTION_RELEASE, unknown_reason=reason
    )
    return [item] * n


class ControllerCore:
    def __init__(
        self,
        cfg: Config,
        detected_models: set[str],
        now: float,
        expected: Mapping[str, Expected] | None = None,
    ) -> None:
        """``expected``: per model id, the input shape and classes its detectors were
        trained for; agents that declare otherwise are refused at FEATURES."""
        self.cfg = cfg
        self.detected_models = detected_models  # model ids with a detector pipeline
        self.expected = dict(expected or {})
        self.sessions: dict[int, AgentSession] = {}
        self.workload = 0  # W: items admitted and not answered yet
        self.draining = False  # shutting down: new PKG_INs are answered at once
        self._sid = itertools.count(1)
        # The durable desired state: rules per scope, blocked sources, config rules.
        self.durable = DesiredRules(cfg.budget_us, cfg.fail_mode, now)
        self.rt = tables.ResultTable(max_entries=100_000)
        self.tracer = SourceTracer(trace_params(cfg))
        self._fp_key = cfg.fingerprint_key_bytes
        self._buckets: dict[str, tuple[float, float]] = {}  # agent -> (tokens, at)
        # Several controllers: whether a neighbour can take work over W0 now (the shell
        # says, from the peers' load), what a forward costs, and the work in flight.
        self.neighbours_free = False
        self.forward_rtt = RoundTrip()
        self.forwarded: dict[int, ForwardJob] = {}
        self._remote: dict[int, object] = {}  # InspectJob.xid -> the shell's reply-to
        self._keys = itertools.count(1)

    # --- sessions ---

    def open_session(
        self, now: float, identity: Identity | None = None
    ) -> tuple[int, list[pb.Envelope]]:
        """A new session; ``identity`` is what the peer's verified certificate says
        (with plaintext there is none, and the agent's claimed id stands)."""
        sid = next(self._sid)
        s = AgentSession(
            self.cfg.controller_id,
            identity=identity,
            authenticated=not self.cfg.plaintext,
            expected=self.expected,
            echo_interval_s=self.cfg.echo_interval_s,
            echo_unreplied_limit=self.cfg.echo_unreplied_limit,
            handshake_timeout_s=self.cfg.handshake_timeout_s,
            now=now,
        )
        self.sessions[sid] = s
        return sid, s.start()

    def close_session(self, sid: int, reason: str, now: float) -> Step:
        step = Step()
        s = self.sessions.pop(sid, None)
        if s is not None:
            self._absorb(sid, s.close(reason), step, now)
            if not step.closed:
                step.closed.append((sid, reason))
        return step

    def sessions_of(self, agent_id: str = "", model_id: str = "") -> list[int]:
        return [
            sid
            for sid, s in self.sessions.items()
            if s.configured
            and (not agent_id or s.agent_id == agent_id)
            and (not model_id or model_id in s.models)
        ]

    # --- inbound ---

    def on_bytes(self, sid: int, data: bytes, now: float) -> Step:
        step = Step()
        s = self.sessions.get(sid)
        if s is not None:
            self._absorb(sid, s.receive(data, now), step, now)
        return step

    def on_tick(self, now: float) -> Step:
        step = Step()
        for sid, s in list(self.sessions.items()):
            self._absorb(sid, s.tick(now), step, now)
        self.durable.expire(now, step)
        for key in [k for k, f in self.forwarded.items() if f.deadline <= now]:
            # no neighbour answered in time: the agent hears OVERLOADED, as alone
            step.merge_answers(self.on_forward_answer(key, None, "", 0, now))
        return step

    def next_deadline(self) -> float | None:
        times = [t for s in self.sessions.values() if (t := s.next_deadline()) is not None]
        times += [f.deadline for f in self.forwarded.values()]
        return min(times, default=None)

    def _absorb(self, sid: int, out: Output, step: Step, now: float) -> None:
        s = self.sessions.get(sid)
        step.send.extend((sid, env) for env in out.send)
        step.errors.extend(out.errors)
        for ev in out.events:
            if isinstance(ev, PkgInReceived):
                self._admit(sid, s, ev, step, now)
            elif isinstance(ev, Ready):
                self._replace_older(sid, s.agent_id, step, now)
                step.ready.append(sid)
                undetected = sorted(m for m in s.models if m not in self.detected_models)
                if undetected:
                    step.undetected.append((s.agent_id, tuple(undetected)))
                for model_id, m in s.models.items():
                    want = self.expected.get(model_id)
                    if want and want.model_digest and m.model_digest != want.model_digest:
                        step.other_models.append(
                            (s.agent_id, model_id, m.model_digest, want.model_digest)
                        )
                step.send.extend((sid, env) for env in self._resync(s, now, step))
            elif isinstance(ev, ReplyReceived):
                step.replies.append((sid, ev.xid, ev.env))
            elif isinstance(ev, HandshakeRefused):
                step.refused.append((sid, ev.claimed_agent_id, ev.reason))
            elif isinstance(ev, Closed):
                self.sessions.pop(sid, None)
                step.closed.append((sid, ev.reason))

    def _replace_older(self, sid: int, agent_id: str, step: Step, now: float) -> None:
        """A new connection of an agent replaces the old one (as the proto says): one
        agent id, one session, so the admin API and RT pushes never see two."""
        for other_sid, other in list(self.sessions.items()):
            if other_sid != sid and other.configured and other.agent_id == agent_id:
                step.replaced.append((other_sid, agent_id))
                reason = f"replaced by a new connection of agent {agent_id!r}"
                self._absorb(other_sid, other.close(reason), step, now)

    def _resync(self, s: AgentSession, now: float, step: Step) -> list[pb.Envelope]:
        """DELETE all, ADD the desired rules, push known RT entries, BARRIER.

        The rules keep their hard deadlines: each carries what remains of its hard
        timeout, and expired ones are left out (a reconnect never extends a block).
        Idle timers restart on the agent.
        """
        table = self.durable.for_agent(s.agent_id, s.models, now, step)
        out = [s.request(rules.vigilance_mod(rules.DELETE))]
        out += [s.request(mod) for mod in table.snapshot(now)]
        for model_id in s.models:
            entries = self.rt.entries(model_id, now)
            if entries:
                out.append(s.request(tables.rt_push(model_id, entries)))
        out.append(s.request(pb.BarrierRequest()))
        return out

    def _take_tokens(self, s: AgentSession, n: int, now: float) -> bool:
        """The agent's rate limit (a token bucket of ``max_rate_per_agent`` items/s and
        ``rate_burst`` items); always true when the rate is 0 (off)."""
        rate = self.cfg.max_rate_per_agent
        if rate <= 0:
            return True
        tokens, at = self._buckets.get(s.agent_id, (float(self.cfg.rate_burst), now))
        tokens = min(float(self.cfg.rate_burst), tokens + (now - at) * rate)
        ok = tokens >= n
        self._buckets[s.agent_id] = (tokens - n if ok else tokens, now)
        return ok

    def _admit(self, sid: int, s: AgentSession, ev: PkgInReceived, step: Step, now: float) -> None:
        pkg, n = ev.pkg, len(ev.pkg.items)
        reason = 0
        if self.draining:
            reason = pb.UNKNOWN_REASON_SHUTTING_DOWN
        elif pkg.model_id not in self.detected_models:
            reason = pb.UNKNOWN_REASON_NO_DETECTOR
        elif s.in_flight_items > self.cfg.max_in_flight_per_agent or not self._take_tokens(
            s, n, now
        ):
            # per agent an in-flight cap and a rate, so one busy agent cannot take the
            # whole workload from the others
            reason = pb.UNKNOWN_REASON_OVERLOADED
            step.overloaded += n
        elif self.workload + n > self.cfg.max_workload:  # W0 for the controller
            if self._forward(s, sid, ev, step, now):
                return
            reason = pb.UNKNOWN_REASON_OVERLOADED
            step.overloaded += n
        if reason:
            body = pb.PkgOut(model_id=pkg.model_id, items=_unknown_items(n, reason))
            step.send.append((sid, s.reply_to(ev.xid, body)))
            s.answered(ev.xid, n)
            step.verdicts.extend((pkg.model_id, pb.VERDICT_UNKNOWN) for _ in range(n))
            return
        self.workload += n
        step.jobs.append(InspectJob(sid, ev.xid, s.agent_id, pkg, now))

    # --- several controllers: work over W0 (controller/overflow.py) ---

    def _forward(
        self, s: AgentSession, sid: int, ev: PkgInReceived, step: Step, now: float
    ) -> bool:
        """Hand a PKG_IN over W0 to the neighbours, when one can take it and every
        item's budget covers the round trip a forward has cost so far."""
        pkg = ev.pkg
        budget = min(item.budget_us for item in pkg.items) * 1e-6
        if not self.neighbours_free or budget <= self.forward_rtt.estimate_s:
            return False  # also budget 0: nobody waits for the answer
        request = cpb.WorkRequest(
            agent_id=s.agent_id,
            model=s.models[pkg.model_id],
            pkg=pb.PkgIn(
                model_id=pkg.model_id,
                inputs=encode(pkg.inputs),
                logits=encode(pkg.logits) if pkg.logits is not None else None,
                items=pkg.items,
            ),
        )
        key = next(self._keys)
        self.forwarded[key] = ForwardJob(
            key, sid, ev.xid, s.agent_id, pkg.model_id, len(pkg.items), now + budget, request, now
        )
        step.forwards.append(self.forwarded[key])
        return True

    def on_forward_answer(
        self, key: int, pkg_out: pb.PkgOut | None, decider: str, refused: int, now: float
    ) -> Step:
        """A neighbour's answer to a forward (``pkg_out``), its refusal (``refused``), or
        none in time (both empty): the agent gets the verdicts, or UNKNOWN/OVERLOADED."""
        step = Step()
        job = self.forwarded.pop(key, None)
        if job is None:
            return step  # answered already (deadline), or never ours
        if pkg_out is not None and len(pkg_out.items) == job.size:
            self.forward_rtt.observe(now - job.sent_at)
            body = pb.PkgOut(model_id=job.model_id, items=pkg_out.items, decided_by=decider)
            step.verdicts.extend((job.model_id, i.verdict) for i in pkg_out.items)
        else:
            body = pb.PkgOut(
                model_id=job.model_id,
                items=_unknown_items(job.size, refused or pb.UNKNOWN_REASON_OVERLOADED),
            )
            step.overloaded += job.size
            step.verdicts.extend((job.model_id, pb.VERDICT_UNKNOWN) for _ in range(job.size))
        s = self.sessions.get(job.sid)
        if s is not None:
            s.answered(job.xid, job.size)
            if s.configured:
                step.send.append((job.sid, s.reply_to(job.xid, body)))
        return step

    def admit_work(
        self, sender: str, request: cpb.WorkRequest, reply_to: object, now: float
    ) -> Step:
        """Work a neighbour handed over (hop limit 1: scored here or refused, never
        passed on). The neighbour speaks for its agent; the model declaration and the
        items are checked here as an agent's are."""
        step = Step()
        model_id = request.pkg.model_id

        def refuse(reason: int, detail: str) -> Step:
            step.answers.append((reply_to, cpb.WorkAnswer(refused=reason, detail=detail)))
            return step

        if self.draining:
            return refuse(pb.UNKNOWN_REASON_SHUTTING_DOWN, "shutting down")
        if model_id not in self.detected_models or request.model.model_id != model_id:
            return refuse(pb.UNKNOWN_REASON_NO_DETECTOR, f"no detectors for {model_id[:64]!r}")
        problem = incompatible(model_id, request.model, self.expected.get(model_id))
        if problem:
            return refuse(pb.UNKNOWN_REASON_NO_DETECTOR, problem)
        try:
            decoded = validate_pkg_in(request.pkg, {model_id: request.model})
        except ProtocolError as exc:
            return refuse(pb.UNKNOWN_REASON_UNSPECIFIED, f"bad work from {sender}: {exc}")
        n = len(decoded.items)
        if self.workload + n > self.cfg.max_workload:
            return refuse(pb.UNKNOWN_REASON_OVERLOADED, "over W0 here too")
        job = InspectJob(REMOTE_SID, next(self._keys), request.agent_id, decoded, now)
        self._remote[job.xid] = reply_to
        self.workload += n
        step.jobs.append(job)
        return step

    # --- detector results ---

    def on_results(
        self,
        job: InspectJob,
        items: list[pb.PkgOutItem],
        now: float,
        timings: ScoreTimes | None = None,
    ) -> Step:
        """Answer a scored job: PKG_OUT, swift vigilance, source tracing, incidents.

        With ``timings`` (what the shell measured while scoring), the PKG_OUT carries
        the controller's stages (``pb.Timings``, see :func:`pkg_out_timings`).
        """
        step = Step()
        self.workload -= job.size
        model_id = job.pkg.model_id
        s = self.sessions.get(job.sid)
        if s is not None:
            s.answered(job.xid, job.size)
        stages = None if timings is None else pkg_out_timings(job, timings, now)
        if s is not None and s.configured:
            body = pb.PkgOut(model_id=model_id, items=items, timings=stages)
            step.send.append((job.sid, s.reply_to(job.xid, body)))
        elif job.sid == REMOTE_SID and job.xid in self._remote:
            out = pb.PkgOut(model_id=model_id, items=items, timings=stages)
            step.answers.append((self._remote.pop(job.xid), cpb.WorkAnswer(pkg_out=out)))
        pushed: list[pb.LabelEntry] = []
        base_fpr = self._fpr(model_id)
        for i, (item, out) in enumerate(zip(job.pkg.items, items, strict=True)):
            step.verdicts.append((model_id, out.verdict))
            adversarial = out.verdict == pb.VERDICT_ADVERSARIAL
            key = (job.agent_id, item.source_id)
            if item.source_id and key not in self.durable.blocked:
                decision = self.tracer.observe(key, adversarial, base_fpr, now)
                if decision is not None:
                    self._block(decision, now, step)
            if not adversarial:
                continue
            corrected = out.corrected_label if out.HasField("corrected_label") else None
            if item.fingerprint and self.cfg.rt_push:
                # Trust boundary: the entry goes to every agent of the model, so its key
                # is the controller's own fingerprint of what it scored, never the claim.
                fp = tables.fingerprint(job.pkg.inputs[i], self._fp_key)
                if fp != item.fingerprint:
                    step.fingerprint_mismatches.append((job.agent_id, model_id))
                else:
                    near_key, near_sketch = perceptual(job.pkg.inputs[i])
                    entry = tables.label_entry(
                        fp,
                        item.label,
                        pb.VERDICT_ADVERSARIAL,
                        action=out.action,
                        corrected_label=corrected,
                        score=out.score,
                        ttl_s=self.cfg.rt_ttl_s,
                        # agents also refuse near-copies of it: the key is the
                        # controller's own, from the input it scored
                        near_key=near_key,
                        near_sketch=near_sketch,
                    )
                    rt_entry = tables.ResultEntry.from_pb(entry, now)
                    self.rt.put((model_id, fp, item.label), rt_entry)
                    pushed.append(entry)
                    step.rt_added.append((model_id, entry, rt_entry.expires_at))
            step.incidents.append(
                Incident(
                    at=now,
                    agent_id=job.agent_id,
                    model_id=model_id,
                    source_id=item.source_id,
                    label=item.label,
                    corrected_label=corrected,
                    score=out.score,
                    evidence=json.dumps(
                        [
                            {
                                "detector": e.detector,
                                "score": round(e.score, 6),
                                "threshold": round(e.threshold, 6),
                                "flagged": e.flagged,
                            }
                            for e in out.evidence
                        ]
                    ),
                )
            )
        if pushed:  # swift vigilance: every other agent of the model refuses it at once
            mod = tables.rt_push(model_id, pushed)
            for sid in self.sessions_of(model_id=model_id):
                if sid != job.sid:
                    step.send.append((sid, self.sessions[sid].request(mod)))
        return step

    def _fpr(self, model_id: str) -> float:
        model = self.cfg.models.get(model_id)
        return model.fpr if model is not None else 0.01

    def _block(self, d: TraceDecision, now: float, step: Step) -> None:
        """Source tracing fired: DROP the source on its own agent (desired state too,
        stored with its absolute expiry: neither a reconnect nor a restart extends it)."""
        mod = self.durable.block(d.key, now, self.cfg.block_hard_timeout_s)
        step.persist_blocks = True
        step.blocked.append(d)
        until = self.durable.blocked[d.key]
        step.blocks_added.append((d.key, until or None))
        step.merge(self.mod_rules(mod, now, agent_id=d.key[0])[0])

    def unblock(self, key: tuple[str, str], now: float) -> Step:
        """An operator lifts a block (agent_id, source_id): its DROP rule leaves the
        agent's desired table and live session (if the source is blocked here), and the
        other controllers are told either way (``Step.blocks_removed``: the block may
        have reached them and not this one yet)."""
        step = Step(blocks_removed=[key])
        mod = self.durable.unblock(key)
        if mod is not None:
            step.persist_blocks = True
            step.merge(self.mod_rules(mod, now, agent_id=key[0])[0])
        return step

    # --- several controllers (controller/cluster.py) ---

    def apply_remote(
        self,
        now: float,
        *,
        rt: Iterable[tuple[str, pb.LabelEntry, float | None]] = (),
        rt_removed: Iterable[tuple[str, bytes, int]] = (),
        blocks: Iterable[tuple[tuple[str, str], float | None]] = (),
        unblocked: Iterable[tuple[str, str]] = (),
    ) -> Step:
        """What other controllers decided (a merge's changes, expiries in core time,
        None: never), applied here as if decided here: RT entries go into the
        controller's RT (replayed at resync) and to every agent of the model on this
        controller; blocks and unblocks change the agent's desired table (made from the
        template if the agent was never seen here, so it waits for it) and its live
        session. None of it goes back to the cluster."""
        step = Step()
        pushes: dict[str, list[pb.LabelEntry]] = {}
        for model_id, entry, until in rt:
            if until is not None and until <= now:
                continue
            local = tables.ResultEntry.from_pb(entry, now)
            local.expires_at = until
            self.rt.put((model_id, entry.fingerprint, entry.label), local)
            pushes.setdefault(model_id, []).append(local.to_pb(entry.fingerprint, entry.label, now))
        deletes: dict[str, list[pb.LabelEntry]] = {}
        for model_id, fp, label in rt_removed:
            if self.rt.delete((model_id, fp, label)):
                deletes.setdefault(model_id, []).append(pb.LabelEntry(fingerprint=fp, label=label))
        for model_id, entries in deletes.items():
            mod = pb.TableMod(
                table=pb.LABEL_TABLE_RT,
                command=pb.TABLE_MOD_COMMAND_DELETE,
                model_id=model_id,
                entries=entries,
            )
            for sid in self.sessions_of(model_id=model_id):
                step.send.append((sid, self.sessions[sid].request(mod)))
        for model_id, entries in pushes.items():
            mod = tables.rt_push(model_id, entries)
            for sid in self.sessions_of(model_id=model_id):
                step.send.append((sid, self.sessions[sid].request(mod)))
        for key, until in blocks:
            if until is not None and until <= now:
                continue
            mod = self.durable.block_until(key, until, now)
            step.persist_blocks = True
            step.merge(self.mod_rules(mod, now, agent_id=key[0])[0])
        for key in unblocked:
            mod = self.durable.unblock(key)
            if mod is not None:
                step.persist_blocks = True
                step.merge(self.mod_rules(mod, now, agent_id=key[0])[0])
        return step

    # --- desired state (controller/desired.py): durable, and rules as code ---

    def restore(self, state: DesiredState, now: float) -> Step:
        """The desired state a previous run stored (:meth:`DesiredRules.restore`); call
        once, before any session and before :meth:`reload_rules`."""
        step = Step()
        self.durable.restore(state, now, step)
        return step

    def reload_rules(self, specs: Iterable[RuleConfig], now: float) -> tuple[Step, RulesDiff]:
        """Rules as code: the config's ``rules`` become the config rules in force in
        desired state (:meth:`DesiredRules.reload`: at start, after :meth:`restore`, and
        on SIGHUP), and live agents get the changes at once. Returns the Step and the
        diff against the config rules in force before."""
        step = Step()
        diff, changed = self.durable.reload(specs, now, step)
        for agent_id, mods in changed:
            for sid in self.sessions_of(agent_id=agent_id):
                s = self.sessions[sid]
                step.send += [(sid, s.request(mod)) for mod in mods]
        return step, diff

    # --- introspection ---

    def snapshot(self) -> CoreSnapshot:
        # list() copies: a scrape thread may call this while the event loop mutates.
        sessions = list(self.sessions.values())
        return CoreSnapshot(
            sessions=len(sessions),
            agents=sum(1 for s in sessions if s.configured),
            workload=self.workload,
            rt_entries=len(self.rt),
            blocked_sources=len(self.durable.blocked),
            template_rules=len(self.durable.template),
            agent_rules=sum(len(t) for t in list(self.durable.agent_rules.values())),
        )

    # --- operator ---

    def mod_rules(
        self, mod: pb.VigilanceMod, now: float, *, agent_id: str = "", model_id: str = ""
    ) -> tuple[Step, list[tuple[int, int, int, str]]]:
        """Apply an operator's VIGILANCE_MOD to the desired rules and the live agents.

        The scope: no filter changes the template and every agent's table; ``agent_id``
        that agent's table (made now from the template if the agent was never seen, so
        the mod waits for it); ``model_id`` the tables of the connected agents serving
        that model.

        Returns (a Step: messages to send and the scopes to store; [(sid, mod xid,
        barrier xid, agent id)] to await). Raises ProtocolError when the mod is invalid
        (checked on the desired tables first, so a bad mod reaches no agent).
        """
        step = Step()
        serving = None  # with a model filter: the agents whose sessions declared it
        if model_id:
            serving = {s.agent_id for s in self.sessions.values() if model_id in s.models}
        self.durable.apply(mod, now, step, agent_id=agent_id, serving=serving)
        waits: list[tuple[int, int, int, str]] = []
        for sid in self.sessions_of(agent_id, model_id):
            s = self.sessions[sid]
            env = s.request(mod)
            barrier = s.request(pb.BarrierRequest())
            step.send += [(sid, env), (sid, barrier)]
            waits.append((sid, env.xid, barrier.xid, s.agent_id))
        return step, waits

    def stats_requests(
        self, filt: pb.StatsRequest, *, agent_id: str = "", model_id: str = ""
    ) -> list[tuple[int, pb.Envelope, str]]:
        return [
            (sid, self.sessions[sid].request(filt), self.sessions[sid].agent_id)
            for sid in self.sessions_of(agent_id, model_id)
        ]
