"""Histogram buckets for sub-millisecond latencies (Prometheus' defaults start at 5 ms)."""

from __future__ import annotations

from collections.abc import Iterable

# 10 us .. 100 ms, 1-2-5 steps.
BASE_LATENCY_BUCKETS = (*(round(m * 10.0**e, 9) for e in range(-5, -1) for m in (1, 2, 5)), 0.1)


def latency_buckets(budgets_s: Iterable[float] = ()) -> tuple[float, ...]:
    """The base buckets plus a boundary at each configured budget (seconds)."""
    return tuple(sorted(set(BASE_LATENCY_BUCKETS) | {round(b, 9) for b in budgets_s if b > 0}))
