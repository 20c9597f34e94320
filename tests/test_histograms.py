"""controller/histograms.py against prometheus-client's own Histogram: same exposition."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from controller import histograms
from controller.histograms import BatchHistograms, DeferredHistograms

BUCKETS = (1e-5, 1e-4, 2.5e-4, 1e-3, 0.01, 0.1, 1.0)


def _samples(reg: CollectorRegistry, name: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}, without prometheus-client's _created."""
    out = {}
    for fam in reg.collect():
        for s in fam.samples:
            if s.name.startswith(name) and not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _values(seed: int, n: int) -> list[float]:
    rng = np.random.default_rng(seed)
    v = rng.lognormal(-8, 2, n)
    # on the bucket bounds exactly (le is inclusive), zero, and past the last bound
    return [*v.tolist(), *BUCKETS, 0.0, 5.0]


def test_same_exposition_as_prometheus_client() -> None:
    ref_reg, our_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("x_seconds", "doc", ["model", "stage"], buckets=BUCKETS, registry=ref_reg)
    ours = DeferredHistograms("x_seconds", "doc", ["model", "stage"], BUCKETS)
    our_reg.register(ours)
    for key, seed in ((("m", "queue"), 1), (("m", "score"), 2), (("other", "queue"), 3)):
        observe = ours.observer(*key)
        for v in _values(seed, 500):
            ref.labels(*key).observe(v)
            observe(v)
    want, got = _samples(ref_reg, "x_seconds"), _samples(our_reg, "x_seconds")
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k


def test_series_exist_from_the_observer_on_and_unlabelled_works() -> None:
    reg = CollectorRegistry()
    h = DeferredHistograms("n_items", "doc", [], (1, 2, 4))
    reg.register(h)
    observe = h.observer()
    assert _samples(reg, "n_items")[("n_items_count", ())] == 0
    for v in (1, 3, 3, 9):
        observe(v)
    s = _samples(reg, "n_items")
    assert s[("n_items_bucket", (("le", "1.0"),))] == 1
    assert s[("n_items_bucket", (("le", "4.0"),))] == 3
    assert s[("n_items_bucket", (("le", "+Inf"),))] == 4
    assert s[("n_items_sum", ())] == 16
    with pytest.raises(ValueError, match="labels"):
        h.observer("unexpected")


def test_values_wait_bounded_without_a_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(histograms, "FOLD_AT", 64)
    reg = CollectorRegistry()
    h = DeferredHistograms("b_seconds", "doc", ["model"], BUCKETS)
    reg.register(h)
    observe = h.observer("m")
    series = h._get(("m",))
    for i in range(1000):
        observe(1e-3)
        assert len(series.pending) < 64, i
    assert _samples(reg, "b_seconds")[("b_seconds_count", (("model", "m"),))] == 1000


def test_observations_from_threads_while_scraping_are_all_counted() -> None:
    reg = CollectorRegistry()
    h = DeferredHistograms("t_seconds", "doc", ["model"], BUCKETS)
    reg.register(h)
    observe = h.observer("m")
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            _samples(reg, "t_seconds")

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        workers = [
            threading.Thread(target=lambda: [observe(1e-4) for _ in range(20_000)])
            for _ in range(3)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        scraper.join()
    assert _samples(reg, "t_seconds")[("t_seconds_count", (("model", "m"),))] == 60_000


def test_batch_histograms_count_each_detector_row() -> None:
    reg = CollectorRegistry()
    h = BatchHistograms("margin", "doc", ("model", "detector"), (-1.0, 0.0, 1.0))
    reg.register(h)
    h.observe_batch("m", ["a", "b"], np.array([[-2.0, 0.0, 0.5], [3.0, math.nan, -1.0]]))
    h.observe_batch("m", ["a", "b"], np.array([[1.0], [2.0]]))
    s = _samples(reg, "margin")

    def at(name: str, detector: str, le: str | None = None) -> float:
        labels = {"model": "m", "detector": detector, **({"le": le} if le else {})}
        return s[(name, tuple(sorted(labels.items())))]

    assert at("margin_bucket", "a", "-1.0") == 1
    assert at("margin_bucket", "a", "0.0") == 2
    assert at("margin_bucket", "a", "1.0") == 4
    assert at("margin_bucket", "a", "+Inf") == 4
    assert at("margin_bucket", "b", "-1.0") == 1
    assert at("margin_bucket", "b", "1.0") == 1
    assert at("margin_bucket", "b", "+Inf") == 4  # NaN counts in +Inf
    # negative buckets: no _sum or _count (OpenMetrics), as prometheus-client writes it
    assert not any(k[0] in ("margin_sum", "margin_count") for k in s)
