"""``openexample-bench soak``: N agents for T minutes against one controller, every call
accounted for.

Each agent runs in a process of its own (``python -m bench.soak worker ...``, started
with :func:`bench.procs.spawn`), attached over mTLS, calling its guard in a loop with
clean inputs (a little noise, so they are new to the RT) and now and then an
adversarial one, from a few sources. A worker counts the calls it started and the
results it got, by who decided, and the verdict latency; the parent samples the
controller's RSS every second. The report (JSON and a plot, under ``--out``) says:
sent = answered (0 lost), answers by decider, latency percentiles, and whether the
controller's RSS stayed flat (within 5% after the warm-up) - the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.agent_memory import rss_mb
from bench.procs import ControllerProcess, exit_on_signals, spawn, stop_group

MODEL_ID = "mnist-cnn"
SHAPE = (1, 28, 28)
WARMUP_FRACTION = 0.2  # RSS is judged after the first fifth of the run


def worker(argv: list[str]) -> int:
    """One agent: call until ``--seconds`` are over, print one JSON line."""
    p = argparse.ArgumentParser(prog="bench.soak worker")
    p.add_argument("address")
    p.add_argument("model")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tls-ca", required=True)
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    p.add_argument("--adversarial", default="", help=".npy of adversarial inputs")
    args = p.parse_args(argv)

    from agents import attach
    from controller.training import datasets

    clean = datasets.load("mnist5k").split().test.x
    adv = np.load(args.adversarial) if args.adversarial else clean[:0]
    g = attach(
        args.model,
        controller=args.address,
        model_id=MODEL_ID,
        input_shape=SHAPE,
        budget_us=1_000_000,
        connect_timeout_s=60,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    rng = np.random.default_rng(args.seed)
    sent = answered = 0
    by: Counter = Counter()
    verdicts: Counter = Counter()
    latency: list[float] = []
    try:
        end = time.monotonic() + args.seconds
        i = 0
        while time.monotonic() < end:
            if len(adv) and i % 50 == 49:
                x, source = adv[(i // 50) % len(adv)], f"attacker-{args.seed}"
            else:
                noise = rng.uniform(0, 1e-3, SHAPE)
                x, source = np.clip(clean[i % len(clean)] + noise, 0, 1), f"line-{i % 4}"
            sent += 1
            r = g(x.astype(np.float32), source_id=source)
            answered += 1
            by[r.decided_by] += 1
            verdicts[r.verdict] += 1
            latency.append(r.latency_s)
            i += 1
    finally:
        g.close()
    lat = np.array(latency) * 1e6
    print(
        json.dumps(
            {
                "sent": sent,
                "answered": answered,
                "by": dict(by),
                "verdicts": dict(verdicts),
                "latency_us": {
                    q: round(float(np.percentile(lat, p)), 1) if len(lat) else None
                    for q, p in (("p50", 50), ("p99", 99), ("max", 100))
                },
            }
        ),
        flush=True,
    )
    return 0


def run(args: argparse.Namespace) -> dict:
    from controller.training.example_model import ensure_example_model
    from controller.training.train import DEFAULT_DETECTORS, ensure_artifacts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    model = ensure_example_model(cache, "mnist5k")
    artifacts = ensure_artifacts(DEFAULT_DETECTORS, cache=cache)
    adv_path = _adversarial(model, cache, out)
    proc = ControllerProcess(
        out / "controller",
        {
            "budget_us": 1_000_000,
            "models": {MODEL_ID: {"detectors": [str(p.resolve()) for p in artifacts], "fpr": 0.01}},
        },
    ).start()
    seconds = args.minutes * 60
    workers: list[subprocess.Popen] = []
    rss: list[tuple[float, float]] = []
    try:
        for n in range(args.agents):
            t = proc.agent_tls(f"soak-{n}")
            workers.append(
                spawn(
                    "bench.soak",
                    "worker",
                    proc.address,
                    str(model),
                    "--seconds",
                    str(seconds),
                    "--seed",
                    str(n),
                    "--tls-ca",
                    t["tls_ca"],
                    "--tls-cert",
                    t["tls_cert"],
                    "--tls-key",
                    t["tls_key"],
                    "--adversarial",
                    str(adv_path),
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        t0 = time.monotonic()
        while any(w.poll() is None for w in workers):
            rss.append((time.monotonic() - t0, rss_mb(proc.proc.pid)))
            time.sleep(1.0)
            if time.monotonic() - t0 > seconds + 120:
                raise TimeoutError("soak workers did not finish")
        results = []
        for w in workers:
            lines = [line for line in (w.stdout.read() if w.stdout else "").splitlines() if line]
            results.append(json.loads(lines[-1]) if lines else None)
    finally:
        for w in workers:
            stop_group(w, 5)
        proc.stop()
    report = _report(args, results, rss, seconds)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    _plot(rss, out / "soak_rss.png")
    return report


def _adversarial(model: Path, cache: Path, out: Path) -> Path:
    """FGSM (ART) on a few test images, cached: what the attacker sources send."""
    path = cache / "soak-fgsm.npy"
    if not path.is_file():
        from bench import attacks
        from controller.training import datasets

        x = datasets.load("mnist5k").split().test.x[:64]
        clf = attacks.classifier(model, SHAPE, 10)
        np.save(path, attacks.adversarials(attacks.FGSM, clf, x).astype(np.float32))
    return path


def _report(args: argparse.Namespace, results: list, rss: list, seconds: float) -> dict:
    ok = [r for r in results if r is not None]
    sent = sum(r["sent"] for r in ok)
    answered = sum(r["answered"] for r in ok)
    by: Counter = Counter()
    for r in ok:
        by.update(r["by"])
    after = [m for t, m in rss if t >= seconds * WARMUP_FRACTION]
    growth = (max(after) - after[0]) / after[0] if len(after) > 1 else 0.0
    return {
        "agents": args.agents,
        "minutes": args.minutes,
        "workers_reported": len(ok),
        "sent": sent,
        "answered": answered,
        "lost": sent - answered + (len(results) - len(ok)),
        "by_decider": dict(by),
        "calls_per_s": round(answered / seconds, 1) if seconds else None,
        "latency_us_p50_per_agent": [r["latency_us"]["p50"] for r in ok],
        "latency_us_p99_per_agent": [r["latency_us"]["p99"] for r in ok],
        "controller_rss_mb": {
            "start": rss[0][1] if rss else None,
            "after_warmup": after[0] if after else None,
            "end": rss[-1][1] if rss else None,
            "growth_after_warmup": round(growth, 4),
            "flat_within_5pct": growth <= 0.05,
        },
    }


def _plot(rss: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([t for t, _ in rss], [m for _, m in rss])
    ax.set_xlabel("seconds")
    ax.set_ylabel("controller RSS (MB)")
    ax.set_title("openexample-bench soak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", default="var/bench/soak")
    p.add_argument("--cache", default="var/cache")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    exit_on_signals()
    p = argparse.ArgumentParser(prog="openexample-bench soak", description=__doc__)
    add_arguments(p)
    report = run(p.parse_args(argv))
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
