"""Prometheus metrics of one Guard: a thin shell over the core's plain counters.

Counters and gauges are read from :class:`agents.core.AgentCore` at scrape time (the
core counts with plain ints under the lock it already holds, so the fast path pays no
Prometheus locking); only the latency histogram is a live prometheus-client metric,
with its per-model child cached so the hot path never calls ``.labels()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agents.core import AgentCore

# ~10 us to 100 ms (ARCHITECTURE §5); attach() adds a boundary at each budget.
BASE_BUCKETS = (
    10e-6, 20e-6, 35e-6, 50e-6, 100e-6, 200e-6, 350e-6, 500e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1,
)  # fmt: skip


def latency_buckets(budgets_us: Iterable[int] = ()) -> tuple[float, ...]:
    extra = {b * 1e-6 for b in budgets_us if 0 < b * 1e-6 < 0.1}
    return tuple(sorted(set(BASE_BUCKETS) | extra))


class AgentMetrics:
    """The registry of one Guard (its own unless one is passed in)."""

    def __init__(
        self,
        core: AgentCore,
        lock: threading.Lock,
        registry: CollectorRegistry | None = None,
        budgets_us: Iterable[int] = (),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.latency = Histogram(
            "openexample_agent_added_latency_seconds",
            "Latency the vigilance loop adds on top of the model, per inference.",
            ["model"],
            buckets=latency_buckets(budgets_us),
            registry=self.registry,
        )
        self._observers = {m: self.latency.labels(m).observe for m in core.models}
        self.registry.register(_CoreCollector(core, lock))

    def observer(self, model_id: str):  # noqa: ANN201 - a bound Histogram.observe
        """The cached ``observe`` of one model's latency histogram child."""
        obs = self._observers.get(model_id)
        if obs is None:
            obs = self._observers[model_id] = self.latency.labels(model_id).observe
        return obs


class _CoreCollector(Collector):
    def __init__(self, core: AgentCore, lock: threading.Lock) -> None:
        self._core = core
        self._lock = lock

    def collect(self) -> Iterator[Metric]:
        c = self._core
        with self._lock:  # a consistent snapshot; copying is cheap next to a scrape
            decisions = dict(c.decisions)
            verdicts = dict(c.verdicts)
            misses = dict(c.misses_by_model)
            retractions = dict(c.retractions_by_model)
            scalars = (
                c.pkg_in_total,
                c.pkg_in_items,
                c.pkg_in_bytes,
                c.pkg_out_total,
                c.inferences,
                c.reconnects,
                1.0 if c.up else 0.0,
                len(c.tables.rt),
                len(c.tables.ft),
                len(c.rules),
            )
            models = list(c.models)
        pkg_in, items, nbytes, pkg_out, inferences, reconnects, up, rt, ft, rules = scalars

        def counter(name: str, doc: str, labels: list[str], samples: dict) -> Metric:
            fam = CounterMetricFamily(name, doc, labels=labels)
            for key, value in sorted(samples.items()):
                fam.add_metric(list(key) if isinstance(key, tuple) else [key], value)
            return fam

        def by_model(d: dict[str, int]) -> dict[str, int]:
            return {m: d.get(m, 0) for m in models} | d

        yield counter(
            "openexample_agent_decisions",
            "Inferences decided, by who decided.",
            ["model", "decided_by"],
            decisions,
        )
        yield counter(
            "openexample_agent_verdicts",
            "Verdicts learned (PKG_OUT items and RT hits), by verdict.",
            ["model", "verdict"],
            verdicts,
        )
        yield counter(
            "openexample_agent_budget_misses",
            "Inspections decided by the fail mode because the budget expired.",
            ["model"],
            by_model(misses),
        )
        yield counter(
            "openexample_agent_retractions",
            "Late verdicts that overrode a timeout decision.",
            ["model"],
            by_model(retractions),
        )
        for name, doc, value in (
            ("openexample_agent_pkg_in", "PKG_IN messages sent.", pkg_in),
            ("openexample_agent_pkg_in_items", "Inferences sent in PKG_IN.", items),
            ("openexample_agent_pkg_in_bytes", "Bytes of PKG_IN sent.", nbytes),
            ("openexample_agent_pkg_out", "PKG_OUT messages received.", pkg_out),
            ("openexample_agent_inferences", "Inferences through the vigilance loop.", inferences),
            ("openexample_agent_reconnects", "Sessions opened after the first.", reconnects),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("openexample_agent_connected", "1 while the controller session is up.", up),
            ("openexample_agent_rt_entries", "Entries in the RT (known verdicts).", rt),
            ("openexample_agent_ft_entries", "Entries in the FT (pending verdicts).", ft),
            ("openexample_agent_rules", "Vigilance rules installed (with the table-miss).", rules),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
