"""What the controller's core passes around: jobs to score, and the Step a core call
returns for the shell to carry out (controller/core.py). Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from controller.desired import Changes
from controller.tracing import TraceDecision
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn


@dataclass(slots=True)
class InspectJob:
    """A PKG_IN admitted for scoring."""

    sid: int
    xid: int
    agent_id: str
    pkg: DecodedPkgIn
    received_at: float
    ballot: int = 0  # k-of-n consensus: the key of its Ballot (0: decided here alone)
    vote: bool = False  # a neighbour's vote request: answer it, record nothing

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
    # k-of-n consensus: vote requests for the other controllers (key, request, deadline).
    votes: list[tuple[int, cpb.WorkRequest, float]] = field(default_factory=list)
    rt_added: list[tuple[str, pb.LabelEntry, float | None]] = field(default_factory=list)
    blocks_added: list[tuple[tuple[str, str], float | None]] = field(default_factory=list)
    blocks_removed: list[tuple[str, str]] = field(default_factory=list)

    def absorb(self, other: Step) -> Step:
        """Everything ``other`` asks of the shell, added to this step."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, set):
                mine |= theirs
            elif isinstance(mine, bool):
                setattr(self, f.name, mine or theirs)
            else:
                setattr(self, f.name, mine + theirs)
        return self

    def merge(self, other: Step) -> Step:
        """``other``'s messages, what to store and notes, added to this step (the
        parts an operator's or the config's rule changes produce)."""
        self.send.extend(other.send)
        self.persist |= other.persist
        self.persist_blocks = self.persist_blocks or other.persist_blocks
        self.notes.extend(other.notes)
        return self


def unknown_items(n: int, reason: int) -> list[pb.PkgOutItem]:
    item = pb.PkgOutItem(
        verdict=pb.VERDICT_UNKNOWN, action=pb.VERDICT_ACTION_RELEASE, unknown_reason=reason
    )
    return [item] * n
