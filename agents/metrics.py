"""Prometheus metrics of one Guard: a thin shell over the core's plain counters.

Counters and gauges are read from :class:`agents.core.AgentCore` at scrape time (the
core counts with plain ints under the lock it already holds, so the fast path pays no
Prometheus locking). The latency histogram is observed on the caller's thread after
every inference, so it takes no lock either: each thread counts into its own shard
(a plain list) and a scrape sums the shards (:class:`LatencyHistograms`), about 4x
cheaper than prometheus-client's ``Histogram.observe`` (two locks per call).

Every series carries ``model`` and ``agent`` (the agent id: one per Guard, so bounded
by the deployment). Several Guards may share one registry (``attach(registry=...)``):
they share one histogram family and one collector, so the exposition stays valid.

``openexample_agent_rule_budget_seconds`` (one series per INSPECT rule in force) lives
here, not on the controller: the agent's rule table is the one every inference is
looked up in, so it is true for every rule actually applied: the controller's default
and the operator's and config's rules as the agent took them, a local rule
(``Guard.local_mod``), and the agent's own default while no controller has set one.
The controller only knows what it wants the tables to hold.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agents.core import AgentCore
from agents.privacy import NO_NOISE, PrivacyNoise
from agents.results import CONTROLLER, DISCONNECTED, RT, RULE, TIMEOUT
from openexample.buckets import latency_buckets as _latency_buckets_s
from openexample.rules import INSPECT, Rule, RuleTable, match_text

LATENCY = "openexample_agent_added_latency_seconds"
DECIDED_BY = (RULE, RT, CONTROLLER, TIMEOUT, DISCONNECTED)
# At most this many INSPECT rules per agent get a budget series (the table-miss always
# does; then the others in lookup order, highest priority first): a table may hold
# thousands of rules, a dashboard legend should not.
MAX_RULE_BUDGET_SERIES = 16
TABLE_MISS = "table-miss"


def rule_label(rule: Rule) -> str:
    """The ``rule`` label of a table entry: ``table-miss``, or its key in the table,
    ``prio=P match=M`` (the syntax of ``openexample-controller rules list``)."""
    if rule.is_table_miss:
        return TABLE_MISS
    return f"prio={rule.priority} match={match_text(rule.match.to_pb())}"


def rule_budgets(
    table: RuleTable, models: Collection[str], limit: int = MAX_RULE_BUDGET_SERIES
) -> list[tuple[str, str | None, float]]:
    """(label, the model its match names or None for any, budget in seconds) of the
    INSPECT rules of ``table`` that can match one of ``models`` (the agent's): the
    table-miss, and the others in lookup order up to ``limit`` in all. Stops early: it
    runs under the agent's lock."""
    miss = table.table_miss
    out: dict[str, tuple[str, str | None, float]] = {}

    def add(rule: Rule) -> None:
        # One series per label: bounds equal to match_text's 6 digits read alike.
        label = rule_label(rule)
        out.setdefault(label, (label, rule.match.model_id, rule.actions.budget_us / 1e6))

    room = limit - (miss.actions.verdict_source == INSPECT)
    for rule in table:
        if len(out) >= room:
            break
        model = rule.match.model_id
        if (
            rule is not miss
            and rule.actions.verdict_source == INSPECT
            and (model is None or model in models)
        ):
            add(rule)
    if miss.actions.verdict_source == INSPECT:
        add(miss)
    return list(out.values())


def latency_buckets(budgets_us: Iterable[int] = ()) -> tuple[float, ...]:
    """~10 us to 100 ms plus a boundary at each budget (microseconds)."""
    return _latency_buckets_s(b * 1e-6 for b in budgets_us)


class _Series:
    """One histogram series, counted in per-thread shards: [bucket counts..., +Inf, sum].

    A shard is written only by its own thread (no lost updates, no lock); a scrape
    copies every shard and folds those of finished threads into ``_retired``.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._local = threading.local()
        self._shards: list[tuple[weakref.ref[threading.Thread], list[float]]] = []
        self._retired = [0.0] * (len(bounds) + 2)
        self._lock = threading.Lock()  # shard list only; never taken by observe's fast path

    def _new_shard(self) -> list[float]:
        shard = [0.0] * (len(self.bounds) + 2)
        self._local.shard = shard
        with self._lock:
            self._shards.append((weakref.ref(threading.current_thread()), shard))
        return shard

    def observer(self) -> Callable[[float], None]:
        bounds, local, new = self.bounds, self._local, self._new_shard
        total = len(bounds) + 1

        def observe(value: float) -> None:
            try:
                shard = local.shard
            except AttributeError:
                shard = new()
            shard[bisect_left(bounds, value)] += 1
            shard[total] += value

        return observe

    def snapshot(self) -> list[float]:
        with self._lock:
            live = []
            for ref, shard in self._shards:
                thread = ref()
                if thread is None or not thread.is_alive():  # fold it: it gets no more
                    self._retired = [a + b for a, b in zip(self._retired, shard, strict=True)]
                else:
                    live.append((ref, shard))
            self._shards = live
            out = list(self._retired)
            for _, shard in live:
                out = [a + b for a, b in zip(out, list(shard), strict=True)]
        return out


class LatencyHistograms(Collector):
    """``openexample_agent_added_latency_seconds`` for every (model, agent) of a registry."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(sorted(b for b in bounds if b != float("inf")))
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()

    def series(self, model_id: str, agent_id: str) -> _Series:
        with self._lock:
            s = self._series.get((model_id, agent_id))
            if s is None:
                s = self._series[(model_id, agent_id)] = _Series(self.bounds)
            return s

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(
            LATENCY,
            "Latency the vigilance loop adds on top of the model, per inference.",
            labels=["model", "agent"],
        )

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        les = [*(floatToGoString(b) for b in self.bounds), "+Inf"]
        with self._lock:
            items = sorted(self._series.items())
        for (model, agent), series in items:
            snap = series.snapshot()
            cum, acc = [], 0.0
            for le, n in zip(les, snap, strict=False):
                acc += n
                cum.append((le, acc))
            fam.add_metric([model, agent], cum, snap[-1])
        yield fam


class _Shared:
    """What the Guards of one registry share: the histogram family and the collector."""

    def __init__(self, registry: CollectorRegistry, buckets: tuple[float, ...]) -> None:
        self.latency = LatencyHistograms(buckets)
        registry.register(self.latency)
        self.collector = _CoreCollector()
        registry.register(self.collector)


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, _Shared] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


