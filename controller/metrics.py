"""Prometheus metrics of the controller (thin shell; the core only returns facts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from openexample.buckets import latency_buckets


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, budget_s: float, max_workload: int) -> None:
        r = registry
        buckets = latency_buckets([budget_s])
        self.pkg_in = Counter(
            "openexample_controller_pkg_in", "PKG_IN messages received", ["model"], registry=r
        )
        self.pkg_in_bytes = Counter(
            "openexample_controller_received_bytes", "Bytes received from agents", registry=r
        )
        self.pkg_out_bytes = Counter(
            "openexample_controller_sent_bytes", "Bytes sent to agents", registry=r
        )
        self.verdicts = Counter(
            "openexample_controller_verdicts", "Verdicts by kind", ["model", "verdict"], registry=r
        )
        self.verdict_latency = Histogram(
            "openexample_controller_verdict_latency_seconds",
            "PKG_IN received to PKG_OUT queued, per batch",
            ["model"],
            buckets=buckets,
            registry=r,
        )
        self.detector_latency = Histogram(
            "openexample_controller_detector_latency_seconds",
            "Time one detector took on one batch",
            ["model", "detector"],
            buckets=buckets,
            registry=r,
        )
        self.batch_items = Histogram(
            "openexample_controller_batch_items",
            "Items scored together",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.workload = Gauge(
            "openexample_controller_workload", "Workload W: items queued or scoring", registry=r
        )
        self.workload_max = Gauge(
            "openexample_controller_workload_max", "Workload threshold W0", registry=r
        )
        self.workload_max.set(max_workload)
        self.overloaded = Counter(
            "openexample_controller_overloaded_items",
            "Items answered UNKNOWN/OVERLOADED (W over W0)",
            registry=r,
        )
        self.agents = Gauge(
            "openexample_controller_connected_agents", "Agent sessions in MAIN", registry=r
        )
        self.sessions = Counter(
            "openexample_controller_sessions", "Agent sessions", ["event"], registry=r
        )
        self.errors = Counter(
            "openexample_controller_protocol_errors",
            "Typed ERRORs sent to agents",
            ["error"],
            registry=r,
        )
        self.incidents = Counter(
            "openexample_controller_incidents", "Adversarial verdicts journaled", registry=r
        )
        self.blocked = Counter(
            "openexample_controller_sources_blocked",
            "Sources blocked by source tracing",
            registry=r,
        )
        self._verdict_children: dict[tuple[str, int], Counter] = {}

    def verdict(self, model: str, verdict: int) -> None:
        # Cached children: .labels() costs a dict lookup and a lock per call.
        child = self._verdict_children.get((model, verdict))
        if child is None:
            name = {1: "benign", 2: "adversarial", 3: "unknown"}.get(verdict, "unspecified")
            child = self.verdicts.labels(model, name)
            self._verdict_children[(model, verdict)] = child
        child.inc()
