"""How long the controller takes to score a batch (``python -m bench.score_speed``).

Times ``FusedScorer.score`` (controller/pipeline.py) for the default detector set on
MNIST test inputs, single-threaded as the controller runs it (``torch.set_num_threads(1)``,
BLAS limited by the detectors), and prints the median microseconds per call and per item
at each batch size. ``--profile N`` runs cProfile on batches of N instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from controller import config
from controller.pipeline import Scorer, load_scorers
from controller.reference_model import model_fn
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from controller.training.train import DEFAULT_DETECTORS, ensure_artifacts

BATCHES = (1, 8, 32, 128, 256)


def setup(
    cache: Path, dataset: str = "mnist5k"
) -> tuple[Scorer, np.ndarray, np.ndarray, np.ndarray]:
    """(scorer, test inputs, their logits, the labels the model gave)."""
    paths = ensure_artifacts(DEFAULT_DETECTORS, dataset=dataset, cache=cache)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="var/cache")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--seconds", type=float, default=1.0, help="timing budget per batch size")
    ap.add_argument("--profile", type=int, default=0, help="cProfile batches of this size")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    scorer, x, logits, labels = setup(Path(args.cache))
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