class AgentMetrics:
    """The metrics of one Guard, in its registry (its own unless one is passed in)."""

    def __init__(
        self,
        core: AgentCore,
        lock: threading.Lock,
        registry: CollectorRegistry | None = None,
        budgets_us: Iterable[int] = (),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        with _SHARED_LOCK:
            shared = _SHARED.get(self.registry)
            if shared is None:  # buckets: the first Guard's budgets decide
                shared = _SHARED[self.registry] = _Shared(
                    self.registry, latency_buckets(budgets_us)
                )
        self.latency = shared.latency
        self.agent_id = core.agent_id
        self._observers = {m: self.latency.series(m, core.agent_id).observer() for m in core.models}
        shared.collector.add(core, lock)

    def observer(self, model_id: str) -> Callable[[float], None]:
        """The cached ``observe`` of one model's latency series (lock-free)."""
        obs = self._observers.get(model_id)
        if obs is None:
            obs = self._observers[model_id] = self.latency.series(
                model_id, self.agent_id
            ).observer()
        return obs


def _snapshot(core: AgentCore) -> dict:
    """The core's public snapshot as the collector's rows (call under the core's lock)."""
    snap = core.snapshot()
    c = snap.counters
    return dict(
        agent=snap.agent_id,
        models=list(snap.models),
        decisions=c.decisions,
        verdicts=c.verdicts,
        misses=c.misses_by_model,
        retractions=c.retractions_by_model,
        fail_mode=c.fail_mode_decisions,
        pkg_in=c.pkg_in,
        pkg_in_items=c.pkg_in_items,
        pkg_in_bytes=c.pkg_in_bytes,
        pkg_out=c.pkg_out,
        inferences=c.inferences,
        inspected=c.inspected,
        mirrored=c.mirrored,
        near_copies=c.near_copies,
        ft_joined=c.ft_joined,
        reconnects=c.reconnects,
        errors=c.errors_received,
        up=1.0 if snap.up else 0.0,
        privacy=[(m, info.privacy or NO_NOISE) for m, info in core.models.items()],
        rule_budgets=rule_budgets(core.rules, core.models),
        tables={
            name: (t.entries, t.max_entries, t.lookups, t.hits, t.evictions)
            for name, t in snap.tables.items()
        },
    )


class _CoreCollector(Collector):
    def __init__(self) -> None:
        self._cores: list[tuple[weakref.ref[AgentCore], threading.Lock]] = []
        self._guard = threading.Lock()

    def add(self, core: AgentCore, lock: threading.Lock) -> None:
        with self._guard:
            self._cores.append((weakref.ref(core), lock))

    def _snapshots(self) -> list[dict]:
        with self._guard:
            live = [(ref(), lock) for ref, lock in self._cores]
            self._cores = [(ref, lock) for ref, lock in self._cores if ref() is not None]
        out = []
        for core, lock in live:
            if core is None:
                continue
            with lock:  # a consistent snapshot; copying is cheap next to a scrape
                out.append(_snapshot(core))
        return out

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families are known at collect time only

    def collect(self) -> Iterator[Metric]:
        snaps = self._snapshots()
        fams: dict[str, Metric] = {}

        def fam(kind: type, name: str, doc: str, labels: list[str]) -> Metric:
            f = fams.get(name)
            if f is None:
                f = fams[name] = kind(name, doc, labels=labels)
            return f

        ma = ["model", "agent"]
        for s in snaps:
            agent, models = s["agent"], s["models"]

            def per_model(d: dict[str, int], models: list[str] = models) -> dict[str, int]:
                return {m: d.get(m, 0) for m in models} | d

            f = fam(
                CounterMetricFamily,
                "openexample_agent_decisions",
                "Inferences decided, by who decided (rule, rt, controller, timeout, disconnected).",
                ["model", "agent", "decided_by"],
            )
            decisions = {(m, by): 0 for m in models for by in DECIDED_BY} | s["decisions"]
            for (m, by), v in sorted(decisions.items()):
                f.add_metric([m, agent, by], v)
            f = fam(
                CounterMetricFamily,
                "openexample_agent_verdicts",
                "Verdicts learned (PKG_OUT items and RT hits), by verdict.",
                ["model", "agent", "verdict"],
            )
            verdicts = {(m, v): 0 for m in models for v in ("benign", "adversarial", "unknown")}
            for (m, v), n in sorted((verdicts | s["verdicts"]).items()):
                f.add_metric([m, agent, v], n)
            f = fam(
                CounterMetricFamily,
                "openexample_agent_budget_misses",
                "Inspections decided by the fail mode because the budget expired.",
                ma,
            )
            for m, v in sorted(per_model(s["misses"]).items()):
                f.add_metric([m, agent], v)
            f = fam(
                CounterMetricFamily,
                "openexample_agent_fail_mode_decisions",
                "Inferences the rule's fail mode decided (budget expired, or no"
                " controller), by whether the output was released (standalone) or"
                " withheld (secure).",
                ["model", "agent", "reason", "outcome"],
            )
            fm = {(m, "timeout", r): 0 for m in models for r in (True, False)}
            for (m, reason, released), v in sorted((fm | s["fail_mode"]).items()):
                f.add_metric([m, agent, reason, "released" if released else "withheld"], v)
            f = fam(
                CounterMetricFamily,
                "openexample_agent_retractions",
                "Late verdicts that overrode a timeout decision.",
                ma,
            )
            for m, v in sorted(per_model(s["retractions"]).items()):
                f.add_metric([m, agent], v)

            f = fam(
                GaugeMetricFamily,
                "openexample_agent_rule_budget_seconds",
                "Budget of each INSPECT rule in the agent's table, per model it matches"
                " (rule: table-miss, or prio=P match=M). At most"
                f" {MAX_RULE_BUDGET_SERIES} rules per agent: the table-miss and the first"
                " others in lookup order.",
                ["model", "agent", "rule"],
            )
            for label, match_model, budget_s in s["rule_budgets"]:
                for m in models:
                    if match_model is None or match_model == m:
                        f.add_metric([m, agent, label], budget_s)

            f = fam(
                GaugeMetricFamily,
                "openexample_agent_table_entries",
                "Entries in the agent's tables: rules (with the table-miss), rt (known"
                " verdicts), ft (pending verdicts).",
                ["agent", "table"],
            )
            for t, (n, *_rest) in s["tables"].items():
                f.add_metric([agent, t], n)
            f = fam(
                GaugeMetricFamily,
                "openexample_agent_table_max_entries",
                "Capacity of the agent's tables.",
                ["agent", "table"],
            )
            for t, (_n, cap, *_rest) in s["tables"].items():
                f.add_metric([agent, t], cap)
            for name, doc, i in (
                ("openexample_agent_table_lookups", "Lookups in the agent's tables.", 2),
                (
                    "openexample_agent_table_hits",
                    "Lookups that found an entry (rules: a rule other than the table-miss).",
                    3,
                ),
                ("openexample_agent_table_evictions", "Entries evicted to make room.", 4),
            ):
                f = fam(CounterMetricFamily, name, doc, ["agent", "table"])
                for t, row in s["tables"].items():
                    f.add_metric([agent, t], row[i])

            for name, doc, key in (
                ("openexample_agent_pkg_in", "PKG_IN messages sent.", "pkg_in"),
                ("openexample_agent_pkg_in_items", "Inferences sent in PKG_IN.", "pkg_in_items"),
                ("openexample_agent_pkg_in_bytes", "Bytes of PKG_IN sent.", "pkg_in_bytes"),
                ("openexample_agent_pkg_out", "PKG_OUT messages received.", "pkg_out"),
                (
                    "openexample_agent_inferences",
                    "Inferences through the vigilance loop.",
                    "inferences",
                ),
                (
                    "openexample_agent_inspections",
                    "Inferences sent to the controller and waited for (INSPECT).",
                    "inspected",
                ),
                (
                    "openexample_agent_mirrored",
                    "Copies sent that nobody waits for (MIRROR, SAMPLE).",
                    "mirrored",
                ),
                (
                    "openexample_agent_near_copies",
                    "Inferences refused from the RT as near-copies of a known adversarial"
                    " input (perceptual key within near_copy_radius bits).",
                    "near_copies",
                ),
                (
                    "openexample_agent_ft_joined",
                    "Inspections that joined an identical pending one (FT hit).",
                    "ft_joined",
                ),
                ("openexample_agent_reconnects", "Sessions opened after the first.", "reconnects"),
                (
                    "openexample_agent_protocol_errors_received",
                    "ERROR messages received from the controller.",
                    "errors",
                ),
            ):
                fam(CounterMetricFamily, name, doc, ["agent"]).add_metric([agent], s[key])
            fam(
                GaugeMetricFamily,
                "openexample_agent_connected",
                "1 while the controller session is up (MAIN).",
                ["agent"],
            ).add_metric([agent], s["up"])
            _privacy(fam, agent, s["privacy"])
        yield from fams.values()


def _privacy(fam: Callable[..., Metric], agent: str, rows: list[tuple[str, PrivacyNoise]]) -> None:
    """The privacy noise of each model (openexample/privacy.py): what its guarantee is."""
    inf = float("inf")
    eps = fam(
        GaugeMetricFamily,
        "openexample_agent_privacy_epsilon",
        "Local DP budget per input of what PKG_IN carries: part=input (the noised input),"
        " logits (0: not sent, +Inf: raw), total (one item in all, between inputs of the"
        " same label); +Inf = no guarantee.",
        ["model", "agent", "part"],
    )
    delta = fam(
        GaugeMetricFamily,
        "openexample_agent_privacy_delta",
        "The delta of openexample_agent_privacy_epsilon{part=total}.",
        ["model", "agent"],
    )
    scale = fam(
        GaugeMetricFamily,
        "openexample_agent_privacy_noise_scale",
        "Noise added per element: the Gaussian's sigma or the Laplace's b (0: none), for"
        " part=input or logits.",
        ["model", "agent", "part"],
    )
    info = fam(
        GaugeMetricFamily,
        "openexample_agent_privacy_info",
        "1, with the privacy noise as labels: mechanism, norm, logits mode and the spec"
        " (clip, centre) the controller checks against its detectors' calibration.",
        ["model", "agent", "mechanism", "norm", "logits", "spec"],
    )
    for m, noise in rows:
        logits_eps = {"raw": inf, "label": 0.0}.get(noise.logits or "", noise.logits_epsilon)
        eps.add_metric([m, agent, "input"], noise.epsilon if noise.on else inf)
        eps.add_metric([m, agent, "logits"], logits_eps)
        eps.add_metric([m, agent, "total"], noise.total_epsilon)
        delta.add_metric([m, agent], noise.total_delta)
        scale.add_metric([m, agent, "input"], noise.scale)
        scale.add_metric([m, agent, "logits"], noise.logits_scale)
        labels = [noise.mechanism, noise.norm, noise.logits or "raw", str(noise)]
        info.add_metric([m, agent, *labels], 1.0)
