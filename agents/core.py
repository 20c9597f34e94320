"""The agent's sans-I/O core: the agent's side of the session, decisions, settlement.

Plain objects that take messages and a ``now`` and return what to do, like Faucet's
Valve: :mod:`agents.transport` feeds it bytes and ticks and carries out the returned
:class:`AgentOutput` (send, wake the settled tickets' waiters, deliver retractions,
close); :mod:`agents.guard` calls :meth:`AgentCore.decide` per inference. No clock, no
threads: the shell holds one lock around every call (all calls are short).

The protocol rules both planes share (handshake, versions, echo liveness, barriers,
typed errors) live in :class:`openexample.session.Session`; a new one is made per
stream. What is the agent's own: answering FEATURES, applying the controller's rule and
table mods, STATS and ROLE, and turning PKG_OUT verdicts into results.

Per inference: the rule table says who decides. ALLOW / DROP (with an optional MIRROR or
SAMPLE copy) decide at once. INSPECT looks up RT by (model, fingerprint, label): a hit
decides at once; else the input joins a pending FT entry or goes into the next PKG_IN
batch, and the caller gets a :class:`Ticket` to wait on for at most the rule's budget.
See docs/architecture.md for one inference's whole path.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from agents.config import AgentConfig
from agents.counters import AgentCounters, AgentSnapshot, TableCounts
from agents.outbox import Outbox, build_pkg_in, items_that_fit
from agents.results import (
    CONTROLLER,
    DISCONNECTED,
    RT,
    RULE,
    STANDALONE,
    TIMEOUT,
    UNKNOWN,
    VERDICT_NAMES,
    Batch,
    ControllerTimings,
    Item,
    ModelInfo,
    Result,
    Stages,
    Ticket,
    outcome,
)
from openexample.errors import PeerError, ProtocolError, bad_request
from openexample.messages import PROTOCOL_VERSION
from openexample.perceptual import perceptual
from openexample.rules import ALLOW, INSPECT, RuleActions, RuleTable, parse_fail_mode
from openexample.session import Closed, Established, Output, PeerHello, Received, Session, State
from openexample.tables import Key, LabelTables, PendingTable, ResultEntry, ResultTable, fingerprint
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

# "overloaded", "no_detector", ... for Result.reason.
UNKNOWN_REASONS = {
    v: pb.UnknownReason.Name(v).removeprefix("UNKNOWN_REASON_").lower()
    for v in pb.UnknownReason.values()
}


@dataclass(slots=True)
class AgentOutput:
    """What the shell does after a core call."""

    send: list[pb.Envelope] = field(default_factory=list)
    settled: list[Ticket] = field(default_factory=list)  # wake their waiters
    retractions: list[Result] = field(default_factory=list)  # late verdicts, for the caller
    established: bool = False  # the session just reached MAIN
    close: str = ""  # end the stream after sending ``send``: why
    errors: list[str] = field(default_factory=list)  # typed errors we sent, by name


class AgentCore:
    """One agent's protocol state and tables; see the module docstring."""

    def __init__(
        self,
        agent_id: str,
        models: Sequence[ModelInfo],
        config: AgentConfig,
        *,
        now: float,
        wall_offset_s: float = 0.0,
    ) -> None:
        self.agent_id = agent_id
        self.config = config
        self.models = {m.model_id: m for m in models}
        miss = RuleActions(INSPECT, config.budget_us, parse_fail_mode(config.fail_mode))
        self.rules = RuleTable(miss, max_rules=config.max_rules, now=now)
        self.tables = LabelTables(
            ResultTable(config.rt_max_entries, default_ttl_s=config.rt_ttl_s),
            PendingTable(config.ft_max_entries),
            near_radius=config.near_copy_radius,
        )
        self.outbox = Outbox(min(config.max_batch_items, config.limits.max_batch_items))
        # Wall clock = now + offset: PKG_IN's inferred_at_ns, for stage timings.
        self.wall_offset_s = wall_offset_s
        self._fp_key = config.fingerprint_key
        self._random = random.Random(config.seed).random
        self._np_rng = np.random.default_rng(config.seed)  # privacy noise; I/O side only
        self._xid_start = random.Random(config.seed).randrange(1, 1 << 31)
        self.started_at = now
        self.counters = AgentCounters()

        self.session: Session | None = None  # None: no stream
        # Why verdicts are decided without the controller (Result.reason), while they are
        self.outage = "no controller: not connected yet"
        self._no_detector_warned: set[str] = set()  # models warned of, this session
        # Per model, the activations this session's controller asked for (FEATURES_REQUEST)
        # among those declared: what build_pkg_in computes and sends.
        self.activations_asked: dict[str, tuple[str, ...]] = {}
        self._noted_default: tuple[int, int] | None = None  # the controller's, said once
        self.role = pb.CONTROLLER_ROLE_EQUAL
        self.generation_id: int | None = None
        self.controller_id = ""
        self._inflight: dict[Key, Item] = {}  # FT keys -> the item that carries them
        # (model, label) pairs for which the RT has held an ADVERSARIAL entry: only those
        # inferences pay for a fingerprint under an ALLOW rule, so a known attack is
        # refused even where rules allow, and the rest keep the fast path.
        self._rt_adversarial: set[tuple[str, int]] = set()

    # ---- the data path (caller threads, under the shell's lock) ---------------------

    def decide(
        self,
        model_id: str,
        x: np.ndarray,
        logits: np.ndarray,
        label: int,
        confidence: float,
        source_id: str,
        now: float,
    ) -> tuple[Result | Ticket, bool]:
        """Decide one inference now (Result) or hand back a Ticket to wait on. The flag
        says the outbox just became non-empty: the shell must schedule a flush."""
        self.counters.inferences += 1
        rule = self.rules.lookup(model_id, source_id, label, confidence, now)
        actions = rule.actions
        source = actions.verdict_source
        if source == ALLOW and (model_id, label) in self._rt_adversarial:
            fp = fingerprint(x, self._fp_key)
            entry = self.tables.rt.get((model_id, fp, label), now)
            if entry is not None and entry.verdict == pb.VERDICT_ADVERSARIAL:
                res = self._from_rt(entry, model_id, source_id, logits, label, confidence,
                                    actions.fail_mode)  # fmt: skip
                return res, False
            near = self.tables.near_copy(model_id, label, x, now)
            if near is not None:
                return self._from_rt(near[0], model_id, source_id, logits, label, confidence,
                                     actions.fail_mode, near[1]), False  # fmt: skip
        if source != INSPECT:  # ALLOW / DROP, maybe with a copy nobody waits for
            flush = False
            if actions.mirror:
                flush = self._copy(model_id, x, logits, label, confidence, source_id,
                                   rule.cookie, True, now)  # fmt: skip
            elif actions.sample_p and self._random() < actions.sample_p:
                flush = self._copy(model_id, x, logits, label, confidence, source_id,
                                   rule.cookie, False, now)  # fmt: skip
            self.counters.decided_locally += 1
            released = source == ALLOW
            res = self._decided(model_id, source_id, logits, label, confidence, released, RULE)
            return res, flush

        fail_mode = actions.fail_mode
        fp = fingerprint(x, self._fp_key)
        key = (model_id, fp, label)
        entry = self.tables.rt.get(key, now)
        if entry is not None:  # the verdict is already known
            res = self._from_rt(entry, model_id, source_id, logits, label, confidence, fail_mode)
            return res, False
        near = self.tables.near_copy(model_id, label, x, now)
        if near is not None:  # a near-copy of a known attack: refused without a round trip
            res = self._from_rt(near[0], model_id, source_id, logits, label, confidence,
                                fail_mode, near[1])  # fmt: skip
            return res, False
        if not self.sending:
            released = fail_mode == STANDALONE
            res = self._decided(
                model_id, source_id, logits, label, confidence, released, DISCONNECTED,
                reason=self.outage,
            )  # fmt: skip
            return res, False

        self.counters.inspected += 1
        budget_us = actions.budget_us
        ticket = Ticket(
            model_id, source_id, logits, label, confidence, fail_mode, now, now + budget_us * 1e-6
        )
        batch = self._batch_for(model_id)
        if self.tables.ft.begin(key, batch.xid, now) is not None:
            item = self._inflight.get(key)
            if item is not None:  # identical input already on its way: join it
                self.counters.ft_joined += 1
                item.tickets.append(ticket)
                return ticket, False
        reason = pb.PKG_IN_REASON_TABLE_MISS if rule.is_table_miss else pb.PKG_IN_REASON_ACTION
        item = Item(x, logits, label, confidence, source_id, reason, rule.cookie, fp, budget_us,
                    now)  # fmt: skip
        item.tickets.append(ticket)
        self._inflight[key] = item
        return ticket, self.outbox.add(batch, item)

    def expire_ticket(self, ticket: Ticket, now: float) -> Result:
        """The waiter's budget is over: its result, deciding by fail mode if still open."""
        if ticket.result is None:
            self._settle(ticket, pb.VERDICT_UNKNOWN, 0, None, TIMEOUT, now, None)
        return ticket.result  # type: ignore[return-value]

    def _from_rt(
        self,
        entry: ResultEntry,
        model_id: str,
        source_id: str,
        logits: np.ndarray,
        label: int,
        confidence: float,
        fail_mode: int,
        near_distance: int | None = None,
    ) -> Result:
        """A verdict the RT holds: for this input, or (``near_distance`` given) for a
        known attack it is a near-copy of, which the reason says."""
        reason = ""
        if near_distance is not None:
            self.counters.near_copies += 1
            reason = (
                f"near-copy of a known adversarial input ({near_distance} of 64 key bits differ)"
            )
        self.counters.decided_locally += 1
        self.counters.verdict(model_id, entry.verdict)
        name, released, out = outcome(
            entry.verdict, entry.action, entry.corrected_label, fail_mode, label
        )
        return self._decided(
            model_id, source_id, logits, label, confidence, released, RT, name, out, entry.score,
            reason,
        )  # fmt: skip

    def _decided(
        self,
        model_id: str,
        source_id: str,
        logits: np.ndarray,
        label: int,
        confidence: float,
        released: bool,
        decided_by: str,
        verdict: str = UNKNOWN,
        out_label: int | None = None,
        score: float | None = None,
        reason: str = "",
    ) -> Result:
        """A Result decided on the spot (rule, RT or no controller), counted."""
        res = Result(
            model_id,
            source_id,
            logits if released else None,
            label if out_label is None else out_label,
            label,
            confidence,
            verdict,
            decided_by,
            released,
            0.0,
            score,
            reason=reason,
        )
        self.counters.decision(res)
        return res

    def _copy(
        self,
        model_id: str,
        x: np.ndarray,
        logits: np.ndarray,
        label: int,
        confidence: float,
        source_id: str,
        cookie: int,
        mirror: bool,
        now: float,
    ) -> bool:
        """MIRROR / SAMPLE: send a copy nobody waits for (dropped while disconnected)."""
        if not self.sending:
            return False
        self.counters.mirrored += 1
        x = np.array(x, copy=True)  # the caller may reuse its buffer once we return
        reason = pb.PKG_IN_REASON_MIRROR if mirror else pb.PKG_IN_REASON_SAMPLED
        fp = fingerprint(x, self._fp_key)
        item = Item(x, logits, label, confidence, source_id, reason, cookie, fp, 0, now)
        return self.outbox.add(self._batch_for(model_id), item)

    def _batch_for(self, model_id: str) -> Batch:
        assert self.session is not None  # decide() sends only while a session is up
        return self.outbox.batch_for(model_id, self.session.request_xid)

    # ---- outbox (I/O thread) -------------------------------------------------------

    def take_outbox(self, now: float) -> list[Batch]:
        """Close the queued batches and mark them sent (build them with build_pkg_in)."""
        batches = self.outbox.take(now)
        self.counters.pkg_in += len(batches)
        self.counters.pkg_in_items += sum(len(b.items) for b in batches)
        return batches

    def build_pkg_in(self, batch: Batch) -> pb.Envelope:
        """The PKG_IN for a taken batch. Touches no shared state but the noise RNG, so
        the I/O thread runs it outside the lock."""
        version = self.session.version if self.session is not None else PROTOCOL_VERSION
        return build_pkg_in(
            batch,
            self.models[batch.model_id],
            self._np_rng,
            version=version,
            wall_offset_s=self.wall_offset_s,
            activations=self.activations_asked.get(batch.model_id, ()),
        )

    def flush(self, now: float) -> list[pb.Envelope]:
        """take_outbox + build_pkg_in in one go (tests, simple shells)."""
        return [self.build_pkg_in(b) for b in self.take_outbox(now)]

    def count_sent_bytes(self, n: int) -> None:
        self.counters.pkg_in_bytes += n

    # ---- session -------------------------------------------------------------------

    def connected(self, now: float) -> AgentOutput:
        """A stream is open: a fresh session, starting with our HELLO."""
        c = self.counters
        if c.sessions:
            c.reconnects += 1
        c.sessions += 1
        cfg = self.config
        self.session = Session(
            self.agent_id,
            limits=cfg.limits,
            echo_interval_s=cfg.echo_interval_s,
            echo_unreplied_limit=cfg.echo_unreplied_limit,
            handshake_timeout_s=cfg.handshake_timeout_s,
            xid_start=self._xid_start,
            now=now,
        )
        self.role = pb.CONTROLLER_ROLE_EQUAL
        self._no_detector_warned.clear()  # the controller may have changed: warn again
        return AgentOutput(send=self.session.start())

    def disconnected(self, now: float, reason: str = "") -> AgentOutput:
        """The stream is gone (``reason``: why, as the transport saw it): everyone waiting
        gets the fail mode at once, and every Result decided without the controller says
        why until a session is up again. Rules and RT stay; FT and in-flight batches are
        void (their xids die with the session)."""
        self.outage = f"no controller: {reason or 'the session ended'}"
        out = AgentOutput()
        if self.session is not None:
            self._xid_start = self.session.request_xid()  # xids never repeat across streams
        self.session = None
        self._inflight.clear()
        self.tables.ft.clear()
        for batch in self.outbox.clear():
            for item in batch.items:
                for t in item.tickets:
                    if t.result is None:
                        self._settle(
                            t, pb.VERDICT_UNKNOWN, 0, None, DISCONNECTED, now, out,
                            reason=self.outage,
                        )  # fmt: skip
        return out

    def receive(self, data: bytes, now: float) -> AgentOutput:
        """Bytes from the controller in, what to do out. Never raises on input."""
        out = AgentOutput()
        s = self.session
        if s is None:
            return out
        sout = s.receive(data, now)
        self._absorb(sout, out, now)
        return out

    def _absorb(self, sout: Output, out: AgentOutput, now: float) -> None:
        s = self.session
        assert s is not None
        out.send.extend(sout.send)
        out.errors.extend(sout.errors)
        for ev in sout.events:
            if isinstance(ev, Received):
                env = ev.env
                kind = env.WhichOneof("body") or ""
                try:
                    handler = self._HANDLERS.get(kind)
                    if handler is None:
                        raise bad_request(
                            pb.BAD_REQUEST_CODE_BAD_TYPE, f"agent does not accept {kind}"
                        )
                    handler(self, env, now, out)
                except ProtocolError as exc:
                    log.info("refused %s xid=%d: %s", kind, env.xid, exc)
                    s.refuse(out, exc.with_xid(exc.xid or env.xid), env)
            elif isinstance(ev, PeerHello):
                self.controller_id = ev.peer_id
                ob = self.outbox
                ob.max_batch_items = min(ob.max_batch_items, s.limits.max_batch_items)
            elif isinstance(ev, Established):
                out.established = True
            elif isinstance(ev, Closed):
                log.warning("session with controller %s ends: %s", self.controller_id, ev.reason)
                out.close = ev.reason

    # ---- the controller's messages ---------------------------------------------------

    def _on_features_request(self, env: pb.Envelope, now: float, out: AgentOutput) -> None:
        caps = [pb.CAPABILITY_BATCHING, pb.CAPABILITY_RETRACTION, pb.CAPABILITY_LABEL_TABLES]
        if any(
            m.privacy is not None and m.privacy.mechanism != "none" for m in self.models.values()
        ):
            caps.insert(1, pb.CAPABILITY_PRIVACY_NOISE)
        self.activations_asked = self._asked(env.features_request)
        assert self.session is not None
        for model_id, names in self.activations_asked.items():
            fit = items_that_fit(self.models[model_id], names, self.session.limits)
            if fit < self.outbox.max_batch_items:  # declared below, so the controller knows
                log.info(
                    "PKG_IN batches of at most %d items: model %r's activations fill the"
                    " session's limits",
                    fit,
                    model_id,
                )
                self.outbox.max_batch_items = fit
        body = pb.FeaturesReply(
            agent_id=self.agent_id,
            models=[m.descriptor() for m in self.models.values()],
            capabilities=caps,
            max_batch_items=self.outbox.max_batch_items,
        )
        out.send.append(self.session.reply(env, body))

    def _asked(self, req: pb.FeaturesRequest) -> dict[str, tuple[str, ...]]:
        """The activations to send per model: those asked that this agent declares with
        the shape asked; one log line per model for the rest (INFO when it declares
        none: the controller computes them or refuses; WARNING when it declares others)."""
        asked: dict[str, tuple[str, ...]] = {}
        for want in req.activations:
            info = self.models.get(want.model_id)
            if info is None:
                continue  # a model of other agents: the ask goes to every agent
            have = info.declared_activations()
            names, unmet = [], []
            for a in want.activations:
                if have.get(a.name) == tuple(a.shape):
                    names.append(a.name)
                else:
                    unmet.append(f"{a.name[:64]} {tuple(a.shape)[:8]}")
            if unmet:
                log.log(
                    logging.WARNING if have else logging.INFO,
                    "controller %s asks for activations %s of model %r; this agent declares"
                    " %s: not sent",
                    self.controller_id,
                    ", ".join(unmet[:8]),
                    want.model_id[:64],
                    ", ".join(f"{n} {sh}" for n, sh in have.items()) or "none",
                )
            if names:
                asked[want.model_id] = tuple(dict.fromkeys(names))
                log.info("sending activations of model %r: %s", want.model_id, ", ".join(names))
        return asked

    def _check_writable(self) -> None:
        if self.role == pb.CONTROLLER_ROLE_SLAVE:
            raise bad_request(pb.BAD_REQUEST_CODE_IS_SLAVE, "controller is SLAVE")

    def _on_vigilance_mod(self, env: pb.Envelope, now: float, out: AgentOutput) -> None:
        self._check_writable()
        removed = self.rules.apply(env.vigilance_mod, now)
        assert self.session is not None
        out.send.extend(self.session.notice(r) for r in removed)
        self._note_default_rule()

    def _note_default_rule(self) -> None:
        """Say it once per session when the controller's table-miss rule replaces this
        agent's own default (``budget_us``, ``fail_mode``) with other values: the
        controller decides the default, and nothing should change silently."""
        actions = self.rules.table_miss.actions
        cfg = self.config
        mine = (cfg.budget_us, parse_fail_mode(cfg.fail_mode))
        theirs = (actions.budget_us, actions.fail_mode)
        if actions.verdict_source != INSPECT or theirs == mine or theirs == self._noted_default:
            return
        self._noted_default = theirs
        log.warning(
            "the controller's default rule (table-miss) inspects with a budget of %d us and"
            " fail mode %s, not this agent's budget_us=%d / fail_mode=%s: the controller's"
            " config or rules set it (a local rule, Guard.local_mod, overrides it here)",
            actions.budget_us,
            "secure" if actions.fail_mode == pb.FAIL_MODE_SECURE else "standalone",
            cfg.budget_us,
            cfg.fail_mode,
        )

    def _on_table_mod(self, env: pb.Envelope, now: float, out: AgentOutput) -> None:
        self._check_writable()
        self.apply_table_mod(env.table_mod, now)

    def apply_table_mod(self, mod: pb.TableMod, now: float) -> None:
        """RT/FT change (from the controller, or local); raises ProtocolError."""
        self.tables.apply(mod, now)
        if mod.table == pb.LABEL_TABLE_RT:
            self._rt_adversarial.update(
                (mod.model_id, e.label) for e in mod.entries if e.verdict == pb.VERDICT_ADVERSARIAL
            )
        if mod.table == pb.LABEL_TABLE_FT:  # FT cleared (the only FT mod): nothing to join
            model = mod.model_id
            self._inflight = {k: v for k, v in self._inflight.items() if model and k[0] != model}

    def _on_stats_request(self, env: pb.Envelope, now: float, out: AgentOutput) -> None:
        req = env.stats_request
        body = pb.StatsReply(type=req.type)
        if req.type == pb.STATS_TYPE_RULES:
            match = req.match if req.HasField("match") else None
            body.rules.extend(self.rules.stats(match, req.cookie, req.cookie_mask, now))
        elif req.type == pb.STATS_TYPE_TABLES:
            body.tables.extend([self.rules.table_stats(), *self.tables.stats()])
        elif req.type == pb.STATS_TYPE_AGENT:
            body.agent.CopyFrom(self.agent_stats(now))
        else:
            raise bad_request(pb.BAD_REQUEST_CODE_BAD_STAT, f"stats type {req.type}")
        assert self.session is not None
        out.send.append(self.session.reply(env, body))

    def _on_role_request(self, env: pb.Envelope, now: float, out: AgentOutput) -> None:
        req = env.role_request
        role, gen = req.role, req.generation_id
        if role in (pb.CONTROLLER_ROLE_MASTER, pb.CONTROLLER_ROLE_SLAVE):
            # Generation ids wrap: "older" is a negative distance modulo 2^64.
            if self.generation_id is not None and (gen - self.generation_id) & _MASK64 >= 1 << 63:
                raise ProtocolError(
                    pb.ERROR_TYPE_ROLE_REQUEST_FAILED,
                    pb.ROLE_REQUEST_FAILED_CODE_STALE,
                    f"generation {gen} older than {self.generation_id}",
                )
            self.generation_id = gen
            self.role = role
        elif role == pb.CONTROLLER_ROLE_EQUAL:
            self.role = role
        elif role != pb.CONTROLLER_ROLE_NOCHANGE:
            raise ProtocolError(
                pb.ERROR_TYPE_ROLE_REQUEST_FAILED,
                pb.ROLE_REQUEST_FAILED_CODE_BAD_ROLE,
                f"role {role}",
            )
        gen_out = self.generation_id if self.generation_id is not None else gen
        assert self.session is not None
        out.send.append(
            self.session.reply(env, pb.RoleReply(role=self.role, generation_id=gen_out))
        )

    def _on_error(self, env: pb.Envelope, now: float, out: AgentOutput) -> None:
        err = env.error
        self.counters.errors_received += 1
        log.warning(
            "controller sent ERROR %s for xid %d: %s",
            PeerError.from_error(err).name,
            err.offending_xid,
            err.text,
        )
        batch = self.outbox.answered(err.offending_xid or env.xid)
        if batch is not None:  # our PKG_IN was refused: its waiters get the fail mode
            self._answer(batch, None, now, out)

    def _on_pkg_out(self, env: pb.Envelope, now: float, out: AgentOutput) -> None:
        self.counters.pkg_out += 1
        batch = self.outbox.answered(env.xid)
        if batch is None:  # answered after the late window, or not ours
            self.counters.unmatched_pkg_out += 1
            return
        pkg = env.pkg_out
        items = pkg.items
        if len(items) != len(batch.items):
            self._answer(batch, None, now, out)
            raise bad_request(
                pb.BAD_REQUEST_CODE_BAD_BATCH,
                f"PKG_OUT with {len(items)} items for a PKG_IN of {len(batch.items)}",
            )
        timings = ControllerTimings.from_pb(pkg.timings) if pkg.HasField("timings") else None
        # another controller scored it (its own was over W0): say which, in the reason
        decided = f"scored by {pkg.decided_by[:80]}" if pkg.decided_by else ""
        self._answer(batch, items, now, out, timings, decided)

    _HANDLERS: ClassVar[dict[str, Callable[[AgentCore, pb.Envelope, float, AgentOutput], None]]] = {
        "features_request": _on_features_request,
        "vigilance_mod": _on_vigilance_mod,
        "table_mod": _on_table_mod,
        "stats_request": _on_stats_request,
        "role_request": _on_role_request,
        "error": _on_error,
        "pkg_out": _on_pkg_out,
    }

    # ---- settlement ----------------------------------------------------------------

    def _answer(
        self,
        batch: Batch,
        answers: Sequence[pb.PkgOutItem] | None,
        now: float,
        out: AgentOutput,
        timings: ControllerTimings | None = None,
        decided: str = "",
    ) -> None:
        """Resolve a sent batch: with the PKG_OUT items, or None = UNKNOWN for all.

        A PKG_OUT (``answers`` given) arrived at ``now``: each result gets its
        :class:`Stages` from the batch's ``sent_at`` and the controller's ``timings``.
        """
        model_id = batch.model_id
        sent_at = batch.sent_at
        ttl = self.tables.rt.default_ttl_s
        for i, item in enumerate(batch.items):
            key = (model_id, item.fp, item.label)
            if self._inflight.get(key) is item:
                del self._inflight[key]
                self.tables.ft.resolve(key)
            reason = decided
            if answers is None:
                verdict, action, corrected, score = pb.VERDICT_UNKNOWN, 0, None, None
            else:
                a = answers[i]
                verdict, action, score = a.verdict, a.action, a.score
                if a.unknown_reason:
                    reason = UNKNOWN_REASONS.get(a.unknown_reason, "unspecified")
                    if a.unknown_reason == pb.UNKNOWN_REASON_NO_DETECTOR:
                        self._warn_no_detector(model_id)
                corrected = a.corrected_label if a.HasField("corrected_label") else None
                self.counters.verdict(model_id, verdict)
                if verdict in VERDICT_NAMES:  # UNKNOWN is not a result worth keeping
                    expires = now + ttl if ttl > 0 else None
                    near, sketch = None, b""
                    if verdict == pb.VERDICT_ADVERSARIAL:
                        self._rt_adversarial.add((model_id, item.label))
                        if self.tables.near is not None:
                            near, sketch = perceptual(item.x)
                    entry = ResultEntry(verdict, action, corrected, score, expires, near, sketch)
                    self.tables.put_rt(key, entry)
            for t in item.tickets:
                stages = None
                if answers is not None and t.started <= sent_at:  # not joined after sending
                    stages = Stages(t.started, sent_at, now, timings)
                self._settle(
                    t, verdict, action, corrected, CONTROLLER, now, out, score, reason, stages
                )

    def _warn_no_detector(self, model_id: str) -> None:
        """Once per model and session: the controller has no detectors for it, so every
        inspected inference comes back UNKNOWN and goes to the fail mode."""
        if model_id in self._no_detector_warned:
            return
        self._no_detector_warned.add(model_id)
        log.warning(
            "the controller has no detectors for model %r: its inspected inferences come"
            " back UNKNOWN (reason no_detector) and the fail mode decides them; check"
            " model_id against the controller's config",
            model_id,
        )

    def _settle(
        self,
        t: Ticket,
        verdict: int,
        action: int,
        corrected: int | None,
        decided_by: str,
        now: float,
        out: AgentOutput | None,
        score: float | None = None,
        reason: str = "",
        stages: Stages | None = None,
    ) -> None:
        """Give ``t`` its result (its waiter goes in ``out.settled``), or, when the fail
        mode already decided and the verdict says otherwise, a retraction."""
        name, released, label = outcome(verdict, action, corrected, t.fail_mode, t.label)
        res = Result(
            t.model_id,
            t.source_id,
            t.logits if released else None,
            label,
            t.label,
            t.confidence,
            name,
            decided_by,
            released,
            now - t.started,
            score,
            reason=reason,
            stages=stages,
        )
        prev = t.result
        if prev is None:
            t.result = res
            self.counters.decision(res)
            if out is not None:
                out.settled.append(t)
        elif prev.decided_by == TIMEOUT and (prev.released, prev.label) != (released, label):
            # Too late for the caller, not too late to correct the mistake.
            res.retraction = True
            self.counters.retraction(t.model_id)
            if out is not None:
                out.retractions.append(res)

    # ---- timers --------------------------------------------------------------------

    def tick(self, now: float) -> AgentOutput:
        """Echo, handshake deadline, rule timeouts, FT and late-window expiry. Call at
        next_deadline()."""
        out = AgentOutput()
        s = self.session
        if s is not None:
            self._absorb(s.tick(now), out, now)
        removed = self.rules.expire(now)
        if s is not None and s.state is not State.CLOSED:
            out.send.extend(s.notice(r) for r in removed)
        for key in self.tables.ft.expire(now, self.config.ft_max_age_s):
            self._inflight.pop(key, None)
        for batch in self.outbox.expire(now, self.config.late_window_s):
            for item in batch.items:
                for t in item.tickets:
                    if t.result is None:
                        self._settle(t, pb.VERDICT_UNKNOWN, 0, None, TIMEOUT, now, out)
        return out

    def next_deadline(self) -> float | None:
        """When tick() next has something to do (None: nothing scheduled)."""
        times = []
        if self.session is not None and (t := self.session.next_deadline()) is not None:
            times.append(t)
        if (t := self.rules.next_expiry()) is not None:
            times.append(t)
        if (t := self.tables.ft.oldest_since()) is not None:
            times.append(t + self.config.ft_max_age_s)
        if (t := self.outbox.next_expiry(self.config.late_window_s)) is not None:
            times.append(t)
        return min(times, default=None)

    # ---- introspection -------------------------------------------------------------

    @property
    def state(self) -> State | None:
        """The session's state; None while there is no stream."""
        return self.session.state if self.session is not None else None

    @property
    def up(self) -> bool:
        return self.session is not None and self.session.state is State.MAIN

    @property
    def sending(self) -> bool:
        """PKG_IN may go out: FEATURES done, not closed, and the controller not SLAVE."""
        s = self.session
        return s is not None and s.configured and self.role != pb.CONTROLLER_ROLE_SLAVE

    @property
    def echo_rtt_s(self) -> float | None:
        return self.session.echo_rtt_s if self.session is not None else None

    def agent_stats(self, now: float) -> pb.AgentStats:
        c = self.counters
        return pb.AgentStats(
            agent_id=self.agent_id,
            uptime_s=now - self.started_at,
            inferences=c.inferences,
            decided_locally=c.decided_locally,
            inspected=c.inspected,
            mirrored=c.mirrored,
            budget_misses=c.budget_misses,
            retractions=c.retractions,
            reconnects=c.reconnects,
        )

    def snapshot(self) -> AgentSnapshot:
        """A copy of the counters and table sizes (call under the shell's lock)."""

        def counts(t: RuleTable | ResultTable | PendingTable, cap: int) -> TableCounts:
            return TableCounts(len(t), cap, t.lookup_count, t.hit_count,
                               getattr(t, "eviction_count", 0))  # fmt: skip

        return AgentSnapshot(
            agent_id=self.agent_id,
            models=tuple(self.models),
            up=self.up,
            counters=self.counters.copy(),
            tables={
                "rules": counts(self.rules, self.rules.max_rules + 1),  # + the table-miss
                "rt": counts(self.tables.rt, self.tables.rt.max_entries),
                "ft": counts(self.tables.ft, self.tables.ft.max_entries),
            },
            echo_rtt_s=self.echo_rtt_s,
        )
