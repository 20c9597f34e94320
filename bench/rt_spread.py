"""How long an RT entry made on one controller takes to reach every agent of another
(``python -m bench.rt_spread -n 50``).

Mosquitto with TLS and its ACL, two controller processes (ctl-0, ctl-1) on one
development CA, one agent on ctl-0 and ``--agents`` agents on ctl-1, all in this process,
mTLS everywhere. FGSM inputs (ART, eps 0.3) go through ctl-0's agent one at a time;
each one its detectors flag becomes an RT entry there, which ctl-0 replicates on the bus
and ctl-1 pushes to its agents. The delay of an entry: from when ctl-0 built its delta
(``BusMessage.sent_at``, read off the bus by an observer with a certificate of its own)
until the last of ctl-1's agents holds it in its RT (a thread polls their tables; one
machine, one clock). Prints the median, p90 and max over the entries.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ID = "mnist-cnn"


def _fgsm(model_path: str, n: int) -> np.ndarray:
    """FGSM eps 0.3 on test images, as tests/conftest.py's fixture makes them."""
    import torch
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    from controller.reference_model import load_model
    from controller.training import datasets

    test = datasets.load("mnist5k").split().test
    clf = PyTorchClassifier(
        load_model(model_path),
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    x = test.x[: 6 * n]
    return FastGradientMethod(clf, eps=0.3).generate(x).astype(np.float32)


def _watch(guards: list[Any], seen: list[dict[bytes, float]], stop: threading.Event) -> None:
    """Polls each agent's RT: when each fingerprint first appeared there (unix time)."""
    while not stop.is_set():
        for g, first in zip(guards, seen, strict=True):
            with g._lock:
                fps = [e.fingerprint for e in g.core.tables.rt.entries(MODEL_ID)]
            now = time.time()
            for fp in fps:
                first.setdefault(fp, now)
        time.sleep(0.0002)


def spread(root: Path, artifacts: list[Path], model: str, n: int, agents: int) -> list[float]:
    """Seconds per entry, from built on ctl-0 to held by every agent of ctl-1."""
    from agents import attach
    from bench.overflow import _cluster, _models, _stop
    from bench.procs import BusObserver
    from controller.cluster import DELTA, topic
    from openexample import tables

    adv = _fgsm(model, n)
    broker, (a, b) = _cluster(root, 2, 4096, _models(artifacts))
    guards: list[Any] = []
    observer = BusObserver(broker, a.pki, topic("controller/ctl-0", DELTA))
    stop = threading.Event()
    made: dict[bytes, float] = {}
    try:
        observer.start()

        def agent(proc: Any, name: str) -> Any:
            g = attach(
                model,
                controller=proc.address,
                model_id=MODEL_ID,
                input_shape=(1, 28, 28),
                budget_us=2_000_000,
                connect_timeout_s=30,
                **proc.agent_tls(name),
            )
            guards.append(g)
            return g

        ga = agent(a, "spread-a")
        on_b = [agent(b, f"spread-b{k}") for k in range(agents)]
        seen: list[dict[bytes, float]] = [{} for _ in on_b]
        watcher = threading.Thread(target=_watch, args=(on_b, seen, stop), daemon=True)
        watcher.start()
        flagged: list[bytes] = []
        for x in adv:
            if len(flagged) >= n:
                break
            r = ga(x)
            if r.verdict == "adversarial" and r.decided_by == "controller":
                flagged.append(tables.fingerprint(x, ga.core.config.fingerprint_key))
                time.sleep(0.05)  # one entry at a time on the bus
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            fp in first and fp in made for fp in flagged for first in seen
        ):
            time.sleep(0.05)
            made = observer.times()
    finally:
        stop.set()
        observer.stop()
        for g in guards:
            g.close()
        _stop(broker, [a, b])
    return [
        max(first[fp] for first in seen) - made[fp]
        for fp in flagged
        if fp in made and all(fp in first for first in seen)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=50, help="RT entries to time")
    p.add_argument("--agents", type=int, default=2, help="agents on the other controller")
    p.add_argument("--out", default="var/bench/rt_spread")
    args = p.parse_args(argv)
    from bench.procs import exit_on_signals, mosquitto_path
    from controller.training.example_model import ensure_example_model
    from controller.training.train import ensure_artifacts

    if mosquitto_path() is None:
        print(
            "bench.rt_spread: mosquitto is not installed (scripts/system-deps.sh)", file=sys.stderr
        )
        return 2
    exit_on_signals()
    model = str(ensure_example_model(Path("var/cache")))
    artifacts = [p.resolve() for p in ensure_artifacts()]
    delays = spread(Path(args.out).resolve(), artifacts, model, args.n, args.agents)
    if not delays:
        print("bench.rt_spread: no entry was flagged and seen", file=sys.stderr)
        return 1
    ms = sorted(d * 1e3 for d in delays)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    print(
        f"RT entry built on ctl-0 -> held by all {args.agents} agents of ctl-1:"
        f" median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, max {ms[-1]:.1f} ms"
        f" over {len(ms)} entries"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
