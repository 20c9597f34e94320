"""Prometheus metrics of the controller (thin shell; the core only returns facts).

Names follow Prometheus conventions: ``openexample_controller_`` prefix, base units
(``_seconds``, ``_bytes``), counters end in ``_total`` (prometheus-client adds it),
labels only with bounded values (model ids from the config, detector names, verdict
kinds, session events, error names). Raw end-user source ids never become a label,
except in the top-k gauge whose series count is capped at ``top_k``.

Hot path: per-model children are created once and cached in dicts (``.labels()`` costs
a lock and a tuple hash per call); histograms keep observations as plain values and
count them with numpy at scrape time (controller/histograms.py). The catalogue in
docs/metrics.md is generated from this registry by ``python -m bench.metrics_catalogue``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.histograms import BatchHistograms, DeferredHistograms
from openexample.buckets import latency_buckets

if TYPE_CHECKING:  # only for annotations: metrics never drive the core
    from controller.cluster import PeerLoad
    from controller.core import ControllerCore, Incident

VERDICTS = {0: "unspecified", 1: "benign", 2: "adversarial", 3: "unknown"}
SESSION_EVENTS = ("opened", "closed", "errored")
STAGES = ("queue", "score", "reply")  # stage_seconds, in the order a PKG_IN meets them
# Normalised margin of one detector (controller/detectors/fusion.py): 0 on the
# threshold, -1 a typical clean input, > 0 flagged.
MARGIN_BUCKETS = (-4.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


class ControllerMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        budget_s: float,
        max_workload: int,
        *,
        models: Iterable[str] = (),
        core: ControllerCore | None = None,
        top_k: int = 10,
    ) -> None:
        r = registry
        buckets = latency_buckets([budget_s])
        self.budget = Gauge(
            "openexample_controller_budget_seconds",
            "Budget of the default INSPECT rule installed on agents (the config's budget_us;"
            " each rule in force: openexample_agent_rule_budget_seconds)",
            registry=r,
        )
        self.budget.set(budget_s)
        self.pkg_in = Counter(
            "openexample_controller_pkg_in", "PKG_IN messages received", ["model"], registry=r
        )
        self.pkg_in_items = Counter(
            "openexample_controller_pkg_in_items",
            "Inferences received in PKG_IN messages",
            ["model"],
            registry=r,
        )
        self.pkg_in_bytes = Counter(
            "openexample_controller_pkg_in_bytes",
            "Bytes of PKG_IN messages received",
            ["model"],
            registry=r,
        )
        self.pkg_out = Counter(
            "openexample_controller_pkg_out", "PKG_OUT messages sent", ["model"], registry=r
        )
        self.pkg_out_bytes = Counter(
            "openexample_controller_pkg_out_bytes",
            "Bytes of PKG_OUT messages sent",
            ["model"],
            registry=r,
        )
        self.received_bytes = Counter(
            "openexample_controller_received_bytes",
            "Bytes received on agent streams, all messages",
            registry=r,
        )
        self.sent_bytes = Counter(
            "openexample_controller_sent_bytes",
            "Bytes sent on agent streams, all messages",
            registry=r,
        )
        self.verdicts = Counter(
            "openexample_controller_verdicts",
            "Verdicts answered, per inference, by kind",
            ["model", "verdict"],
            registry=r,
        )
        self.verdict_latency = DeferredHistograms(
            "openexample_controller_verdict_latency_seconds",
            "PKG_IN received to PKG_OUT queued, per PKG_IN",
            ["model"],
            buckets,
        )
        self.stage_latency = DeferredHistograms(
            "openexample_controller_stage_seconds",
            "Where one PKG_IN spent its controller time: queue (received to its batch's"
            " scoring started), score (the scoring call, shared by the batch), reply"
            " (scoring done to its PKG_OUT built); they add up to verdict_latency",
            ["model", "stage"],
            buckets,
        )
        self.detector_latency = DeferredHistograms(
            "openexample_controller_detector_latency_seconds",
            "Time one detector took on one batch (detector=pipeline: the whole fusion)",
            ["model", "detector"],
            buckets,
        )
        self.detector_flagged = Counter(
            "openexample_controller_detector_flagged_items",
            "Inferences a detector flagged (over its own threshold)",
            ["model", "detector"],
            registry=r,
        )
        self.detector_margin = BatchHistograms(
            "openexample_controller_detector_margin",
            "Normalised detector score per inference: (score - threshold) / (threshold -"
            " median clean score); 0 on the threshold, -1 a typical clean input (negative"
            " buckets, so no _sum/_count: OpenMetrics)",
            ("model", "detector"),
            MARGIN_BUCKETS,
        )
        self.batch_items = DeferredHistograms(
            "openexample_controller_batch_items",
            "Inferences scored together",
            [],
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.observe_batch_items = self.batch_items.observer()
        for h in (
            self.verdict_latency,
            self.stage_latency,
            self.detector_latency,
            self.detector_margin,
            self.batch_items,
        ):
            r.register(h)
        self.workload = Gauge(
            "openexample_controller_workload", "Workload W: items queued or scoring", registry=r
        )
        self.workload_max = Gauge(
            "openexample_controller_workload_max", "Workload threshold W0", registry=r
        )
        self.workload_max.set(max_workload)
        self.overloaded = Counter(
            "openexample_controller_overloaded_items",
            "Inferences answered UNKNOWN/OVERLOADED at once (W over W0)",
            registry=r,
        )
        self.agents = Gauge(
            "openexample_controller_connected_agents", "Agent sessions in MAIN", registry=r
        )
        self.sessions = Counter(
            "openexample_controller_sessions",
            "Agent sessions by event (opened, closed, errored)",
            ["event"],
            registry=r,
        )
        self.errors = Counter(
            "openexample_controller_protocol_errors",
            "Typed ERRORs sent to agents",
            ["error"],
            registry=r,
        )
        self.incidents = Counter(
            "openexample_controller_incidents",
            "Adversarial verdicts journaled as incidents",
            ["model"],
            registry=r,
        )
        self.blocked = Counter(
            "openexample_controller_sources_blocked",
            "Sources blocked by source tracing (a DROP rule on the agent they came through)",
            registry=r,
        )
        self.top_sources = _TopSources(top_k)
        r.register(self.top_sources)
        self.rt_entries = Gauge(
            "openexample_controller_rt_entries",
            "Entries in the controller-wide RT (known adversarial inputs, for resync)",
            registry=r,
        )
        self.blocked_now = Gauge(
            "openexample_controller_blocked_sources",
            "Sources blocked by source tracing right now",
            registry=r,
        )
        self.rules = Gauge(
            "openexample_controller_rules",
            "Desired vigilance rules, summed over agents (template: for new agents)",
            ["scope"],
            registry=r,
        )
        if core is not None:
            self.bind_core(core)
        # Cached children, keyed by model id (or (model, detector)).
        self._verdict_children: dict[tuple[str, int], Counter] = {}
        self._in: dict[str, tuple[Callable, Callable, Callable]] = {}
        self._out: dict[str, tuple[Callable, Callable]] = {}
        self._latency: dict[str, Callable[[float], None]] = {}
        self._stages: dict[str, tuple[Callable[[float], None], ...]] = {}
        self._incident: dict[str, Callable] = {}
        self._detectors: dict[tuple[str, tuple[str, ...]], list[tuple[Callable, Callable]]] = {}
        for event in SESSION_EVENTS:
            self.sessions.labels(event)
        for model in models:  # series exist (at 0) from the start, not at first use
            self.model(model)

    def bind_core(self, core: ControllerCore) -> None:
        """Gauges read from the core's public snapshot at scrape time."""
        self.rt_entries.set_function(lambda: core.snapshot().rt_entries)
        self.blocked_now.set_function(lambda: core.snapshot().blocked_sources)
        self.rules.labels("template").set_function(lambda: core.snapshot().template_rules)
        self.rules.labels("agents").set_function(lambda: core.snapshot().agent_rules)

    def model(self, model: str) -> None:
        """Create (and cache) every per-model child of ``model``."""
        for v in (1, 2, 3):
            self._verdict_child(model, v)
        self._in_children(model)
        self._out_children(model)
        self.latency_observer(model)
        self.stage_observers(model)
        self._incident_child(model)

    # --- hot path helpers (cached children) ---

    def _verdict_child(self, model: str, verdict: int) -> Counter:
        child = self._verdict_children.get((model, verdict))
        if child is None:
            child = self.verdicts.labels(model, VERDICTS.get(verdict, "unspecified"))
            self._verdict_children[(model, verdict)] = child
        return child

    def verdict(self, model: str, verdict: int) -> None:
        self._verdict_child(model, verdict).inc()

    def verdicts_seen(self, pairs: Sequence[tuple[str, int]]) -> None:
        """One (model, verdict) per inference: one ``inc`` per kind, not per item."""
        if len(pairs) == 1:
            self._verdict_child(*pairs[0]).inc()
            return
        for key, n in collections.Counter(pairs).items():
            self._verdict_child(*key).inc(n)

    def _in_children(self, model: str) -> tuple[Callable, Callable, Callable]:
        c = self._in.get(model)
        if c is None:
            c = self._in[model] = (
                self.pkg_in.labels(model).inc,
                self.pkg_in_items.labels(model).inc,
                self.pkg_in_bytes.labels(model).inc,
            )
        return c

    def _out_children(self, model: str) -> tuple[Callable, Callable]:
        c = self._out.get(model)
        if c is None:
            c = self._out[model] = (
                self.pkg_out.labels(model).inc,
                self.pkg_out_bytes.labels(model).inc,
            )
        return c

    def _incident_child(self, model: str) -> Callable:
        c = self._incident.get(model)
        if c is None:
            c = self._incident[model] = self.incidents.labels(model).inc
        return c

    def pkg_in_received(self, model: str, items: int, nbytes: int) -> None:
        msgs, n, size = self._in_children(model)
        msgs()
        n(items)
        size(nbytes)

    def pkg_out_sent(self, model: str, nbytes: int) -> None:
        msgs, size = self._out_children(model)
        msgs()
        size(nbytes)

    def latency_observer(self, model: str) -> Callable[[float], None]:
        obs = self._latency.get(model)
        if obs is None:
            obs = self._latency[model] = self.verdict_latency.observer(model)
        return obs

    def stage_observers(self, model: str) -> tuple[Callable[[float], None], ...]:
        """(queue, score, reply) observers of ``stage_seconds`` for ``model``."""
        obs = self._stages.get(model)
        if obs is None:
            obs = self._stages[model] = tuple(
                self.stage_latency.observer(model, stage) for stage in STAGES
            )
        return obs

    def record_incidents(self, incidents: Sequence[Incident]) -> None:
        for inc in incidents:
            self._incident_child(inc.model_id)()
        self.top_sources.add(inc.source_id for inc in incidents if inc.source_id)

    def observe_detectors(
        self,
        model: str,
        names: Sequence[str],
        seconds: Sequence[float],
        margins: np.ndarray | None,
        flags: np.ndarray,
    ) -> None:
        """One scored batch: per-detector latency, flagged counts, margin histograms.

        ``margins`` and ``flags`` are ``[D, N]``; ``seconds`` has one entry per detector
        plus, last, the whole pipeline's.
        """
        key = (model, tuple(names))
        children = self._detectors.get(key)
        if children is None:
            children = self._detectors[key] = [
                (
                    self.detector_latency.observer(model, n),
                    self.detector_flagged.labels(model, n).inc,
                )
                for n in (*names, "pipeline")
            ]
        for (observe, _), s in zip(children, seconds, strict=False):
            observe(s)
        if flags.any():  # most batches are clean: then no count moves
            counts = [*flags.sum(axis=1).tolist(), int(flags.any(axis=0).sum())]
            for (_, flagged), c in zip(children, counts, strict=False):
                if c:
                    flagged(c)
        if margins is not None:
            self.detector_margin.observe_batch(model, names, margins)


