"""The controller's decision core, sans-I/O (Faucet's Valve, for DeSVig).

It owns the agent sessions, the desired vigilance rules per agent, the
controller-wide RT (for swift vigilance and resync), workload admission (W vs W0),
source tracing and incidents. The gRPC shim feeds it bytes, ticks and detector
results, each with ``now``; it returns a :class:`Step` saying what to send, what to
score and what to record. No sockets, no clocks, no threads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from controller.config import Config, RuleConfig, trace_params
from controller.session import (
    AgentSession,
    Closed,
    Output,
    PkgInReceived,
    Ready,
    ReplyReceived,
)
from controller.tracing import SourceTracer, TraceDecision
from openexample import rules, tables
from openexample.errors import ProtocolError
from openexample.identity import Identity
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn

# Rules the controller installs by itself carry a cookie in these ranges, so an
# operator can list or delete them with a cookie mask.
COOKIE_KIND_MASK = 0xFFFF_0000_0000_0000
COOKIE_DEFAULT = 0x0E00_0000_0000_0000
COOKIE_BLOCK = 0x0EB0_0000_0000_0000
COOKIE_CONFIG = 0x0EC0_0000_0000_0000  # rules as code: the low 48 bits hash the entry
BLOCK_PRIORITY = 0xFF00
_ALL_COOKIE_BITS = 0xFFFF_FFFF_FFFF_FFFF
# The template's scope in desired state (agent ids are never empty).
TEMPLATE = ""


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


@dataclass(frozen=True, slots=True)
class StoredRule:
    """A desired rule as the store keeps it: the ADD as first given (its full hard
    timeout) and when it was installed, in the core's time (the shell converts to and
    from unix time). Its hard timeout runs from ``installed_at``, across restarts."""

    mod: pb.VigilanceMod
    installed_at: float


@dataclass(slots=True)
class DesiredState:
    """The durable part of the core: the desired rules per scope (TEMPLATE or an agent
    id, in install order) and the blocked sources (expiry in core time, 0: none)."""

    tables: dict[str, list[StoredRule]] = field(default_factory=dict)
    blocks: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass(slots=True)
class RulesDiff:
    """What a reload of the config's rules changed, entry by entry (an entry is its
    scope, priority and match)."""

    added: list[RuleConfig] = field(default_factory=list)
    removed: list[RuleConfig] = field(default_factory=list)
    changed: list[tuple[RuleConfig, RuleConfig]] = field(default_factory=list)  # (old, new)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self) -> str:
        parts = [f"added {r.describe()}" for r in self.added]
        parts += [f"removed {r.describe()}" for r in self.removed]
        parts += [f"changed {o.describe()} -> {n.describe()}" for o, n in self.changed]
        n = (len(self.added), len(self.removed), len(self.changed))
        counts = "{} added, {} removed, {} changed".format(*n)
        return counts + (": " + "; ".join(parts) if parts else "")


@dataclass(slots=True)
class Step:
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
    verdicts: list[tuple[str, int]] = field(default_factory=list)  # (model, Verdict)
    overloaded: int = 0
    # Desired state that changed and must be stored (controller/store.py) before the
    # next step: rule scopes (TEMPLATE or an agent id; read them with
    # ControllerCore.desired) and, when persist_blocks, the blocked sources
    # (ControllerCore.blocks).
    persist: set[str] = field(default_factory=set)
    persist_blocks: bool = False
    # Changes to desired state an operator should find in the log (config rules put
    # back or removed, stored rules dropped at a restore).
    notes: list[str] = field(default_factory=list)

    def merge(self, other: Step) -> Step:
        """``other``'s messages, what to store and notes, added to this step (the
        parts an operator's or the config's rule changes produce)."""
        self.send.extend(other.send)
        self.persist |= other.persist
        self.persist_blocks = self.persist_blocks or other.persist_blocks
        self.notes.extend(other.notes)
        return self


@dataclass(frozen=True, slots=True)
class _ConfigRule:
    """A config rule as applied: its ADD (with its COOKIE_CONFIG cookie), its entry key
    (scope, priority, match) and its compiled actions."""

    spec: RuleConfig
    mod: pb.VigilanceMod
    key: tuple[tuple[str, str], int, rules.RuleMatch]
    actions: rules.RuleActions


def _scope_name(scope: str) -> str:
    return "the template" if scope == TEMPLATE else f"agent {scope!r}"


def _unknown_items(n: int, reason: int) -> list[pb.PkgOutItem]:
    item = pb.PkgOutItem(
        verdict=pb.VERDICT_UNKNOWN, action=pb.VERDICT_ACTION_RELEASE, unknown_reason=reason
    )
    return [item] * n


class ControllerCore:
    def __init__(self, cfg: Config, detected_models: set[str], now: float) -> None:
        self.cfg = cfg
        self.detected_models = detected_models  # model ids with a detector pipeline
        self.sessions: dict[int, AgentSession] = {}
        self.workload = 0  # W: items admitted and not answered yet
        self.draining = False  # shutting down: new PKG_INs are answered at once
        self._sid = itertools.count(1)
        self._miss = rules.RuleActions.from_pb([rules.inspect(cfg.budget_us, cfg.fail_mode)])
        # Desired rules: the template for agents not seen yet, and one table per agent
        # id (kept across reconnects, so a reconnecting agent gets what it had).
        self.template = rules.RuleTable(self._miss, now=now)
        self.agent_rules: dict[str, rules.RuleTable] = {}
        # What each known agent last declared (for model-scoped config rules and the
        # desired-state listing; in memory only: unknown after a restart until it
        # connects again).
        self._agent_models: dict[str, frozenset[str]] = {}
        # Rules as code (Config.rules) as last applied, by cookie; and per scope the
        # cookies of those put in that table since the last start or SIGHUP. A rule the
        # operator then deleted or changed is left so until the next SIGHUP or restart.
        self.config_rules: tuple[RuleConfig, ...] = ()
        self._config_mods: dict[int, tuple[RuleConfig, pb.VigilanceMod]] = {}
        self._config_applied: dict[str, set[int]] = {}
        self.rt = tables.ResultTable(max_entries=100_000)
        self.tracer = SourceTracer(trace_params(cfg))
        # (agent_id, source_id) -> block expiry (0: none). Sources are namespaced by the
        # authenticated agent: one agent's claims never block another agent's users.
        self._blocked: dict[tuple[str, str], float] = {}
        self._block_cookie = itertools.count(1)
        self._fp_key = cfg.fingerprint_key_bytes
        self._buckets: dict[str, tuple[float, float]] = {}  # agent -> (tokens, at)

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
        for scope, table in self._tables():
            n = len(table)
            table.expire(now)  # desired state follows the agents' own timeouts
            if len(table) != n:
                step.persist.add(scope)
        for src, until in list(self._blocked.items()):
            if until and now >= until:
                del self._blocked[src]
                step.persist_blocks = True
        return step

    def next_deadline(self) -> float | None:
        times = [t for s in self.sessions.values() if (t := s.next_deadline()) is not None]
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
                step.send.extend((sid, env) for env in self._resync(s, now, step))
            elif isinstance(ev, ReplyReceived):
                step.replies.append((sid, ev.xid, ev.env))
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
        self._agent_models[s.agent_id] = frozenset(s.models)
        table = self._agent_table(s.agent_id, now, step)
        self._reconcile(s.agent_id, table, now, step, readd=False)
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
        elif (
            self.workload + n > self.cfg.max_workload
            or s.in_flight_items > self.cfg.max_in_flight_per_agent
            or not self._take_tokens(s, n, now)
        ):
            # W0 for the controller; per agent an in-flight cap and a rate, so one busy
            # agent cannot take the whole workload from the others.
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
        if s is not None and s.configured:
            stages = None if timings is None else pkg_out_timings(job, timings, now)
            body = pb.PkgOut(model_id=model_id, items=items, timings=stages)
            step.send.append((job.sid, s.reply_to(job.xid, body)))
        pushed: list[pb.LabelEntry] = []
        base_fpr = self._fpr(model_id)
        for i, (item, out) in enumerate(zip(job.pkg.items, items, strict=True)):
            step.verdicts.append((model_id, out.verdict))
            adversarial = out.verdict == pb.VERDICT_ADVERSARIAL
            if item.source_id and (job.agent_id, item.source_id) not in self._blocked:
                key = (job.agent_id, item.source_id)
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
                    entry = tables.label_entry(
                        fp,
                        item.label,
                        pb.VERDICT_ADVERSARIAL,
                        action=out.action,
                        corrected_label=corrected,
                        score=out.score,
                        ttl_s=self.cfg.rt_ttl_s,
                    )
                    self.rt.put((model_id, fp, item.label), tables.ResultEntry.from_pb(entry, now))
                    pushed.append(entry)
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
        agent_id, source = d.key
        hard = self.cfg.block_hard_timeout_s
        self._blocked[d.key] = now + hard if hard else 0.0
        step.persist_blocks = True
        mod = rules.vigilance_mod(
            rules.ADD,
            match=pb.Match(source_id=source),
            priority=BLOCK_PRIORITY,
            actions=[rules.drop()],
            cookie=COOKIE_BLOCK | next(self._block_cookie),
            hard_timeout_s=hard,
            flags=rules.SEND_REMOVED,
        )
        step.blocked.append(d)
        step.merge(self.mod_rules(mod, now, agent_id=agent_id)[0])

    # --- desired state: durable (controller/store.py), and rules as code ---

    def _tables(self) -> Iterator[tuple[str, rules.RuleTable]]:
        yield TEMPLATE, self.template
        yield from list(self.agent_rules.items())

    def _copy_template(self, table: rules.RuleTable, now: float) -> None:
        """The template's rules into ``table`` with their install times: a hard timeout
        runs from when the rule was given, not from the copy."""
        entries = list(self.template)
        for rule in [entries[-1], *entries[:-1]]:
            table.restore(rule.to_mod(), rule.installed_at, now)

    def _agent_table(self, agent_id: str, now: float, step: Step) -> rules.RuleTable:
        """The agent's desired table; a new one is a copy of the template."""
        table = self.agent_rules.get(agent_id)
        if table is None:
            table = rules.RuleTable(self._miss, now=now)
            self._copy_template(table, now)
            self.agent_rules[agent_id] = table
            # Config rules the template had count as given to this table too: one the
            # operator deleted from all agents stays deleted for a new one.
            self._config_applied[agent_id] = set(self._config_applied.get(TEMPLATE, ()))
            step.persist.add(agent_id)
        return table

    def desired(self, scope: str) -> list[StoredRule] | None:
        """What the store keeps of a scope (TEMPLATE or an agent id), in install order;
        None if there is no such table. The default table-miss is left out: it comes
        from the config (budget_us, fail_mode) at each start; an operator's change to it
        is kept."""
        table = self.template if scope == TEMPLATE else self.agent_rules.get(scope)
        if table is None:
            return None
        *rest, miss = table
        out = []
        default = miss.actions == table.miss_actions and not (miss.cookie or miss.flags)
        if not default:
            out.append(StoredRule(miss.to_mod(), miss.installed_at))
        out += [StoredRule(r.to_mod(), r.installed_at) for r in rest]
        return out

    def blocks(self) -> dict[tuple[str, str], float]:
        """The blocked sources: (agent_id, source_id) -> expiry (0: none)."""
        return dict(self._blocked)

    def desired_state(self) -> DesiredState:
        """Everything the store keeps (:meth:`restore` takes it back)."""
        tables = {scope: self.desired(scope) or [] for scope, _ in self._tables()}
        return DesiredState(tables, self.blocks())

    def restore(self, state: DesiredState, now: float) -> Step:
        """The desired state a previous run stored; call once, before any session and
        before :meth:`reload_rules`.

        Hard timeouts keep their deadlines: a rule (or block) whose deadline passed while
        the controller was down is dropped, the others expire when they would have. Idle
        timers restart now: the agents' idle time is not stored.
        """
        step = Step()
        dropped = 0
        for scope, stored in state.tables.items():
            table = rules.RuleTable(self._miss, now=now)
            for r in stored:
                hard = r.mod.hard_timeout_s
                if hard and now >= r.installed_at + hard:
                    dropped += 1
                    step.persist.add(scope)
                    continue
                try:
                    table.restore(r.mod, r.installed_at, now)
                except ProtocolError as exc:
                    step.persist.add(scope)
                    step.notes.append(
                        f"stored rule prio={r.mod.priority} match={rules.match_text(r.mod.match)}"
                        f" for {_scope_name(scope)} dropped: {exc}"
                    )
            if scope == TEMPLATE:
                self.template = table
            else:
                self.agent_rules[scope] = table
        for key, until in state.blocks.items():
            if until and now >= until:
                step.persist_blocks = True
                continue
            self._blocked[key] = until
        # New blocks take cookies after the highest one in use.
        in_use = [
            r.cookie & ~COOKIE_KIND_MASK
            for _, t in self._tables()
            for r in t
            if r.cookie & COOKIE_KIND_MASK == COOKIE_BLOCK
        ]
        self._block_cookie = itertools.count(max(in_use, default=0) + 1)
        n_rules = sum(len(t) - 1 for _, t in self._tables())
        step.notes.append(
            f"restored {n_rules} rules for {len(self.agent_rules)} agents"
            f" and the template, {len(self._blocked)} blocked sources"
            + (f"; {dropped} rules expired while the controller was down" if dropped else "")
        )
        return step

    def reload_rules(self, specs: Iterable[RuleConfig], now: float) -> tuple[Step, RulesDiff]:
        """Rules as code: make the config's ``rules`` the config rules in force (at
        start, after :meth:`restore`, and on SIGHUP).

        Each table gets the config rules of its scope (all agents, one agent, or the
        agents serving a model, once the agent has said which models it serves); rules
        no longer in the config leave; a config rule an operator deleted or changed
        through the admin API is put back (a note says so). Operator rules are never
        touched: config rules are told apart by their cookie (COOKIE_CONFIG, the low bits
        a hash of the entry). Live agents get the changes at once. Returns the Step and
        the diff against the config rules in force before.
        """
        specs = tuple(specs)
        entries: dict[int, _ConfigRule] = {}
        for spec in specs:
            mod = spec.to_mod(self.cfg.budget_us)
            kind, who = spec.scope
            digest = hashlib.blake2b(f"{kind}\0{who}\0".encode(), digest_size=6)
            digest.update(mod.SerializeToString(deterministic=True))
            mod.cookie = COOKIE_CONFIG | int.from_bytes(digest.digest(), "big")
            key = (spec.scope, spec.priority, rules.RuleMatch.from_pb(mod.match))
            actions = rules.RuleActions.from_pb(mod.actions)
            entries[mod.cookie] = _ConfigRule(spec, mod, key, actions)
        old = {e.key: e for e in self._config_mods.values()}
        new = {e.key: e for e in entries.values()}
        diff = RulesDiff(
            added=[e.spec for k, e in new.items() if k not in old],
            removed=[e.spec for k, e in old.items() if k not in new],
            changed=[
                (old[k].spec, e.spec)
                for k, e in new.items()
                if k in old and old[k].mod.cookie != e.mod.cookie
            ],
        )
        self.config_rules = specs
        self._config_mods = entries
        step = Step()
        for spec in specs:
            if spec.agent:  # listed as desired state before the agent ever connects
                self._agent_table(spec.agent, now, step)
        for scope, table in self._tables():
            mods = self._reconcile(scope, table, now, step, readd=True)
            if scope != TEMPLATE and mods:
                for sid in self.sessions_of(agent_id=scope):
                    s = self.sessions[sid]
                    step.send += [(sid, s.request(mod)) for mod in mods]
        return step, diff

    def _config_for(self, entry: _ConfigRule, scope: str) -> bool | None:
        """Whether a config rule belongs in ``scope``'s table; None: not known yet (a
        model-scoped rule and an agent whose models are not known since the start)."""
        kind, who = entry.spec.scope
        if scope == TEMPLATE:
            return kind == "all"
        if kind == "all":
            return True
        if kind == "agent":
            return who == scope
        models = self._agent_models.get(scope)
        return None if models is None else who in models

    def _reconcile(
        self, scope: str, table: rules.RuleTable, now: float, step: Step, *, readd: bool
    ) -> list[pb.VigilanceMod]:
        """Bring ``table``'s config rules in line with the config: remove those no
        longer in it (or not for this scope), add those missing. With ``readd`` (start,
        SIGHUP) one an operator deleted or changed is put back; without (an agent's
        resync) only rules this table never had are added. Returns the mods, applied to
        ``table`` already (the caller sends them to a live agent)."""
        applied = self._config_applied.setdefault(scope, set())
        mods: list[pb.VigilanceMod] = []
        for rule in list(table):
            if rule.cookie & COOKIE_KIND_MASK != COOKIE_CONFIG:
                continue
            entry = self._config_mods.get(rule.cookie)
            if entry is None or self._config_for(entry, scope) is False:
                mods.append(
                    rules.vigilance_mod(
                        rules.DELETE_STRICT,
                        match=rule.match,
                        priority=rule.priority,
                        cookie=rule.cookie,
                        cookie_mask=_ALL_COOKIE_BITS,
                    )
                )
                applied.discard(rule.cookie)
        for cookie, entry in self._config_mods.items():
            if not self._config_for(entry, scope):
                continue
            _, priority, match = entry.key
            rule = table.get(priority, match)
            if (
                rule is not None
                and rule.cookie == cookie
                and rule.actions == entry.actions
                and rule.flags == entry.mod.flags
                and not (rule.idle_timeout_s or rule.hard_timeout_s)
            ):
                applied.add(cookie)
                continue
            if cookie in applied:
                if not readd:
                    continue  # the operator deleted or changed it: so until SIGHUP/restart
                step.notes.append(
                    f"config rule {entry.spec.describe()} put back for {_scope_name(scope)}"
                    " (an operator had deleted or changed it)"
                )
            mods.append(entry.mod)
            applied.add(cookie)
        done = []
        for mod in mods:
            try:
                table.apply(mod, now)
            except ProtocolError as exc:  # e.g. the table is full
                step.notes.append(
                    f"config rule prio={mod.priority} match={rules.match_text(mod.match)}"
                    f" not installed for {_scope_name(scope)}: {exc}"
                )
                continue
            done.append(mod)
        if done:
            step.persist.add(scope)
        return done

    def desired_rules(
        self,
        filt: pb.StatsRequest,
        now: float,
        *,
        agent_id: str = "",
        model_id: str = "",
        template: bool = True,
    ) -> list[tuple[str, list[pb.RuleStats]]]:
        """The desired rules as STATS RULES (match counts 0: agents count, not the
        controller), per scope: the template (when ``template`` and neither filter is
        set), then each known agent passing the filters (``model_id``: the agents known
        to serve it since the start). Raises ProtocolError for a bad filter match."""
        match = filt.match if filt.HasField("match") else None
        out = []
        if template and not agent_id and not model_id:
            out.append((TEMPLATE, self.template.stats(match, filt.cookie, filt.cookie_mask, now)))
        for aid in sorted(self.agent_rules):
            if agent_id and aid != agent_id:
                continue
            if model_id and model_id not in self._agent_models.get(aid, ()):
                continue
            table = self.agent_rules[aid]
            out.append((aid, table.stats(match, filt.cookie, filt.cookie_mask, now)))
        return out

    # --- introspection ---

    def snapshot(self) -> CoreSnapshot:
        # list() copies: a scrape thread may call this while the event loop mutates.
        sessions = list(self.sessions.values())
        return CoreSnapshot(
            sessions=len(sessions),
            agents=sum(1 for s in sessions if s.configured),
            workload=self.workload,
            rt_entries=len(self.rt),
            blocked_sources=len(self._blocked),
            template_rules=len(self.template),
            agent_rules=sum(len(t) for t in list(self.agent_rules.values())),
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
        if agent_id and agent_id not in self.agent_rules and not model_id:
            scratch = rules.RuleTable(self._miss, now=now)  # validate before making a table
            self._copy_template(scratch, now)
            scratch.apply(mod, now)
            self._agent_table(agent_id, now, step)
        targets = [
            (aid, t)
            for aid, t in self.agent_rules.items()
            if (not agent_id or aid == agent_id)
            and (not model_id or model_id in self._models_of(aid))
        ]
        if not agent_id and not model_id:
            self.template.apply(mod, now)
            step.persist.add(TEMPLATE)
        for aid, table in targets:
            table.apply(mod, now)
            step.persist.add(aid)
        waits: list[tuple[int, int, int, str]] = []
        for sid in self.sessions_of(agent_id, model_id):
            s = self.sessions[sid]
            env = s.request(mod)
            barrier = s.request(pb.BarrierRequest())
            step.send += [(sid, env), (sid, barrier)]
            waits.append((sid, env.xid, barrier.xid, s.agent_id))
        return step, waits

    def _models_of(self, agent_id: str) -> set[str]:
        return {m for s in self.sessions.values() if s.agent_id == agent_id for m in s.models}

    def stats_requests(
        self, filt: pb.StatsRequest, *, agent_id: str = "", model_id: str = ""
    ) -> list[tuple[int, pb.Envelope, str]]:
        return [
            (sid, self.sessions[sid].request(filt), self.sessions[sid].agent_id)
            for sid in self.sessions_of(agent_id, model_id)
        ]
