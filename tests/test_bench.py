"""Smoke runs of the benchmarks (--quick): they run end to end and write what they
promise. Figures are not asserted here (shared machines); the bench reports them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.latency import SCENARIOS

pytestmark = pytest.mark.integration


def test_latency_quick_writes_json_markdown_and_plot(tmp_path, artifacts):
    out = tmp_path / "latency"
    cmd = [sys.executable, "-m", "bench.cli", "latency", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "latency.json").read_text())
    assert report["schema"] == "openexample.bench.latency/1"
    runs = {(r["scenario"], r["agents"]) for r in report["results"]}
    assert runs == {(s, n) for s in SCENARIOS for n in (1, 4)}
    for r in report["results"]:
        assert 0 < r["p50_us"] <= r["p90_us"] <= r["p95_us"] <= r["p99_us"] <= r["p999_us"]
        assert r["requests"] > 0 and r["throughput_per_s"] > 0
    assert report["saturation"]["inspected"] > 0
    assert (out / "latency_cdf.png").stat().st_size > 1000
    assert "| inspect | 1 |" in (out / "latency.md").read_text()