class _TopSources(Collector):
    """The ``k`` sources with the most adversarial verdicts (space-saving sketch).

    Exact while fewer than ``capacity`` distinct sources were seen; beyond that, counts
    are upper bounds (Metwally et al., space-saving). Only ``k`` series are exported at
    a time, so the label stays bounded; the full list is in the incident journal.
    """

    NAME = "openexample_controller_top_source_adversarial_verdicts"

    def __init__(self, k: int = 10, capacity: int = 1024) -> None:
        self.k = k
        self.capacity = max(capacity, k)
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, sources: Iterable[str]) -> None:
        with self._lock:
            counts = self._counts
            for s in sources:
                if s in counts:
                    counts[s] += 1
                elif len(counts) < self.capacity:
                    counts[s] = 1
                else:  # replace the smallest: it inherits that count (space-saving)
                    low = min(counts, key=counts.__getitem__)
                    counts[s] = counts.pop(low) + 1

    def top(self) -> list[tuple[str, int]]:
        with self._lock:
            items = list(self._counts.items())
        items.sort(key=lambda kv: (-kv[1], kv[0]))
        return items[: self.k]

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self._doc(), labels=["source"])

    def _doc(self) -> str:
        return (
            f"Adversarial verdicts of the {self.k} sources with the most since start"
            " (space-saving sketch; the incident journal has them all)"
        )

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(self.NAME, self._doc(), labels=["source"])
        for source, count in self.top():
            fam.add_metric([source], count)
        yield fam


