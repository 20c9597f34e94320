"""Smoke runs of the benchmarks (--quick): they run end to end and write what they
promise. Figures are not asserted here (shared machines); the bench reports them.
And a bench stopped mid-run (SIGTERM, or SIGKILL) leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from bench.latency import SCENARIOS, SPLIT
from bench.procs import ROOT
from bench.procs import alive as _alive
from bench.procs import descendants as _descendants

pytestmark = pytest.mark.integration


def _stop(bench: subprocess.Popen) -> None:
    """SIGTERM (the bench stops what it started), then SIGKILL to its process group."""
    if bench.poll() is None:
        bench.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            bench.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(bench.pid, signal.SIGKILL)
    bench.wait(10)


def _run_bench(
    *args: str, timeout: float, module: str = "bench.cli"
) -> subprocess.CompletedProcess:
    """``openexample-bench ARGS`` (or ``python -m MODULE ARGS``); stopped, whatever it
    started with it, if it times out or the test is interrupted."""
    cmd = [sys.executable, "-m", module, *args]
    bench = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = bench.communicate(timeout=timeout)
    finally:
        _stop(bench)
    return subprocess.CompletedProcess(cmd, bench.returncode, out, err)


def _kind(cmdline: str) -> str:
    for needle, kind in (
        ("controller.cli", "controller"),
        ("bench.echo_servers", "echo server"),
        ("spawn_main", "client process"),
    ):
        if needle in cmdline:
            return kind
    return "other"


def test_latency_quick_writes_json_markdown_and_plot(tmp_path, artifacts):
    out = tmp_path / "latency"
    done = _run_bench("latency", "--quick", "--out", str(out), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "latency.json").read_text())
    assert report["schema"] == "openexample.bench.latency/1"
    runs = {(r["scenario"], r["agents"]) for r in report["results"]}
    assert runs == {(s, n) for s in SCENARIOS for n in (1, 4)}
    for r in report["results"]:
        assert 0 < r["p50_us"] <= r["p90_us"] <= r["p95_us"] <= r["p99_us"] <= r["p999_us"]
        assert r["requests"] > 0 and r["throughput_per_s"] > 0
    assert report["saturation"]["inspected"] > 0
    assert report["saturation_native"]["channel"] == "tcp"
    assert report["saturation_native"]["inspected"] > 0
    for sat in (report["saturation"], report["saturation_native"]):
        assert sat["controller_rss_mb"]["after"] > 0
    assert (out / "latency_cdf.png").stat().st_size > 1000
    assert (out / "latency_load.png").stat().st_size > 1000
    mem = report["memory"]  # what an agent adds to the user's process, and growth
    assert mem["calls"] > 0 and mem["agent_added_mb"] > 0 and len(mem["samples_mb"]) >= 2
    md = (out / "latency.md").read_text()
    assert "| inspect | 1 |" in md and "| inspect_plain | 1 |" in md
    # mTLS by default, and what it costs against the same on plain text.
    assert report["tls"]["channels"] == "mTLS" and md.startswith("Channels: mTLS")
    assert all(r["tls"] != r["scenario"].endswith("_plain") for r in report["results"])
    assert {(c["scenario"], c["agents"]) for c in report["tls_cost"]} == {
        (s, n) for s in SPLIT for n in (1, 4)
    }
    for c in report["tls_cost"]:
        for q in ("p50_us", "p99_us"):
            v = c[q]
            assert abs(v["tls"] - v["plaintext"] - v["added"]) < 0.11
    assert "What TLS costs" in md
    # Where the inspect latency goes, beside the floors of the same agent count, measured
    # the same way (mTLS, or plain text).
    assert [(b["scenario"], b["agents"]) for b in report["breakdown"]] == [
        (s, n)
        for s in ("inspect", "inspect_plain", "inspect_tcp", "inspect_tcp_plain")
        for n in (1, 4)
    ]
    for b in report["breakdown"]:
        st = b["stages"]
        suffix = "_plain" if b["scenario"].endswith("_plain") else ""
        assert st["n"] > 0 and set(b["floors"]) == {"grpc_echo" + suffix, "tcp_echo" + suffix}
        parts = ("before_send", "wire", "controller_queue", "detectors", "controller_reply")
        mean = sum(st[k]["mean_us"] for k in (*parts, "after"))
        assert abs(mean - st["total"]["mean_us"]) < 1.0  # means add up (each rounded)
    assert "agent: before send" in md


def test_detection_quick_writes_json_markdown_and_roc_plots(tmp_path, artifacts):
    out = tmp_path / "detection"
    done = _run_bench(
        "detection", "--quick", "--table-iv", "margin;default", "--out", str(out), timeout=300
    )
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
        fused = a["detectors"][-1]  # what on_adversarial: correct would hand out
        assert 0 <= fused["corrected_delivered"] <= 1
        seen = a["pixel_5nn"]  # what the adversarials look like to a pixel 5-NN
        assert (
            seen["source"] >= 0 and seen["attacker"] >= 0 and seen["source"] + seen["attacker"] <= 1
        )
        if a["attack"] == "DeepFool":  # minimal L2: the image is still its source
            assert seen["source"] > 0.8 > seen["attacker"], seen
        assert fused["delivered_accuracy"] is None or 0 <= fused["delivered_accuracy"] <= 1
    # clean flagged, split by whether the model was right (calibrated on all inputs)
    assert report["calibrated_on"]["inputs"] == "all" and report["calibrated_on"]["n"] == 1000
    assert report["pixel_5nn_clean_accuracy"] > 0.85
    assert (
        "| attack | delivered | right | 5-NN: source | 5-NN: attacker's |"
        in (out / "detection.md").read_text()
    )
    acc = report["clean_accuracy"]
    for f in ("0.01", "0.05"):  # the two parts average back to the whole
        right = report["fused_flagged_clean_right"][f]
        wrong = report["fused_flagged_clean_wrong"][f] or 0.0  # None: no mistakes
        whole = acc * right + (1 - acc) * wrong
        assert whole == pytest.approx(report["fused_fpr_on_clean"][f], abs=2e-3)
    rows = [(r["defence"], r["set"]) for r in report["table_iv"]]
    sets = ["baseline", "FGSM", "R+FGSM", "DeepFool"]
    assert rows == [("margin", s) for s in sets] + [("desvig+margin", s) for s in sets]
    for r in report["table_iv"]:
        # the paper's feed: 100 images per deployment and input set
        assert r["n"] == 100 and 0 <= r["accuracy_with_openexample"] <= 1
        assert r["controller_cpu_s_per_1000"] > 0
        # an agent costs its caller more than the model alone (the same images, one by one)
        assert r["agent_cpu_s_per_1000"] > r["model_cpu_s_per_1000"] > 0
        if r["set"] == "baseline":
            assert r["n_fooled"] is None and r["accuracy_with_openexample_fooled"] is None
        else:
            assert 0 < r["n_fooled"] <= r["n"] and r["budget"]
            assert r["accuracy_without_defence_fooled"] == 0.0  # fooled: the model is wrong
    by = {(r["defence"], r["set"]): r for r in report["table_iv"]}
    # DeSVig + margin catches FGSM at eps 0.3 that the margin alone misses
    fgsm = [by[(d, "FGSM")] for d in ("margin", "desvig+margin")]
    assert fgsm[1]["accuracy_with_openexample_fooled"] > 0.9
    assert fgsm[0]["accuracy_with_openexample_fooled"] < 0.5
    md = (out / "detection.md").read_text()
    head = "| defence | clean | FGSM | R+FGSM | DeepFool | CPU s / 1000 (agent + controller) |"
    assert md.count(head) == 2  # over every attacked input, and over the fooled ones
    assert "\n| none | " in md and "\n| margin | " in md and "\n| desvig+margin | " in md
    assert "The paper's Table IV" in md and "FGSM: L-inf eps 0.3;" in md
    assert "Delivered under `on_adversarial: correct`" in md
    assert sorted(p.name for p in out.glob("roc_*.png"))


def test_oip_latency_bench_times_every_api_under_both_rules(artifacts):
    done = _run_bench("-n", "50", timeout=240, module="bench.oip_latency")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    rows = [line.split("|")[1:3] for line in table if " us |" not in line]
    rows = [
        (api.strip(), rule.strip()) for api, rule in rows if rule.strip() in ("ALLOW", "INSPECT")
    ]
    apis = ["Predict (gRPC)", "KServe v2 gRPC (tritonclient)", "KServe v2 REST (tritonclient)"]
    assert rows == [(a, r) for r in ("ALLOW", "INSPECT") for a in apis]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_bench_stopped_mid_run_leaves_no_process_behind(tmp_path, artifacts, sig):
    """SIGTERM: the bench stops every process it started. SIGKILL: each of them sees its
    parent die and stops (bench.procs.watch_parent)."""
    log = tmp_path / "bench.log"
    cmd = [sys.executable, "-m", "bench.cli", "latency", "--quick", "--out", str(tmp_path)]
    # One long inspect run: the agents are connected and busy when the signal comes.
    cmd += ["--scenarios", "inspect", "--requests", "20000", "--no-saturation"]
    with log.open("w") as f:
        bench = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[tuple[int, str], str] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            seen |= _descendants(bench.pid)
            kinds = Counter(_kind(c) for c in _alive(seen).values())
            want = {"controller": 1, "echo server": 2, "client process": 2}
            if all(kinds[k] >= n for k, n in want.items()) and "latency:" in log.read_text():
                break
            assert bench.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{kinds}\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        time.sleep(2)  # the run under way
        seen |= _descendants(bench.pid)
        os.kill(bench.pid, sig)
        bench.wait(30)
        deadline = time.monotonic() + 15
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: cmd for (pid, _), cmd in _alive(seen).items()}
        assert not left, f"still running after {sig.name}: {left}\n{log.read_text()[-3000:]}"
        if sig == signal.SIGTERM:  # SystemExit from the handler, after the clean-up
            assert bench.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        for pid, _ in _alive(seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _stop(bench)


def test_a_controller_process_stops_when_its_parent_dies(tmp_path, artifacts):
    """ControllerProcess, as the tests use it: SIGKILL its parent and it stops too."""
    code = (
        "import sys, time\n"
        "from bench.procs import ControllerProcess\n"
        "cfg = {'models': {'mnist-cnn': {'detectors': sys.argv[2:]}}}\n"
        "p = ControllerProcess(sys.argv[1], cfg)\n"
        "print(p.start().proc.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), *map(str, artifacts)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: dict[tuple[int, str], str] = {}
    try:
        pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        seen = {k: c for k, c in _descendants(parent.pid).items() if k[0] == pid}
        assert len(seen) == 1 and "controller.cli" in next(iter(seen.values()))
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(seen), (tmp_path / "controller.log").read_text()[-3000:]
    finally:
        for p, _ in _alive(seen):
            os.kill(p, signal.SIGKILL)
        _stop(parent)


def test_first_run_notice_says_what_must_be_trained(tmp_path, monkeypatch, artifacts):
    from bench import cli
    from tests.conftest import CACHE

    parse = cli.build_parser().parse_args
    monkeypatch.setattr(cli, "CACHE", CACHE)
    assert cli.first_run_notice(parse(["latency", "--quick"])) is None  # cached (fixture)
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    for command in ("latency", "detection"):
        notice = cli.first_run_notice(parse([command, "--quick"]))
        assert notice.startswith("openexample-bench: first run: training the example model")
        assert "the detectors" in notice and " min)" in notice
    assert "attack sets" in cli.first_run_notice(parse(["detection", "--quick"]))
    assert cli.first_run_notice(parse(["demo"])) is None


def test_quick_latency_takes_turns_between_mtls_and_plain_text():
    """Each mode's calls come in blocks, in order, alternating who goes first."""
    from bench import quick_latency as q

    seen: list[tuple[str, int]] = []
    calls = {m: (lambda i, m=m: seen.append((m, i)) or i) for m in q.MODES}
    n = 2 * q.BLOCK + 7
    out = q.alternate(calls, n)
    assert out == {m: list(range(n)) for m in q.MODES}
    blocks = [seen[k][0] for k in range(0, len(seen), q.BLOCK)]
    assert blocks[:4] == ["mTLS", "plain", "plain", "mTLS"]
    table = q.cost_table({"ECHO gRPC": {"mTLS": [30.0] * 10, "plain": [20.0] * 10}})
    assert "|    +10.0 |" in table[-1]


