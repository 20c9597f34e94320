"""k-of-n consensus among controllers (seed 000's distributed consensus), sans-I/O.

The seed names a consensus among DeSVig controllers but gives no algorithm. Ours, per
model (``models.ID.consensus: k``), one round, no leader:

1. The controller an agent is connected to admits the PKG_IN as usual and scores it;
   at the same time it asks every other controller up on the bus to score it too (a
   ``WorkRequest`` with ``vote``, controller/overflow.py's request/response).
   n = 1 + the peers up at that moment. With n < k it answers UNKNOWN/NO_QUORUM at once.
2. A voter scores and answers, and records nothing: no RT entry, no source tracing, no
   incident. Only the deciding controller records, once, what the cluster decided.
3. Per item, the verdict is the one k controllers (this one included) gave: ADVERSARIAL
   if k flagged it, else BENIGN if k cleared it. Its details (score, evidence, corrected
   label) come from this controller's own item when it voted that way, else from the
   first voter that did. An item decided as soon as one side reaches k.
4. When every item is decided, the PKG_OUT goes out. When all n answered, or the budget
   ran out, and an item has no k agreeing controllers, it is UNKNOWN/NO_QUORUM (the
   agent's fail mode decides it, as for any UNKNOWN).

So with k = n every controller must agree; k = 2 of 3 tolerates one controller down or
wrong. An attacker must now fool k pipelines (each controller may run other detectors
or thresholds) within one budget; the cost is one bus round trip per PKG_IN, paid in
parallel with the local scoring (python -m bench.overflow measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openexample.v1 import openexample_pb2 as pb

_NO_QUORUM = pb.PkgOutItem(
    verdict=pb.VERDICT_UNKNOWN,
    action=pb.VERDICT_ACTION_RELEASE,
    unknown_reason=pb.UNKNOWN_REASON_NO_QUORUM,
)


@dataclass(slots=True)
class Ballot:
    """One PKG_IN's votes: this controller's items (once scored) and each peer's."""

    key: int
    job: Any  # the InspectJob (controller/core.py) being decided
    k: int
    asked: int  # peers asked (n - 1)
    deadline: float  # core time: the items' budget
    local: tuple[list[pb.PkgOutItem], Any] | None = None  # (items, ScoreTimes or None)
    votes: dict[str, list[pb.PkgOutItem]] = field(default_factory=dict)
    expired: bool = False

    def vote(self, peer: str, items: list[pb.PkgOutItem] | None) -> None:
        """A peer's items (None: it refused or sent the wrong count: no vote, but an
        answer, so the ballot knows it will not come)."""
        self.votes[peer] = items if items is not None and len(items) == self.job.size else []

    def tally(self) -> list[pb.PkgOutItem] | None:
        """The decided items, or None while an item is open and more votes may come."""
        if self.local is None:
            return None
        final = self.expired or len(self.votes) >= self.asked
        out = []
        for i, mine in enumerate(self.local[0]):
            voters = [mine, *(v[i] for v in self.votes.values() if v)]
            flagged = [v for v in voters if v.verdict == pb.VERDICT_ADVERSARIAL]
            cleared = [v for v in voters if v.verdict == pb.VERDICT_BENIGN]
            if len(flagged) >= self.k:
                out.append(flagged[0])
            elif len(cleared) >= self.k:
                out.append(cleared[0])
            elif final:
                out.append(_NO_QUORUM)
            else:
                return None
        return out
