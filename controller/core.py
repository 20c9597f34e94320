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

from controller.cluster_work import ClusterWork
from controller.config import Config, RuleConfig, trace_params
from controller.desired import DesiredRules, DesiredState, RulesDiff, StoredRule
from controller.session import (
    AgentSession,
    Closed,
    Expected,
    HandshakeRefused,
    Output,
    PkgInReceived,
    Ready,
    ReplyReceived,
)
from controller.steps import (
    REMOTE_SID,
    CoreSnapshot,
    Incident,
    InspectJob,
    ScoreTimes,
    Step,
    pkg_out_timings,
)
from controller.tracing import SourceTracer, TraceDecision
from openexample import rules, tables
from openexample.identity import Identity
from openexample.perceptual import perceptual
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb


class ControllerCore(ClusterWork):
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
        self._init_cluster_work()  # controller/cluster_work.py

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
            step.absorb(self.on_forward_answer(key, None, "", 0, now))
        for b in [b for b in self.ballots.values() if b.deadline <= now and not b.expired]:
            b.expired = True  # no more votes: decide with those in (when scored here)
            self._close_ballot(b, now, step)
        return step

    def next_deadline(self) -> float | None:
        times = [t for s in self.sessions.values() if (t := s.next_deadline()) is not None]
        times += [f.deadline for f in self.forwarded.values()]
        times += [b.deadline for b in self.ballots.values() if not b.expired]
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
            self._answer_unknown(step, s, sid, ev.xid, pkg.model_id, n, reason)
            return
        job = InspectJob(sid, ev.xid, s.agent_id, pkg, now)
        model = self.cfg.models.get(pkg.model_id)
        if (
            model is not None
            and model.consensus > 1
            and not self._ballot(s, job, model.consensus, step, now)
        ):
            return
        self.workload += n
        step.jobs.append(job)

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
        self.workload -= job.size
        if job.ballot and (b := self.ballots.get(job.ballot)) is not None:
            b.local = (items, timings)  # the verdict waits for the votes
            step = Step()
            self._close_ballot(b, now, step)
            return step
        return self._results(job, items, now, timings)

    def _results(
        self,
        job: InspectJob,
        items: list[pb.PkgOutItem],
        now: float,
        timings: ScoreTimes | None = None,
    ) -> Step:
        step = Step()
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
            if job.vote:
                return step  # a vote: the asking controller records what is decided
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

    def adopt_rules(self, tables: dict[str, list[StoredRule]], now: float) -> Step:
        """The agent group's master's desired rules (controller/mastership.py) become
        this controller's (:meth:`DesiredRules.adopt`); the live agents whose tables
        changed get them at once (DELETE all, the table, BARRIER, as at resync)."""
        step = Step()
        changed = self.durable.adopt(tables, now, step)
        for scope in changed:
            table = self.durable.agent_rules.get(scope)
            if table is None:  # the template: agents that connect later get it
                continue
            for sid in self.sessions_of(agent_id=scope):
                s = self.sessions[sid]
                out = [s.request(rules.vigilance_mod(rules.DELETE))]
                out += [s.request(mod) for mod in table.snapshot(now)]
                out.append(s.request(pb.BarrierRequest()))
                step.send += [(sid, env) for env in out]
        if changed:
            names = ", ".join(scope or "the template" for scope in changed)
            step.notes.append(f"adopted the master's rules for {names}")
        return step

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
