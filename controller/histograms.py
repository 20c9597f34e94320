"""Histograms for the scoring path: an observation is a list append, counted at scrape.

prometheus-client's ``Histogram.observe`` takes a lock and walks the buckets (~2 us on
the CI machine kind); a PKG_IN made about ten of them, and with the per-detector margin
histograms and flagged counts the metrics were ~27 us of a ~150 us scoring call. Here the
hot path appends to a Python list under an uncontended lock, and the values are counted
with numpy (``searchsorted`` + ``bincount``) when Prometheus scrapes, or once
``FOLD_AT`` values wait (so memory stays bounded without a scrape). The exposition is
the same as prometheus-client's: cumulative ``_bucket`` series with ``le``, ``_count``
and ``_sum`` (no ``_created``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

FOLD_AT = 4096  # values waiting per series before the hot path counts them itself


class _Series:
    """One label set: bucket counts and sum so far, and the values not counted yet."""

    __slots__ = ("counts", "pending", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = np.zeros(buckets, np.int64)  # per bucket (not cumulative), +Inf last
        self.total = 0.0
        self.pending: list = []  # floats (DeferredHistograms) or arrays (BatchHistograms)


class _Histograms(Collector):
    """Series keyed by their label values; subclasses say how pending values count."""

    def __init__(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self.bounds = np.asarray([b for b in buckets if b != math.inf], np.float64)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}

    def _get(self, key: tuple[str, ...]) -> _Series:
        s = self._series.get(key)
        if s is None:
            with self._lock:
                s = self._series.setdefault(key, _Series(len(self.bounds) + 1))
        return s

    def _count(self, values: np.ndarray) -> np.ndarray:
        # bucket i counts values <= bounds[i]; the last slot is +Inf (NaN lands there too)
        idx = np.searchsorted(self.bounds, values.ravel(), side="left")
        return np.bincount(idx, minlength=len(self.bounds) + 1)

    def _fold(self, s: _Series) -> None:
        """Count what waits in ``s`` (the caller holds the lock)."""
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        with self._lock:
            snap = []
            for key, s in sorted(self._series.items()):
                self._fold(s)
                snap.append((key, s.counts.copy(), s.total))
        bounds = [*(floatToGoString(b) for b in self.bounds), "+Inf"]
        for key, counts, total in snap:
            cum = np.cumsum(counts).tolist()
            fam.add_metric(list(key), list(zip(bounds, cum, strict=True)), total)
        yield fam


class DeferredHistograms(_Histograms):
    """A labelled histogram of floats: ``observer(*labels)`` gives the hot path's
    ``observe(value)``. Observations of a series are visible at the next scrape."""

    def observer(self, *labels: str) -> Callable[[float], None]:
        """The series exists (at 0) from now on, as prometheus-client's ``.labels()``."""
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name}: want labels {self.labels}, got {labels}")
        s = self._get(tuple(labels))
        lock, pending = self._lock, s.pending

        def observe(value: float) -> None:
            with lock:
                pending.append(value)
                if len(pending) >= FOLD_AT:
                    self._fold(s)

        return observe

    def _fold(self, s: _Series) -> None:
        if s.pending:
            values = np.asarray(s.pending, np.float64)
            s.pending.clear()
            s.counts += self._count(values)
            s.total += math.fsum(values.tolist())


class BatchHistograms(_Histograms):
    """Histograms of per-detector values filled a ``[D, N]`` array at a time, one series
    per (model, name); NaN counts in +Inf. With negative buckets prometheus-client writes
    no ``_sum`` or ``_count`` (OpenMetrics)."""

    def observe_batch(self, model: str, names: Sequence[str], values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        with self._lock:
            for j, name in enumerate(names):
                s = self._series.get((model, name))
                if s is None:
                    s = self._series[(model, name)] = _Series(len(self.bounds) + 1)
                s.pending.append(values[j])
                if len(s.pending) >= FOLD_AT:
                    self._fold(s)

    def _fold(self, s: _Series) -> None:
        if s.pending:
            rows = np.concatenate(s.pending)
            s.pending.clear()
            s.counts += self._count(rows)
            s.total += float(rows[np.isfinite(rows)].sum())
