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


def test_detection_quick_writes_json_markdown_and_roc_plots(tmp_path, artifacts):
    out = tmp_path / "detection"
    cmd = [sys.executable, "-m", "bench.cli", "detection", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "detection.json").read_text())
    assert report["schema"] == "openexample.bench.detection/1"
    assert 0.9 < report["clean_accuracy"] <= 1.0
    attacks = {(a["attack"], a["eps"]) for a in report["attacks"]}
    assert {("FGSM", 0.3), ("R+FGSM", 0.3), ("PGD", 0.3), ("DeepFool", None)} <= attacks
    for a in report["attacks"]:
        names = [d["detector"] for d in a["detectors"]]
        assert names[-1] == "fused"
        assert {"feature_squeezing", "binary_input_detector"} <= set(names)
        for d in a["detectors"]:
            assert set(d["tpr_at_fpr"]) == {"0.01", "0.05"}
    sets = [r["set"] for r in report["table_iv"]]
    assert sets == ["baseline", "FGSM", "R+FGSM", "DeepFool"]
    for r in report["table_iv"]:
        assert r["n"] > 0 and 0 <= r["accuracy_with_openexample"] <= 1
    assert sorted(p.name for p in out.glob("roc_*.png"))
