"""What an agent counts, and the public snapshot that metrics and STATS read.

The core counts with plain ints under the lock it already holds (the fast path pays no
Prometheus locking); :meth:`agents.core.AgentCore.snapshot` copies them into an
:class:`AgentSnapshot` that nothing else can change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from agents.results import DISCONNECTED, TIMEOUT, UNKNOWN, VERDICT_NAMES, Result


def _bump(d: dict, key: object) -> None:
    d[key] = d.get(key, 0) + 1


@dataclass(slots=True)
class AgentCounters:
    inferences: int = 0
    decided_locally: int = 0  # by a rule or an RT entry
    near_copies: int = 0  # of those, refused as near-copies of a known attack
    inspected: int = 0  # sent up and waited for (INSPECT)
    mirrored: int = 0  # sent up, nobody waits (MIRROR, SAMPLE)
    budget_misses: int = 0
    retractions: int = 0
    sessions: int = 0
    reconnects: int = 0
    pkg_in: int = 0
    pkg_in_items: int = 0
    pkg_in_bytes: int = 0
    pkg_out: int = 0
    ft_joined: int = 0
    unmatched_pkg_out: int = 0  # answered after the late window, or not ours
    errors_received: int = 0
    # (model, decided_by) -> n
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)
    # (model, "benign" / "adversarial" / "unknown") -> n
    verdicts: dict[tuple[str, str], int] = field(default_factory=dict)
    misses_by_model: dict[str, int] = field(default_factory=dict)
    retractions_by_model: dict[str, int] = field(default_factory=dict)
    # (model, TIMEOUT or DISCONNECTED, released) -> n: decisions the fail mode made
    fail_mode_decisions: dict[tuple[str, str, bool], int] = field(default_factory=dict)

    def decision(self, res: Result) -> None:
        _bump(self.decisions, (res.model_id, res.decided_by))
        by = res.decided_by
        if by in (TIMEOUT, DISCONNECTED):
            _bump(self.fail_mode_decisions, (res.model_id, by, res.released))
            if by == TIMEOUT:
                self.budget_misses += 1
                _bump(self.misses_by_model, res.model_id)

    def verdict(self, model_id: str, verdict: int) -> None:
        _bump(self.verdicts, (model_id, VERDICT_NAMES.get(verdict, UNKNOWN)))

    def retraction(self, model_id: str) -> None:
        self.retractions += 1
        _bump(self.retractions_by_model, model_id)

    def copy(self) -> AgentCounters:
        """A copy nothing else changes (the ints are immutable; the dicts are copied)."""
        return dataclasses.replace(
            self,
            decisions=dict(self.decisions),
            verdicts=dict(self.verdicts),
            misses_by_model=dict(self.misses_by_model),
            retractions_by_model=dict(self.retractions_by_model),
            fail_mode_decisions=dict(self.fail_mode_decisions),
        )


@dataclass(frozen=True, slots=True)
class TableCounts:
    entries: int
    max_entries: int
    lookups: int
    hits: int
    evictions: int


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    agent_id: str
    models: tuple[str, ...]
    up: bool  # the session is in MAIN
    counters: AgentCounters  # a copy
    tables: dict[str, TableCounts]  # "rules", "rt", "ft"
    echo_rtt_s: float | None = None
