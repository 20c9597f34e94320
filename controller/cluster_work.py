"""The controller core's work with the other controllers, sans-I/O: PKG_INs over W0
handed to a neighbour (controller/overflow.py), work a neighbour handed here, and k-of-n
consensus votes (controller/consensus.py). A part of :class:`controller.core.ControllerCore`
(which inherits it), kept apart so each file reads in one sitting."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from controller.consensus import Ballot
from controller.overflow import RoundTrip
from controller.session import AgentSession, PkgInReceived, incompatible
from controller.steps import REMOTE_SID, ForwardJob, InspectJob, ScoreTimes, Step, unknown_items
from openexample.errors import ProtocolError
from openexample.tensor import encode
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn, validate_pkg_in

if TYPE_CHECKING:
    from controller.config import Config


class ClusterWork:
    """State and decisions for work across controllers; the core calls ``_forward``
    and ``_ballot`` at admission, ``_results`` answers what is decided."""

    cfg: Config
    sessions: dict[int, AgentSession]
    workload: int
    draining: bool
    detected_models: set[str]
    expected: dict

    def _init_cluster_work(self) -> None:
        # whether a neighbour can take work over W0 now and how many peers are up (the
        # shell says, from the peers' load), what a forward costs, the work in flight
        self.neighbours_free = False
        self.peers_up = 0
        self.forward_rtt = RoundTrip()
        self.forwarded: dict[int, ForwardJob] = {}
        self.ballots: dict[int, Ballot] = {}
        self._remote: dict[int, object] = {}  # InspectJob.xid -> the shell's reply-to
        self._keys = itertools.count(1)

    @staticmethod
    def _answer_unknown(
        step: Step, s: AgentSession, sid: int, xid: int, model_id: str, n: int, reason: int
    ) -> None:
        """Answer a PKG_IN of ``n`` items UNKNOWN with ``reason`` (the session's xid
        freed, the verdicts counted)."""
        body = pb.PkgOut(model_id=model_id, items=unknown_items(n, reason))
        s.answered(xid, n)
        if s.configured:
            step.send.append((sid, s.reply_to(xid, body)))
        step.verdicts.extend((model_id, pb.VERDICT_UNKNOWN) for _ in range(n))

    def _results(
        self,
        job: InspectJob,
        items: list[pb.PkgOutItem],
        now: float,
        timings: ScoreTimes | None = None,
    ) -> Step:
        raise NotImplementedError  # ControllerCore's

    # --- several controllers: work over W0 (controller/overflow.py) ---

    def _forward(
        self, s: AgentSession, sid: int, ev: PkgInReceived, step: Step, now: float
    ) -> bool:
        """Hand a PKG_IN over W0 to the neighbours, when one can take it and every
        item's budget covers the round trip a forward has cost so far."""
        pkg = ev.pkg
        budget = _budget_s(pkg)
        if not self.neighbours_free or budget <= self.forward_rtt.estimate_s:
            return False  # also budget 0: nobody waits for the answer
        request = self._work_request(s, pkg)
        key = next(self._keys)
        self.forwarded[key] = ForwardJob(
            key, sid, ev.xid, s.agent_id, pkg.model_id, len(pkg.items), now + budget, request, now
        )
        step.forwards.append(self.forwarded[key])
        return True

    @staticmethod
    def _work_request(s: AgentSession, pkg: DecodedPkgIn) -> cpb.WorkRequest:
        """A PKG_IN of ``s``'s agent, re-encoded for the bus with its model declaration."""
        return cpb.WorkRequest(
            agent_id=s.agent_id,
            model=s.models[pkg.model_id],
            pkg=pb.PkgIn(
                model_id=pkg.model_id,
                inputs=encode(pkg.inputs),
                logits=encode(pkg.logits) if pkg.logits is not None else None,
                items=pkg.items,
            ),
        )

    def on_forward_answer(
        self, key: int, pkg_out: pb.PkgOut | None, decider: str, refused: int, now: float
    ) -> Step:
        """A neighbour's answer to a forward (``pkg_out``), its refusal (``refused``), or
        none in time (both empty): the agent gets the verdicts, or UNKNOWN/OVERLOADED."""
        step = Step()
        job = self.forwarded.pop(key, None)
        if job is None:
            return step  # answered already (deadline), or never ours
        s = self.sessions.get(job.sid)
        if pkg_out is None or len(pkg_out.items) != job.size:
            step.overloaded += job.size
            if s is not None:
                reason = refused or pb.UNKNOWN_REASON_OVERLOADED
                self._answer_unknown(step, s, job.sid, job.xid, job.model_id, job.size, reason)
            return step
        self.forward_rtt.observe(now - job.sent_at)
        step.verdicts.extend((job.model_id, i.verdict) for i in pkg_out.items)
        if s is not None:
            s.answered(job.xid, job.size)
            if s.configured:
                body = pb.PkgOut(model_id=job.model_id, items=pkg_out.items, decided_by=decider)
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
        job = InspectJob(
            REMOTE_SID, next(self._keys), request.agent_id, decoded, now, vote=request.vote
        )
        self._remote[job.xid] = reply_to
        self.workload += n
        step.jobs.append(job)
        return step

    # --- k-of-n consensus (controller/consensus.py) ---

    def _ballot(self, s: AgentSession, job: InspectJob, k: int, step: Step, now: float) -> bool:
        """Ask the other controllers to vote on ``job``; False (answered UNKNOWN/NO_QUORUM
        now) when fewer than ``k`` controllers are up."""
        pkg = job.pkg
        if self.peers_up + 1 < k:
            no_quorum = pb.UNKNOWN_REASON_NO_QUORUM
            self._answer_unknown(step, s, job.sid, job.xid, pkg.model_id, job.size, no_quorum)
            return False
        budget = _budget_s(pkg)
        job.ballot = next(self._keys)
        self.ballots[job.ballot] = Ballot(job.ballot, job, k, self.peers_up, now + budget)
        request = self._work_request(s, job.pkg)
        request.vote = True
        step.votes.append((job.ballot, request, now + budget))
        return True

    def on_vote(self, key: int, pkg_out: pb.PkgOut | None, peer: str, now: float) -> Step:
        """A peer's vote (None: it refused, or the bus could not ask it)."""
        step = Step()
        b = self.ballots.get(key)
        if b is not None:
            b.vote(peer, None if pkg_out is None else list(pkg_out.items))
            self._close_ballot(b, now, step)
        return step

    def on_vote_failed(self, key: int, now: float) -> Step:
        """The bus could not ask the others: decide with this controller's vote alone
        (NO_QUORUM for every item, as k > 1)."""
        step = Step()
        b = self.ballots.get(key)
        if b is not None:
            b.asked = 0
            self._close_ballot(b, now, step)
        return step

    def _close_ballot(self, b: Ballot, now: float, step: Step) -> None:
        """The verdicts, once the votes decide them (controller/consensus.py)."""
        final = b.tally()
        if final is not None:
            del self.ballots[b.key]
            assert b.local is not None
            step.absorb(self._results(b.job, final, now, b.local[1]))


def _budget_s(pkg: DecodedPkgIn) -> float:
    """The tightest budget of a PKG_IN's items, in seconds (0: nobody waits)."""
    return min(item.budget_us for item in pkg.items) * 1e-6
