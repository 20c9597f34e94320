"""Source tracing's decision rule on simulated sources (``python -m bench.tracing_sim``):
how an honest busy source and a diluted attacker fare under the default parameters.
The figures in controller/tracing.py's docstring come from this."""

from __future__ import annotations

import numpy as np

from controller.tracing import SourceTracer


def first_block(rate: float, per_s: float, n: int, seed: int, fpr: float = 0.01) -> int | None:
    """The verdict at which a source flagged with probability ``rate`` is blocked."""
    rng, tracer = np.random.default_rng(seed), SourceTracer()
    for i in range(n):
        if tracer.observe(("agent", "source"), bool(rng.random() < rate), fpr, i / per_s):
            return i + 1
    return None


def main() -> None:
    honest = [first_block(0.013, 1000, 10_000, s) for s in range(20)]
    blocked = sum(h is not None for h in honest)
    print(f"honest, 1.3% flagged, 1000/s, 10,000 verdicts: blocked in {blocked} of 20 runs")
    attacker = np.array([first_block(0.10, 100, 5_000, s) for s in range(200)], dtype=float)
    print(
        f"attacker, 10% adversarial, 100/s: blocked after median {np.median(attacker):.0f},"
        f" p90 {np.percentile(attacker, 90):.0f}, max {attacker.max():.0f} verdicts (200 runs)"
    )
    print(f"all adversarial: blocked at verdict {first_block(1.0, 100, 10, 0)}")


if __name__ == "__main__":
    main()
