"""The agent's sans-I/O core: session state machine, decisions, verdicts, fail modes.

Plain objects that take messages and a ``now`` and return messages, like Faucet's
Valve: :mod:`agents.transport` feeds it bytes from the stream and writes what it returns;
:mod:`agents.guard` calls :meth:`AgentCore.decide` per inference. Not thread-safe by
itself: the shell holds one lock around every call (all calls are short).

Per inference: the rule table says who decides. ALLOW / DROP (with an optional MIRROR or
SAMPLE copy) decide at once. INSPECT looks up RT by (model, fingerprint, label): a hit
decides at once; else the input joins a pending FT entry or goes into the next PKG_IN
batch, and the caller gets a :class:`Ticket` to wait on for at most the rule's budget.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

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
    Item,
    ModelInfo,
    Result,
    Ticket,
    outcome,
)
from openexample import tensor
from openexample.errors import ProtocolError, bad_request
from openexample.limits import DEFAULT_LIMITS, Limits
from openexample.messages import (
    PROTOCOL_VERSION,
    XidAllocator,
    decode_envelope,
    envelope,
    error_envelope,
    hello,
    negotiate_version,
    reply,
)
from openexample.rules import ALLOW, INSPECT, RuleActions, RuleTable
from openexample.tables import Key, LabelTables, PendingTable, ResultEntry, ResultTable, fingerprint
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger(__name__)

# Session states: no stream / HELLO sent / version agreed, waiting for FEATURES_REQUEST /
# FEATURES_REPLY sent, controller resyncing (PKG_IN allowed) / resync acknowledged.
DOWN, HELLO, FEATURES, CONFIG, MAIN = range(5)
STATE_NAMES = ("DOWN", "HELLO", "FEATURES", "CONFIG", "MAIN")

_MASK64 = (1 << 64) - 1


# "overloaded", "no_detector", ... for Result.reason.
UNKNOWN_REASONS = {
    v: pb.UnknownReason.Name(v).removeprefix("UNKNOWN_REASON_").lower()
    for v in pb.UnknownReason.values()
}


class AgentCore:
    """One agent's protocol state and tables; see the module docstring."""

    def __init__(
        self,
        agent_id: str,
        models: Sequence[ModelInfo],
        *,
        miss_actions: RuleActions,
        limits: Limits = DEFAULT_LIMITS,
        max_batch_items: int = 64,
        max_rules: int = 4096,
        rt_max_entries: int = 100_000,
        rt_ttl_s: float = 0.0,
        ft_max_entries: int = 10_000,
        ft_max_age_s: float = 1.0,
        late_window_s: float = 5.0,
        echo_interval_s: float = 1.0,
        echo_unreplied_limit: int = 3,
        fingerprint_key: bytes = b"",
        seed: int | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        now: float = 0.0,
    ) -> None:
        self.agent_id = agent_id
        self.models = {m.model_id: m for m in models}
        self.rules = RuleTable(miss_actions, max_rules=max_rules, now=now)
        self.tables = LabelTables(
            ResultTable(rt_max_entries, default_ttl_s=rt_ttl_s), PendingTable(ft_max_entries)
        )
        self.my_limits = limits
        self.limits = limits
        self.max_batch_items = min(max_batch_items, limits.max_batch_items)
        self.ft_max_age_s = ft_max_age_s
        self.late_window_s = late_window_s
        self.echo_interval_s = echo_interval_s
        self.echo_unreplied_limit = echo_unreplied_limit
        self._fp_key = fingerprint_key
        self._random = random.Random(seed).random
        self._np_rng = np.random.default_rng(seed)  # privacy noise; I/O side only
        self._wall_ns = wall_ns
        self._xid = XidAllocator(random.Random(seed).randrange(1, 1 << 31))
        self.started_at = now

        self.state = DOWN
        self.version = PROTOCOL_VERSION
        self.sending = False  # PKG_IN allowed now (CONFIG/MAIN and not SLAVE)
        self.want_close = False  # the shell closes the stream after sending what we returned
        self.dead = False  # echo limit reached
        self.role = pb.CONTROLLER_ROLE_EQUAL
        self.generation_id: int | None = None
        self.controller_id = ""
        self.kick = False  # the shell must wake the I/O loop to flush the outbox
        self._scheduled = False
        self._outbox: list[Batch] = []
        self._open: dict[str, Batch] = {}
        self._sent: dict[int, Batch] = {}  # xid -> batch awaiting PKG_OUT, oldest first
        self._inflight: dict[Key, Item] = {}  # FT keys -> the item that carries them
        self._next_echo = 0.0
        self._echo_outstanding = 0
        self.echo_rtt_s: float | None = None
        self.retracted: list[Result] = []  # drained by the shell (on_retraction callback)
        # (model, label) pairs for which the RT has held an ADVERSARIAL entry: only those
        # inferences pay for a fingerprint under an ALLOW rule, so a known attack is
        # refused even where rules allow, and the rest keep the fast path.
        self._rt_adversarial: set[tuple[str, int]] = set()

        # Counters (AgentStats and the Prometheus collector read them).
        self.inferences = self.decided_locally = self.inspected = self.mirrored = 0
        self.budget_misses = self.retractions = self.reconnects = self.sessions = 0
        self.pkg_in_total = self.pkg_in_items = self.pkg_in_bytes = self.pkg_out_total = 0
        self.ft_joined = self.unmatched_pkg_out = self.errors_received = 0
        self.decisions: dict[tuple[str, str], int] = {}
        self.verdicts: dict[tuple[str, str], int] = {}
        self.misses_by_model: dict[str, int] = {}
        self.retractions_by_model: dict[str, int] = {}
        # (model, TIMEOUT or DISCONNECTED, released): decisions the fail mode made.
        self.fail_mode_decisions: dict[tuple[str, str, bool], int] = {}

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
    ) -> Result | Ticket:
        """Decide one inference now (Result) or hand back a Ticket to wait on."""
        self.inferences += 1
        rule = self.rules.lookup(model_id, source_id, label, confidence, now)
        actions = rule.actions
        source = actions.verdict_source
        if source == ALLOW and (model_id, label) in self._rt_adversarial:
            fp = fingerprint(x, self._fp_key)
            entry = self.tables.rt.get((model_id, fp, label), now)
            if entry is not None and entry.verdict == pb.VERDICT_ADVERSARIAL:
                return self._from_rt(entry, model_id, source_id, logits, label, confidence,
                                     actions.fail_mode)  # fmt: skip
        if source != INSPECT:  # ALLOW / DROP, maybe with a copy nobody waits for
            if actions.mirror:
                self._copy(model_id, x, logits, label, confidence, source_id, rule.cookie, True)
            elif actions.sample_p and self._random() < actions.sample_p:
                self._copy(model_id, x, logits, label, confidence, source_id, rule.cookie, False)
            self.decided_locally += 1
            released = source == ALLOW
            return self._decided(model_id, source_id, logits, label, confidence, released, RULE)

        fail_mode = actions.fail_mode
        fp = fingerprint(x, self._fp_key)
        key = (model_id, fp, label)
        entry = self.tables.rt.get(key, now)
        if entry is not None:  # the verdict is already known
            return self._from_rt(entry, model_id, source_id, logits, label, confidence, fail_mode)
        if not self.sending:
            released = fail_mode == STANDALONE
            return self._decided(
                model_id, source_id, logits, label, confidence, released, DISCONNECTED
            )

        self.inspected += 1
        budget_us = actions.budget_us
        ticket = Ticket(
            model_id,
            source_id,
            logits,
            label,
            confidence,
            fail_mode,
            now,
            now + budget_us * 1e-6,
        )
        batch = self._batch_for(model_id)
        if self.tables.ft.begin(key, batch.xid, now) is not None:
            item = self._inflight.get(key)
            if item is not None:  # identical input already on its way: join it
                self.ft_joined += 1
                item.tickets.append(ticket)
                return ticket
        reason = pb.PKG_IN_REASON_TABLE_MISS if rule.is_table_miss else pb.PKG_IN_REASON_ACTION
        item = Item(
            x, logits, label, confidence, source_id, reason, rule.cookie, fp, budget_us,
            self._wall_ns(),
        )  # fmt: skip
        item.tickets.append(ticket)
        self._inflight[key] = item
        self._enqueue(batch, item)
        return ticket

    def _from_rt(
        self,
        entry: ResultEntry,
        model_id: str,
        source_id: str,
        logits: np.ndarray,
        label: int,
        confidence: float,
        fail_mode: int,
    ) -> Result:
        self.decided_locally += 1
        self._count_verdict(model_id, entry.verdict)
        name, released, out = outcome(
            entry.verdict, entry.action, entry.corrected_label, fail_mode, label
        )
        return self._decided(
            model_id, source_id, logits, label, confidence, released, RT, name, out, entry.score
        )

    def expire_ticket(self, ticket: Ticket, now: float) -> Result:
        """The waiter's budget is over: its result, deciding by fail mode if still open."""
        if ticket.result is None:
            self._settle(ticket, pb.VERDICT_UNKNOWN, 0, None, TIMEOUT, now)
        return ticket.result  # type: ignore[return-value]

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
        )
        self._count(res)
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
    ) -> None:
        """MIRROR / SAMPLE: send a copy nobody waits for (dropped while disconnected)."""
        if not self.sending:
            return
        self.mirrored += 1
        x = np.array(x, copy=True)  # the caller may reuse its buffer once we return
        reason = pb.PKG_IN_REASON_MIRROR if mirror else pb.PKG_IN_REASON_SAMPLED
        fp = fingerprint(x, self._fp_key)
        item = Item(x, logits, label, confidence, source_id, reason, cookie, fp, 0, self._wall_ns())
        self._enqueue(self._batch_for(model_id), item)

    def _batch_for(self, model_id: str) -> Batch:
        batch = self._open.get(model_id)
        if batch is None or len(batch.items) >= self.max_batch_items:
            batch = self._open[model_id] = Batch(self._xid(), model_id)
            self._outbox.append(batch)
        return batch

    def _enqueue(self, batch: Batch, item: Item) -> None:
        batch.items.append(item)
        if not self._scheduled:
            self._scheduled = self.kick = True

    # ---- outbox (I/O thread) -------------------------------------------------------

    def take_outbox(self, now: float) -> list[Batch]:
        """Close the queued batches and mark them sent (build them with build_pkg_in)."""
        self._scheduled = False
        batches = [b for b in self._outbox if b.items]
        self._outbox = []
        self._open.clear()
        for b in batches:
            b.sent_at = now
            self._sent[b.xid] = b
        self.pkg_in_total += len(batches)
        return batches

    def build_pkg_in(self, batch: Batch) -> pb.Envelope:
        """The PKG_IN for a taken batch. Touches no shared state but the noise RNG, so
        the I/O thread runs it outside the lock."""
        info = self.models[batch.model_id]
        items = batch.items
        xs = np.stack([it.x for it in items]).astype(info.input_dtype, copy=False)
        if info.privacy is not None:
            xs = info.privacy.apply(xs, self._np_rng)
        logits = np.stack([it.logits for it in items]).astype(np.float32, copy=False)
        body = pb.PkgIn(model_id=batch.model_id)
        tensor.encode(xs, body.inputs)
        tensor.encode(logits, body.logits)
        for it in items:
            conf = it.confidence
            body.items.add(
                label=it.label,
                confidence=conf if 0.0 <= conf <= 1.0 else 0.0,  # NaN would void the batch
                source_id=it.source_id,
                reason=it.reason,
                rule_cookie=it.cookie,
                fingerprint=it.fp,
                budget_us=it.budget_us,
                inferred_at_ns=it.wall_ns,
            )
        self.pkg_in_items += len(items)
        return envelope(body, xid=batch.xid, version=self.version)

    def flush(self, now: float) -> list[pb.Envelope]:
        """take_outbox + build_pkg_in in one go (tests, simple shells)."""
        return [self.build_pkg_in(b) for b in self.take_outbox(now)]

    # ---- session -------------------------------------------------------------------

    def connected(self, now: float) -> list[pb.Envelope]:
        """A stream is open: start the handshake."""
        if self.sessions:
            self.reconnects += 1
        self.sessions += 1
        self.state = HELLO
        self.version = PROTOCOL_VERSION
        self.limits = self.my_limits
        self.want_close = self.dead = False
        self.role = pb.CONTROLLER_ROLE_EQUAL
        self._echo_outstanding = 0
        self._next_echo = now + self.echo_interval_s
        return [hello(self.agent_id, limits=self.my_limits, xid=self._xid())]

    def disconnected(self, now: float) -> None:
        """The stream is gone: everyone waiting gets the fail mode at once. Rules and RT
        stay; FT and in-flight batches are void (their xids die with the session)."""
        self.state = DOWN
        self.sending = False
        waiting = [*self._sent.values(), *self._outbox]
        self._sent.clear()
        self._outbox = []
        self._open.clear()
        self._inflight.clear()
        self._scheduled = False
        self.tables.ft.clear()
        for batch in waiting:
            for item in batch.items:
                for t in item.tickets:
                    if t.result is None:
                        self._settle(t, pb.VERDICT_UNKNOWN, 0, None, DISCONNECTED, now)

    def receive(self, data: bytes, now: float) -> list[pb.Envelope]:
        """Bytes from the controller in, messages to send out. Never raises on input."""
        try:
            env = decode_envelope(data, self.limits)
        except ProtocolError as exc:
            log.warning("undecodable message from controller: %s", exc)
            return [error_envelope(exc, data, self.version)]
        return self.handle(env, now)

    def handle(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        """One decoded message in, messages to send out."""
        if self.state == DOWN:
            return []
        if self.state == HELLO:
            return self._on_hello(env)
        kind = env.WhichOneof("body")
        self._echo_outstanding = 0  # any message proves the controller alive (as it does for us)
        try:
            if env.version != self.version:
                raise bad_request(
                    pb.BAD_REQUEST_CODE_BAD_VERSION,
                    f"version {env.version}, negotiated {self.version}",
                )
            handler = self._HANDLERS.get(kind or "")
            if handler is None:
                code = pb.BAD_REQUEST_CODE_BAD_TYPE
                if kind == "hello":
                    code = pb.BAD_REQUEST_CODE_UNEXPECTED
                raise bad_request(code, f"agent does not accept {kind}")
            return handler(self, env, now)
        except ProtocolError as exc:
            log.info("refused %s xid=%d: %s", kind, env.xid, exc)
            return [error_envelope(exc.with_xid(env.xid), env.SerializeToString(), self.version)]

    def _on_hello(self, env: pb.Envelope) -> list[pb.Envelope]:
        try:
            self.version = negotiate_version(env)
        except ProtocolError as exc:
            log.warning("handshake failed: %s", exc)
            self.want_close = True
            return [error_envelope(exc, env.SerializeToString(), self.version)]
        self.limits = self.my_limits.merge(env.hello.limits)
        self.max_batch_items = min(self.max_batch_items, self.limits.max_batch_items)
        self.controller_id = env.hello.sender_id
        self.state = FEATURES
        return []

    def _on_features_request(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        caps = [pb.CAPABILITY_BATCHING, pb.CAPABILITY_RETRACTION, pb.CAPABILITY_LABEL_TABLES]
        if any(
            m.privacy is not None and m.privacy.mechanism != "none" for m in self.models.values()
        ):
            caps.insert(1, pb.CAPABILITY_PRIVACY_NOISE)
        body = pb.FeaturesReply(
            agent_id=self.agent_id,
            models=[m.descriptor() for m in self.models.values()],
            capabilities=caps,
            max_batch_items=self.max_batch_items,
        )
        if self.state == FEATURES:
            self.state = CONFIG
        self._update_sending()
        return [reply(env, body)]

    def _on_barrier(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        # Every message before this one is already applied: mods are synchronous here.
        if self.state == CONFIG:
            self.state = MAIN
        return [reply(env, pb.BarrierReply())]

    def _on_echo_request(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        return [reply(env, pb.EchoReply(data=env.echo_request.data))]

    def _on_echo_reply(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        self._echo_outstanding = 0
        data = env.echo_reply.data
        if len(data) == 8:
            self.echo_rtt_s = now - struct.unpack("<d", data)[0]
        return []

    def _check_writable(self) -> None:
        if self.role == pb.CONTROLLER_ROLE_SLAVE:
            raise bad_request(pb.BAD_REQUEST_CODE_IS_SLAVE, "controller is SLAVE")

    def _on_vigilance_mod(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        self._check_writable()
        removed = self.rules.apply(env.vigilance_mod, now)
        return [envelope(r, xid=0, version=self.version) for r in removed]

    def _on_table_mod(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        self._check_writable()
        self.apply_table_mod(env.table_mod, now)
        return []

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

    def _on_stats_request(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
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
        return [reply(env, body)]

    def _on_role_request(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
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
        self._update_sending()
        gen_out = self.generation_id if self.generation_id is not None else gen
        return [reply(env, pb.RoleReply(role=self.role, generation_id=gen_out))]

    def _on_error(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        err = env.error
        self.errors_received += 1
        log.warning(
            "controller sent ERROR %s for xid %d: %s",
            ProtocolError.from_error(err).name,
            err.offending_xid,
            err.text,
        )
        batch = self._sent.pop(err.offending_xid or env.xid, None)
        if batch is not None:  # our PKG_IN was refused: its waiters get the fail mode
            self._answer(batch, None, now)
        return []

    def _on_pkg_out(self, env: pb.Envelope, now: float) -> list[pb.Envelope]:
        self.pkg_out_total += 1
        batch = self._sent.pop(env.xid, None)
        if batch is None:  # answered after the late window, or not ours
            self.unmatched_pkg_out += 1
            return []
        items = env.pkg_out.items
        if len(items) != len(batch.items):
            self._answer(batch, None, now)
            raise bad_request(
                pb.BAD_REQUEST_CODE_BAD_BATCH,
                f"PKG_OUT with {len(items)} items for a PKG_IN of {len(batch.items)}",
            )
        self._answer(batch, items, now)
        return []

    def _answer(self, batch: Batch, answers: Sequence[pb.PkgOutItem] | None, now: float) -> None:
        """Resolve a sent batch: with the PKG_OUT items, or None = UNKNOWN for all."""
        model_id = batch.model_id
        rt, ttl = self.tables.rt, self.tables.rt.default_ttl_s
        for i, item in enumerate(batch.items):
            key = (model_id, item.fp, item.label)
            if self._inflight.get(key) is item:
                del self._inflight[key]
                self.tables.ft.resolve(key)
            reason = ""
            if answers is None:
                verdict, action, corrected, score = pb.VERDICT_UNKNOWN, 0, None, None
            else:
                a = answers[i]
                verdict, action, score = a.verdict, a.action, a.score
                if a.unknown_reason:
                    reason = UNKNOWN_REASONS.get(a.unknown_reason, "unspecified")
                corrected = a.corrected_label if a.HasField("corrected_label") else None
                self._count_verdict(model_id, verdict)
                if verdict in VERDICT_NAMES:  # UNKNOWN is not a result worth keeping
                    expires = now + ttl if ttl > 0 else None
                    rt.put(key, ResultEntry(verdict, action, corrected, score, expires))
                    if verdict == pb.VERDICT_ADVERSARIAL:
                        self._rt_adversarial.add((model_id, item.label))
            for t in item.tickets:
                self._settle(t, verdict, action, corrected, CONTROLLER, now, score, reason)

    def _settle(
        self,
        t: Ticket,
        verdict: int,
        action: int,
        corrected: int | None,
        decided_by: str,
        now: float,
        score: float | None = None,
        reason: str = "",
    ) -> None:
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
        )
        prev = t.result
        if prev is None:
            t.result = res
            self._count(res)
            if t.wake is not None:
                t.wake()
        elif prev.decided_by == TIMEOUT and (prev.released, prev.label) != (released, label):
            # Too late for the caller, not too late to correct the mistake.
            res.retraction = True
            self.retractions += 1
            m = t.model_id
            self.retractions_by_model[m] = self.retractions_by_model.get(m, 0) + 1
            self.retracted.append(res)

    def _count(self, res: Result) -> None:
        key = (res.model_id, res.decided_by)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if res.decided_by == TIMEOUT or res.decided_by == DISCONNECTED:
            fkey = (res.model_id, res.decided_by, res.released)
            self.fail_mode_decisions[fkey] = self.fail_mode_decisions.get(fkey, 0) + 1
            if res.decided_by == TIMEOUT:
                self.budget_misses += 1
                m = res.model_id
                self.misses_by_model[m] = self.misses_by_model.get(m, 0) + 1

    def _count_verdict(self, model_id: str, verdict: int) -> None:
        key = (model_id, VERDICT_NAMES.get(verdict, UNKNOWN))
        self.verdicts[key] = self.verdicts.get(key, 0) + 1

    def _update_sending(self) -> None:
        self.sending = self.state in (CONFIG, MAIN) and self.role != pb.CONTROLLER_ROLE_SLAVE

    # ---- timers --------------------------------------------------------------------

    def tick(self, now: float) -> list[pb.Envelope]:
        """Echo, rule timeouts, FT and late-window expiry. Call at next_deadline()."""
        out: list[pb.Envelope] = []
        if self.state != DOWN and now >= self._next_echo:
            if self._echo_outstanding >= self.echo_unreplied_limit:
                log.warning("%d echo requests unanswered: session dead", self._echo_outstanding)
                self.dead = True
                return out
            self._echo_outstanding += 1
            self._next_echo = now + self.echo_interval_s
            data = struct.pack("<d", now)
            out.append(envelope(pb.EchoRequest(data=data), xid=self._xid(), version=self.version))
        removed = self.rules.expire(now)
        if self.state != DOWN:
            out.extend(envelope(r, xid=0, version=self.version) for r in removed)
        for key in self.tables.ft.expire(now, self.ft_max_age_s):
            self._inflight.pop(key, None)
        while self._sent:  # oldest first: give up on answers past the late window
            xid, batch = next(iter(self._sent.items()))
            if now - batch.sent_at < self.late_window_s:
                break
            del self._sent[xid]
            for item in batch.items:
                for t in item.tickets:
                    self.expire_ticket(t, now)
        return out

    def next_deadline(self) -> float | None:
        """When tick() next has something to do (None: nothing scheduled)."""
        times = []
        if self.state != DOWN:
            times.append(self._next_echo)
        nxt = self.rules.next_expiry()
        if nxt is not None:
            times.append(nxt)
        ft = self.tables.ft._items
        if ft:
            times.append(next(iter(ft.values())).since + self.ft_max_age_s)
        if self._sent:
            times.append(next(iter(self._sent.values())).sent_at + self.late_window_s)
        return min(times, default=None)

    # ---- introspection -------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.state == MAIN

    def agent_stats(self, now: float) -> pb.AgentStats:
        return pb.AgentStats(
            agent_id=self.agent_id,
            uptime_s=now - self.started_at,
            inferences=self.inferences,
            decided_locally=self.decided_locally,
            inspected=self.inspected,
            mirrored=self.mirrored,
            budget_misses=self.budget_misses,
            retractions=self.retractions,
            reconnects=self.reconnects,
        )

    def drain_retractions(self) -> list[Result]:
        out, self.retracted = self.retracted, []
        return out

    _HANDLERS: ClassVar[dict[str, Callable[[AgentCore, pb.Envelope, float], list[pb.Envelope]]]] = {
        "features_request": _on_features_request,
        "barrier_request": _on_barrier,
        "echo_request": _on_echo_request,
        "echo_reply": _on_echo_reply,
        "vigilance_mod": _on_vigilance_mod,
        "table_mod": _on_table_mod,
        "stats_request": _on_stats_request,
        "role_request": _on_role_request,
        "error": _on_error,
        "pkg_out": _on_pkg_out,
    }