class ClusterMetrics:
    """The east-west bus between controllers (controller/bus.py), registered only when
    the config has a ``cluster`` section. ``peers`` gives the peers' last workload
    messages (controller/cluster.py ``PeerLoad``), read at scrape time."""

    def __init__(self, registry: CollectorRegistry, peers: Callable[[], Sequence[PeerLoad]]):
        r = registry
        self.up = Gauge(
            "openexample_controller_cluster_bus_up",
            "1 while this controller is connected to the east-west bus (MQTT broker)",
            registry=r,
        )
        self.messages = Counter(
            "openexample_controller_cluster_messages",
            "Bus messages sent and accepted, by direction and kind (delta, state, load)",
            ["direction", "kind"],
            registry=r,
        )
        self.refused = Counter(
            "openexample_controller_cluster_refused",
            "Bus messages refused, by reason (sender: the sender field is not the identity"
            " in the topic; member: a role or rules message naming this agent group from"
            " an identity not in cluster.members; generation: a generation far ahead of"
            " this clock; topic, decode, version, body, entry)",
            ["reason"],
            registry=r,
        )
        self.applied = Counter(
            "openexample_controller_cluster_applied",
            "Changes other controllers made, applied here (rt, rt_removed, block, unblock)",
            ["change"],
            registry=r,
        )
        self.delta_delay = Histogram(
            "openexample_controller_cluster_delta_delay_seconds",
            "A peer's delta, from built there (its RT entry or block made) to merged here,"
            " on the two hosts' clocks (their offset included)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.dropped = Counter(
            "openexample_controller_cluster_deltas_dropped",
            "Deltas not published because the bus was down (the next snapshot carries them)",
            registry=r,
        )
        self.role = Gauge(
            "openexample_controller_cluster_role",
            "Mastership in this controller's agent group (controller/mastership.py): what=role"
            " (2 EQUAL, 3 MASTER, 4 SLAVE, as ControllerRole), what=generation (of the"
            " mastership it knows)",
            ["what"],
            registry=r,
        )
        for direction in ("sent", "received"):
            for kind in ("delta", "state", "load"):
                self.messages.labels(direction, kind)
        for change in ("rt", "rt_removed", "block", "unblock"):
            self.applied.labels(change)
        r.register(_Peers(peers))


class _Peers(Collector):
    """The peers' workload table (Table III: W, W0, service time; up or gone)."""

    FAMILIES = (
        ("workload", "W of a peer controller: items admitted and not answered"),
        ("max_workload", "W0 of a peer controller: its OVERLOADED threshold"),
        ("service_seconds", "A peer controller's measured scoring time per item"),
        ("up", "1 while a peer controller is up (0: its last will, a clean stop, or 30 s silent)"),
    )

    def __init__(self, peers: Callable[[], Sequence[PeerLoad]]) -> None:
        self._peers = peers

    def _families(self) -> dict[str, GaugeMetricFamily]:
        return {
            name: GaugeMetricFamily(
                f"openexample_controller_cluster_peer_{name}", doc, labels=["peer"]
            )
            for name, doc in self.FAMILIES
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        now = time.time()
        for p in list(self._peers()):
            fams["workload"].add_metric([p.identity], p.workload)
            fams["max_workload"].add_metric([p.identity], p.max_workload)
            fams["service_seconds"].add_metric([p.identity], p.service_s)
            fams["up"].add_metric([p.identity], 1.0 if p.counted_up(now) else 0.0)
        yield from fams.values()