@pytest.mark.integration
def test_soak_accounts_for_every_call(tmp_path, artifacts):
    """``openexample-bench soak``, short: two agents in processes of their own."""
    from tests.conftest import CACHE

    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "bench.cli", "soak", "--agents", "2", "--minutes", "0.15"]
    res = subprocess.run(
        [*cmd, "--out", str(out), "--cache", str(CACHE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    assert report["workers_reported"] == 2 and report["lost"] == 0
    assert report["sent"] == report["answered"] > 0
    assert sum(report["by_decider"].values()) == report["answered"]
    assert report["controller_rss_mb"]["end"] > 0 and (out / "soak_rss.png").is_file()


def test_score_speed_parts_times_every_part_and_leaves_the_detectors_as_they_were(artifacts):
    """``python -m bench.score_speed --parts``: the note's per-part figures come from it."""
    from bench.score_speed import setup, time_parts
    from tests.conftest import CACHE

    scorer, x, logits, labels = setup(CACHE)
    parts = time_parts(scorer, x, logits, labels)
    assert list(parts) == [
        "detector desvig",
        "detector margin",
        "fusion (evaluate)",
        "fusion + PKG_OUT items",
        "fusion + items + metrics",
    ]
    assert all(us > 0 for us in parts.values())
    # the replayed answers are gone: the detectors score again
    a, b = (scorer.score(x[i : i + 1], logits[i : i + 1], labels[i : i + 1]) for i in (0, 1))
    assert [i.score for i in a] != [i.score for i in b]
