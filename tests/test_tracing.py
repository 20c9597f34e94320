"""Source tracing (controller.tracing): block sources whose adversarial rate is
significantly above the detectors' false-positive rate, never honest ones."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from scipy.stats import binom

from controller.tracing import SourceTracer, TraceParams
from openexample.errors import ConfigError

KEY = ("agent-a", "plc-7")


def test_all_adversarial_blocked_at_fifth_then_counts_restart():
    tr = SourceTracer()
    for _ in range(4):
        assert tr.observe(KEY, True, 0.01, 0.0) is None  # k=n=4: p=1.6e-7, but k < 5
    d = tr.observe(KEY, True, 0.01, 0.0)
    assert d is not None
    assert d.key == KEY
    assert (d.verdicts, d.adversarial) == (5.0, 5.0)
    assert d.base_rate == pytest.approx(0.02)
    assert d.p_value == pytest.approx(0.02**5)  # 3.2e-9 < alpha
    assert len(tr) == 0  # reset: it must earn the next block from zero
    for _ in range(4):
        assert tr.observe(KEY, True, 0.01, 1.0) is None
    assert tr.observe(KEY, True, 0.01, 1.0) is not None


def _adversarial(seed: int, rate: float, size: int) -> np.ndarray:
    return np.random.default_rng(seed).random(size) < rate


def test_honest_high_rate_source_not_blocked_though_old_rule_would():
    hz, flags = 1000.0, _adversarial(0, 0.013, 10_000)  # FPR 1.3% against calibrated 1%
    tr = SourceTracer()
    for i, adv in enumerate(flags):
        assert tr.observe(KEY, bool(adv), 0.01, i / hz) is None, f"blocked at verdict {i + 1}"

    # The old rule (5 adversarial verdicts within 60 s) on the same stream: it blocks.
    strikes: deque[float] = deque()
    old_blocked_at = None
    for i, adv in enumerate(flags):
        if not adv:
            continue
        strikes.append(i / hz)
        while strikes and strikes[0] <= i / hz - 60.0:
            strikes.popleft()
        if len(strikes) >= 5:
            old_blocked_at = i + 1
            break
    assert old_blocked_at is not None


def test_attacker_hiding_one_in_ten_is_blocked():
    # Measured over 200 seeds: median 131 verdicts, all by 374. Assert generously.
    hz, limit = 100.0, 2_000
    for seed in range(50):
        tr = SourceTracer()
        flags = _adversarial(seed, 0.10, limit)
        blocked_at = next(
            (i + 1 for i, a in enumerate(flags) if tr.observe(KEY, bool(a), 0.01, i / hz)),
            None,
        )
        assert blocked_at is not None and blocked_at <= 1_000, (seed, blocked_at)


def test_sources_are_namespaced_by_agent():
    tr = SourceTracer()
    other = ("agent-b", "plc-7")
    for _ in range(4):
        assert tr.observe(KEY, True, 0.01, 0.0) is None
    for _ in range(4):
        assert tr.observe(other, True, 0.01, 0.0) is None
    d = tr.observe(KEY, True, 0.01, 0.0)
    assert d is not None and d.key == KEY and d.adversarial == 5.0
    assert len(tr) == 1  # agent-b's strikes are still its own, at 4


def test_counts_decay():
    tr = SourceTracer(TraceParams(half_life_s=60.0))
    for _ in range(4):
        assert tr.observe(KEY, True, 0.01, 0.0) is None
    assert tr.observe(KEY, True, 0.01, 600.0) is None  # k = 4/1024 + 1


def test_clock_going_backwards_means_no_decay():
    tr = SourceTracer()
    times = [100.0, 50.0, 100.0, 40.0]
    for t in times:
        assert tr.observe(KEY, True, 0.01, t) is None
    d = tr.observe(KEY, True, 0.01, 30.0)
    assert d is not None and d.adversarial == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("n", "k", "fpr", "p0"),
    [(5, 5, 0.01, 0.02), (100, 3, 0.01, 0.02), (50, 7, 0.05, 0.1), (1000, 30, 0.01, 0.02),
     (20, 15, 0.4, 0.5), (10, 1, 0.0, 2e-6)],
)  # fmt: skip
def test_p_value_is_binomial_tail_for_integer_counts(n, k, fpr, p0):
    # Test only at the k-th adversarial verdict, with an alpha that lets any p through.
    tr = SourceTracer(TraceParams(min_adversarial=k, alpha=1 - 1e-12))
    for _ in range(n - k):
        assert tr.observe(KEY, False, fpr, 0.0) is None
    for _ in range(k - 1):
        assert tr.observe(KEY, True, fpr, 0.0) is None
    d = tr.observe(KEY, True, fpr, 0.0)
    assert d is not None
    assert (d.verdicts, d.adversarial, d.base_rate) == (n, k, pytest.approx(p0))
    assert d.p_value == pytest.approx(binom.sf(k - 1, n, p0), rel=1e-9)


def test_max_sources_evicts_least_recently_seen():
    tr = SourceTracer(TraceParams(max_sources=3))
    a, b, c, d = (("agent", s) for s in "abcd")
    for key in (a, b, c):
        for _ in range(4):
            tr.observe(key, True, 0.01, 0.0)
    tr.observe(a, False, 0.01, 0.0)  # a is now the most recently seen; b the least
    tr.observe(d, True, 0.01, 0.0)
    assert len(tr) == 3
    assert tr.observe(b, True, 0.01, 0.0) is None  # b was forgotten: k restarts at 1
    assert len(tr) == 3  # ... and that evicted c
    assert tr.observe(a, True, 0.01, 0.0) is not None  # a kept its 4 strikes


def test_forget():
    tr = SourceTracer()
    for _ in range(4):
        tr.observe(KEY, True, 0.01, 0.0)
    tr.forget(KEY)
    tr.forget(("nobody", "none"))  # unknown keys are fine
    assert len(tr) == 0
    assert tr.observe(KEY, True, 0.01, 0.0) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("half_life_s", 0.0), ("alpha", 2), ("alpha", 0.0), ("min_adversarial", 0.5),
     ("fpr_factor", 0.5), ("max_sources", 0), ("alpha", float("nan"))],
)  # fmt: skip
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^trace_{field}: .*got {value!r}$"):
        TraceParams(**{field: value})
