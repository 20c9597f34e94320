"""How long the controller takes to score a batch (``python -m bench.score_speed``).

Times ``FusedScorer.score`` (controller/pipeline.py) for the default detector set (or
``--detectors a,b``, trained and cached as the detection bench does) on
MNIST test inputs, single-threaded as the controller runs it (``torch.set_num_threads(1)``,
BLAS limited by the detectors), and prints the median microseconds per call and per item
at each batch size. ``--profile N`` runs cProfile on batches of N instead; ``--parts``
times batch 1 part by part (each detector, fusion, PKG_OUT items, metrics).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from controller import config
from controller.pipeline import Scorer, load_scorers
from controller.reference_model import model_fn
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from controller.training.train import DEFAULT_DETECTORS, detector_set, ensure_artifacts

BATCHES = (1, 8, 32, 128, 256)


def setup(
    cache: Path, dataset: str = "mnist5k", names: Sequence[str] = DEFAULT_DETECTORS
) -> tuple[Scorer, np.ndarray, np.ndarray, np.ndarray]:
    """(scorer, test inputs, their logits, the labels the model gave)."""
    paths = ensure_artifacts(tuple(names), dataset=dataset, cache=cache)
    cfg = config.from_mapping({"models": {"m": {"detectors": [str(p) for p in paths]}}})
    scorer = load_scorers(cfg)["m"]
    x = datasets.load(dataset).split().test.x
    logits = np.asarray(model_fn(ensure_example_model(cache, dataset))(x), np.float32)
    return scorer, x, logits, logits.argmax(1).astype(np.int64)


def time_batches(
    scorer: Scorer,
    x: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    batches: Sequence[int] = BATCHES,
    budget_s: float = 1.0,
) -> dict[int, float]:
    """{batch size: median seconds per call}, over windows spread through the test set."""
    out: dict[int, float] = {}
    for n in batches:
        starts = np.arange(0, len(x) - n + 1, max(n, 1))[:64]
        for s in starts[:3]:  # warm up
            scorer.score(x[s : s + n], logits[s : s + n], labels[s : s + n])
        times: list[float] = []
        t_end = time.perf_counter() + budget_s
        i = 0
        while time.perf_counter() < t_end or len(times) < 20:
            s = starts[i % len(starts)]
            i += 1
            t0 = time.perf_counter()
            scorer.score(x[s : s + n], logits[s : s + n], labels[s : s + n])
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times)
    return out


def time_parts(scorer: Scorer, x: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Median microseconds of each part of one batch-1 scoring call, warm (back to back,
    cycling through 1,000 test inputs): each detector's ``score``, the fusion around them
    (``Pipeline.evaluate`` with the detectors' answers replayed), and the PKG_OUT items
    without and with the metrics (``FusedScorer.score``, answers replayed)."""
    import prometheus_client

    from controller.detectors.base import Batch
    from controller.metrics import ControllerMetrics

    pipeline = scorer.pipeline  # type: ignore[attr-defined]
    batches = [Batch(x[i : i + 1], logits[i : i + 1], labels[i : i + 1]) for i in range(1000)]

    def median_us(fn: Callable[[Batch], object], n: int = 3000) -> float:
        times = []
        for k in range(n):
            b = batches[k % len(batches)]
            t0 = time.perf_counter()
            fn(b)
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e6, 1)

    out = {f"detector {d.name}": median_us(d.score) for d in pipeline.detectors}
    replay = [d.score(batches[0]) for d in pipeline.detectors]
    saved = [d.__dict__.get("score") for d in pipeline.detectors]
    for d, answer in zip(pipeline.detectors, replay, strict=True):
        d.score = lambda _b, answer=answer: answer  # the detectors' cost taken out
    try:
        metrics = ControllerMetrics(prometheus_client.CollectorRegistry(), 1.0, 1000)
        out["fusion (evaluate)"] = median_us(pipeline.evaluate)
        out["fusion + PKG_OUT items"] = median_us(
            lambda b: scorer.score(b.inputs, b.logits, b.labels)
        )
        out["fusion + items + metrics"] = median_us(
            lambda b: scorer.score(b.inputs, b.logits, b.labels, metrics, [])
        )
    finally:
        for d, own in zip(pipeline.detectors, saved, strict=True):
            if own is None:
                del d.score
            else:
                d.score = own
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="var/cache")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--seconds", type=float, default=1.0, help="timing budget per batch size")
    ap.add_argument("--profile", type=int, default=0, help="cProfile batches of this size")
    ap.add_argument("--parts", action="store_true", help="batch 1, part by part (warm)")
    ap.add_argument("--detectors", help="comma-separated set (default: the default set)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = detector_set(args.detectors)[0]
    scorer, x, logits, labels = setup(Path(args.cache), names=names)
    if args.parts:
        for part, us in time_parts(scorer, x, logits, labels).items():
            print(f"{part:<28} {us:>8.1f} us")
        return 0
    if args.profile:
        n = args.profile
        prof = cProfile.Profile()
        prof.enable()
        for k in range(max(2000 // n, 20)):
            s = (k * n) % (len(x) - n + 1)
            scorer.score(x[s : s + n], logits[s : s + n], labels[s : s + n])
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    batches = [int(b) for b in args.batches.split(",") if b]
    print(f"{'batch':>6} {'us/call':>10} {'us/item':>9} {'items/s':>9}")
    for n, t in time_batches(scorer, x, logits, labels, batches, args.seconds).items():
        print(f"{n:>6} {t * 1e6:>10.1f} {t * 1e6 / n:>9.1f} {n / t:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
