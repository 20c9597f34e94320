"""``openexample-bench demo`` (``make demo``): the main job on the embedded default.

Trains what the default needs (cached), starts the controller daemon, attaches the
example MNIST model as a few agents, replays clean and adversarial (ART) traffic from
several end-user sources, and prints what was caught, missed, retracted and blocked,
who decided, and the added latency against the budget.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents import Guard, attach
from bench import attacks
from bench.attacks import adversarials, classifier
from bench.procs import ControllerProcess
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from controller.training.train import DEFAULT_DETECTORS, ensure_artifacts

MODEL_ID = "mnist-cnn"
DETECTORS = DEFAULT_DETECTORS
ATTACKS = ("FGSM", "PGD", "DeepFool")
ATTACK_SPECS = {"FGSM": attacks.FGSM, "PGD": attacks.PGD, "DeepFool": attacks.DEEPFOOL}
# controller/server.py: "source tracing blocked source 'S' on agent 'A': ..."
_BLOCKED = re.compile(r"source tracing blocked source '([^']*)' on agent '([^']*)'")


def make_attacks(model_path: Path, x: np.ndarray, y: np.ndarray, cache: Path) -> dict:
    """Successful adversarial examples per attack (IBM ART), cached on disk."""
    path = cache / f"attacks-{len(x)}.npz"
    if path.is_file():
        data = np.load(path)
        return {k: (data[f"{k}_x"], data[f"{k}_adv"], data[f"{k}_y"]) for k in ATTACKS}
    clf = classifier(model_path, x.shape[1:], 10)
    out, arrays = {}, {}
    for name in ATTACKS:
        t0 = time.perf_counter()
        adv = adversarials(ATTACK_SPECS[name], clf, x)
        ok = clf.predict(adv).argmax(1) != y
        out[name] = (x[ok], adv[ok], y[ok])
        arrays |= {f"{name}_x": x[ok], f"{name}_adv": adv[ok], f"{name}_y": y[ok]}
        print(
            f"  {name}: {ok.mean():.0%} of {len(x)} fool the model"
            f" ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return out


def start_controller(
    workdir: Path,
    artifacts: list[Path],
    budget_us: int,
    native: Sequence[str] = (),
    *,
    plaintext: bool = False,
    **config: Any,
) -> ControllerProcess:
    """The controller daemon with the default detectors and source tracing, on mTLS
    (certificates from a development CA in ``workdir/pki``; agents take theirs from
    :meth:`ControllerProcess.agent_tls`), or on plain text (loopback) with
    ``plaintext``. ``native``: native-channel addresses to listen on too (tcp://...,
    unix://...); ``config``: further controller settings."""
    cfg = {
        "budget_us": budget_us,
        "models": {MODEL_ID: {"detectors": [str(p.resolve()) for p in artifacts], "fpr": 0.01}},
        **config,
    }
    if plaintext:
        cfg["plaintext"] = True
    # Absolute: the config names its TLS files, read relative to the config's folder.
    return ControllerProcess(Path(workdir).resolve(), cfg, native=native).start()


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache = Path("var/cache")
    t_start, wall0 = time.perf_counter(), time.time()
    print("1/4 example model and detectors (cached after the first run)", flush=True)
    model_path = ensure_example_model(cache, "mnist5k")
    artifacts = ensure_artifacts(DETECTORS, cache=cache)
    splits = datasets.load("mnist5k").split()
    n = args.per_attack * args.agents
    print(f"2/4 adversarial examples with IBM ART on {n} test images", flush=True)
    attacks = make_attacks(model_path, splits.test.x[:n], splits.test.y[:n], cache)

    print("3/4 controller daemon and agents", flush=True)
    # One daemon on all three channels; the lines take turns (gRPC, native TCP, native
    # Unix socket), so an attack seen on one channel is refused on the others (RT push).
    sock = workdir.resolve() / "controller.sock"
    proc = start_controller(
        workdir, artifacts, args.budget_us, native=["tcp://127.0.0.1:0", f"unix://{sock}"]
    )
    addresses = [proc.address, proc.address_for("tcp"), proc.address_for("unix")]
    channels = ("grpc", "tcp", "unix")
    print(
        f"  every channel is mTLS: certificates from a development CA in {proc.pki.folder}",
        flush=True,
    )
    for i in range(args.agents):
        print(f"  line-{i + 1}: {channels[i % 3]} {addresses[i % 3]}", flush=True)
    retracted: Counter = Counter()

    def on_retraction(name: str) -> Callable[[Any], None]:
        return lambda res: retracted.update([name])

    guards = [
        attach(
            str(model_path),
            controller=addresses[i % 3],
            model_id=MODEL_ID,
            agent_id=f"line-{i + 1}",
            input_shape=(1, 28, 28),
            budget_us=args.budget_us,
            on_retraction=on_retraction(f"line-{i + 1}"),
            connect_timeout_s=30,
            **proc.agent_tls(f"line-{i + 1}"),  # its certificate: agent/line-N
        )
        for i in range(args.agents)
    ]
    # Traffic: honest users send clean images; compromised sources send adversarial ones
    # (persistent ones get blocked by source tracing). Every adversarial input goes to two
    # agents: the second one shows swift vigilance (an RT hit, no round trip).
    rng = np.random.default_rng(0)
    clean = splits.test.x[n : n + args.per_attack * args.agents]
    clean_y = splits.test.y[n : n + len(clean)]
    traffic: list[list[tuple]] = [[] for _ in guards]
    for i, (x, y) in enumerate(zip(clean, clean_y, strict=True)):
        traffic[i % len(guards)].append(("clean", x, y, f"user-{i % 7}"))
    for name, (_, adv, y) in attacks.items():
        for i in range(len(adv)):
            src = f"attacker-{i % 24}"
            first = i % len(guards)
            for k in (first, (first + 1) % len(guards)):
                traffic[k].append((name, adv[i], y[i], src))
    for t in traffic:
        rng.shuffle(t)

    print("4/4 replaying traffic", flush=True)
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    lat: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()

    def replay(name: str, g: Guard, items: list[tuple]) -> None:
        for kind, x, y, src in items:
            r = g(x, source_id=src)
            flagged = (not r.released) or r.label != r.model_label
            c = Counter(n=1)
            if kind == "clean":
                c["false_alarm"] = int(flagged)
            else:
                c["caught"] = int(flagged)
                c["missed"] = int(r.released and r.label != y)  # a wrong answer got out
            c[f"by_{r.decided_by}"] = 1
            with lock:
                rows[(name, kind)] += c
                lat[r.decided_by].append(r.latency_s)

    threads = [
        threading.Thread(target=replay, args=(f"line-{i + 1}", g, t))
        for i, (g, t) in enumerate(zip(guards, traffic, strict=True))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in guards:
        g.close()
    proc.stop()

    journal = workdir / "journal.sqlite3"
    db = sqlite3.connect(journal)
    # The journal outlives runs: count this run's incidents.
    incidents = db.execute("SELECT COUNT(*) FROM incidents WHERE at >= ?", (wall0,)).fetchone()[0]
    by_source = db.execute(
        "SELECT source_id, COUNT(*) FROM incidents WHERE at >= ? GROUP BY source_id"
        " ORDER BY 2 DESC",
        (wall0,),
    ).fetchall()
    # Sources are traced per agent: one attacker can be blocked on several lines.
    blocked = [f"{m[1]}@{m[2]}" for line in proc.log if (m := _BLOCKED.search(line))]
    print_report(rows, lat, args.budget_us)
    print(f"late verdicts delivered as retractions: {dict(sorted(retracted.items())) or 'none'}")
    shown = ", ".join(blocked[:6]) + (f" and {len(blocked) - 6} more" if len(blocked) > 6 else "")
    print(f"sources blocked by the controller: {len(blocked)} ({shown or 'none'})")
    top = ", ".join(f"{s} {n}" for s, n in by_source[:5])
    print(f"incidents journaled: {incidents} (most by source: {top})  ->  {journal}")
    print(f"controller log: {proc.log_path}; metrics were at {proc.metrics_url}")
    print(f"demo finished in {time.perf_counter() - t_start:.0f}s")
    return 0


def print_report(rows: dict, lat: dict, budget_us: int) -> None:
    header = (
        f"\n{'agent':<8} {'traffic':<9} {'n':>4} {'caught':>7} {'missed':>7} {'false':>6}"
        f" {'rule':>5} {'rt':>5} {'ctrl':>5} {'tmout':>6} {'disc':>5}"
    )
    print(header)
    print("-" * (len(header) - 1))
    for (agent, kind), c in sorted(rows.items()):
        caught = "-" if kind == "clean" else c["caught"]
        missed = "-" if kind == "clean" else c["missed"]
        false = c["false_alarm"] if kind == "clean" else "-"
        print(
            f"{agent:<8} {kind:<9} {c['n']:>4} {caught!s:>7} {missed!s:>7} {false!s:>6}"
            f" {c['by_rule']:>5} {c['by_rt']:>5} {c['by_controller']:>5}"
            f" {c['by_timeout']:>6} {c['by_disconnected']:>5}"
        )
    print(
        "\ncaught = withheld or relabelled; rule = decided by a local rule (sources blocked by"
        " the controller), rt = an RT entry (swift vigilance), ctrl = the controller's verdict"
    )
    print(f"\nadded latency by decider (budget {budget_us} us):")
    for who, values in sorted(lat.items()):
        us = np.asarray(values) * 1e6
        p50, p90, p99 = np.percentile(us, [50, 90, 99])
        within = float(np.mean(us <= budget_us))
        print(
            f"  {who:<12} n={len(us):<5} p50={p50:8.0f} us  p90={p90:8.0f} us"
            f"  p99={p99:8.0f} us  within budget {within:.0%}"
        )
