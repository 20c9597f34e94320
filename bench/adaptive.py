"""Adaptive (detector-aware) white-box attacks on the fused pipeline
(``openexample-bench detection --adaptive``, ``python -m bench.adaptive``).

The attacker knows everything: the model, every detector's weights and threshold. It
runs PGD toward a wrong target label, minimising a logit hinge with a confidence margin
(Carlini & Wagner's f6, kappa in logits) plus, weighted, a hinge on each detector's
score under its threshold; the scores come from differentiable surrogates
(``bench/surrogates.py``: exact where the detector is differentiable, BPDA for the
hash's rounding, a temperature for its bits). Several targets and penalty weights per
image, a random start each. Following Tramer et al. 2020 and Carlini & Wagner 2017,
success is judged by the real pipeline, never by the surrogate: the deployed detectors
with their deployed thresholds, on the candidate adversarial, every ``CHECK_EVERY``
steps and at the end; an image counts once it is misclassified and not flagged.

The same run also gives two references: the attack without the detector terms
(weight 0: what a detector-unaware, high-confidence PGD achieves) and the success
against the model alone (any wrong label).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.surrogates import Surrogate, surrogate
from controller.detectors.base import Batch, Detector
from controller.detectors.fusion import Pipeline
from controller.reference_model import load_model, model_fn
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from controller.training.train import calibrate_on_for, detector_set, ensure_artifacts

CHECK_EVERY = 25  # steps between judgements by the real pipeline


@dataclass(frozen=True)
class Budget:
    """One attack budget: the norm ball, and how the attack spends it."""

    norm: str  # "linf" or "l2"
    eps: float
    steps: int = 200
    targets: int = 3  # wrong labels tried per image
    # detector-hinge weights tried per target, after the detector-unaware run (weight 0)
    weights: tuple[float, ...] = (0.1, 1.0, 10.0)
    kappa: float = 6.0  # logit margin of the target over every other class
    slack: float = 0.05  # aim this far under each threshold (in threshold-scale units)

    @property
    def label(self) -> str:
        return f"{'L-inf' if self.norm == 'linf' else 'L2'} {self.eps:g}"

    @property
    def step_size(self) -> float:
        return 2.5 * self.eps / self.steps  # Madry et al.'s rule


def budgets(quick: bool) -> list[Budget]:
    if quick:
        return [Budget("linf", 0.3, steps=40, targets=1, weights=(10.0,))]
    return [
        Budget("linf", 0.1),
        Budget("linf", 0.2),
        Budget("linf", 0.3),
        Budget("l2", 2.0),
        Budget("l2", 3.0),
    ]


def attack_budgets(args: argparse.Namespace) -> list[Budget]:
    """The run's budgets: ``budgets(quick)``, or the ``--adaptive-*`` flags where given;
    ValueError naming the flag for a bad value."""
    if getattr(args, "quick", False):
        return budgets(True)
    balls: list[tuple[str, float]] = []
    spec = getattr(args, "adaptive_budgets", None)
    for part in (spec or "linf:0.1,linf:0.2,linf:0.3,l2:2,l2:3").split(","):
        norm, _, eps = part.strip().partition(":")
        try:
            value = float(eps)
        except ValueError:
            value = float("nan")
        if norm not in ("linf", "l2") or not (value > 0 and math.isfinite(value)):
            raise ValueError(
                f"--adaptive-budgets: {part.strip()!r} is not NORM:EPS (linf or l2, eps > 0)"
            )
        balls.append((norm, value))
    steps, targets = getattr(args, "adaptive_steps", 200), getattr(args, "adaptive_targets", 3)
    kappa = getattr(args, "adaptive_kappa", 6.0)
    if steps < 1:
        raise ValueError(f"--adaptive-steps must be at least 1, got {steps}")
    if targets < 1:
        raise ValueError(f"--adaptive-targets must be at least 1, got {targets}")
    if not (kappa >= 0 and math.isfinite(kappa)):
        raise ValueError(f"--adaptive-kappa must be a number >= 0, got {kappa}")
    try:
        weights = tuple(float(w) for w in getattr(args, "adaptive_weights", "0.1,1,10").split(","))
    except ValueError:
        weights = ()
    if not weights or not all(w > 0 and math.isfinite(w) for w in weights):
        raise ValueError(
            f"--adaptive-weights: {args.adaptive_weights!r} is not positive numbers, e.g. 0.1,1,10"
        )
    return [Budget(n, e, steps, targets, weights, kappa) for n, e in balls]


class Judge:
    """The deployed pipeline on candidate adversarials: the model's label, and whether
    the fused detectors flag it."""

    def __init__(self, dets: list[Detector], fpr: float, predict: Any) -> None:
        self.pipeline = Pipeline(dets, fpr)
        self.predict = predict

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = self.predict(x)
        labels = logits.argmax(1)
        fused = self.pipeline.evaluate(Batch(x, logits, labels))
        return labels, np.asarray(fused.flagged, bool)


def _project(adv: torch.Tensor, x: torch.Tensor, b: Budget) -> torch.Tensor:
    d = adv - x
    if b.norm == "linf":
        d = d.clamp(-b.eps, b.eps)
    else:
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        d = d * (b.eps / n).clamp(max=1.0).view(-1, *([1] * (d.dim() - 1)))
    return (x + d).clamp(0.0, 1.0)


def _step(grad: torch.Tensor, b: Budget) -> torch.Tensor:
    if b.norm == "linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / n.view(-1, *([1] * (grad.dim() - 1)))


def _start(x: torch.Tensor, b: Budget, gen: torch.Generator) -> torch.Tensor:
    """A random point of the ball (L-inf: uniform; L2: a random direction at eps / 2)."""
    if b.norm == "linf":
        d = (torch.rand(x.shape, generator=gen) * 2 - 1) * b.eps
    else:
        d = torch.randn(x.shape, generator=gen)
        d = d * (0.5 * b.eps / d.flatten(1).norm(dim=1)).view(-1, *([1] * (x.dim() - 1)))
    return _project(x + d, x, b)


def pgd(
    model: torch.nn.Module,
    surrogates: list[Surrogate],
    judge: Judge,
    x: np.ndarray,
    y: np.ndarray,
    target: np.ndarray,
    weight: float,
    b: Budget,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One PGD run toward ``target`` with detector-hinge ``weight``: (adversarials, the
    mask of those the real pipeline let through misclassified)."""
    gen = torch.Generator().manual_seed(seed)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target).long()
    adv = _start(xt, b, gen)
    found = np.zeros(len(x), bool)
    best = x.copy()
    for step in range(1, b.steps + 1):
        adv.requires_grad_(True)
        logits = model(adv)
        other = logits.clone()
        other[torch.arange(len(x)), tt] = -torch.inf
        z_t = logits.gather(1, tt[:, None])[:, 0]
        loss = torch.relu(other.max(1).values - z_t + b.kappa)
        if weight:
            for s in surrogates:
                loss = loss + weight * s.hinge(adv, logits, tt, b.slack)
        (grad,) = torch.autograd.grad(loss.sum(), adv)
        with torch.no_grad():
            adv = _project(adv - b.step_size * _step(grad, b), xt, b)
        if step % CHECK_EVERY == 0 or step == b.steps:
            todo = ~found
            if not todo.any():
                break  # every image is broken: nothing left to judge
            cand = adv.detach().numpy().astype(np.float32)
            labels, flagged = judge(cand[todo])
            ok = (labels != y[todo]) & ~flagged
            idx = np.flatnonzero(todo)[ok]
            best[idx], found[idx] = cand[idx], True
    return best, found


def attack(
    model: torch.nn.Module,
    surrogates: list[Surrogate],
    judge: Judge,
    x: np.ndarray,
    y: np.ndarray,
    b: Budget,
    *,
    weights: tuple[float, ...] | None = None,
    seed: int = 0,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Every target and weight of ``b`` on every image not broken yet (``start``: the
    (broken mask, adversarials) of an earlier attack, which this one extends); an image is
    broken when one run broke it. Returns the success rate and the distortion of the
    successes, the adversarials and the broken mask."""
    rng = np.random.default_rng(seed)
    classes = int(judge.predict(x[:1]).shape[1])
    # distinct wrong labels per image
    wrong = np.stack([rng.permutation(np.setdiff1d(np.arange(classes), [c])) for c in y])
    targets = min(b.targets, classes - 1)
    found = np.zeros(len(x), bool) if start is None else start[0].copy()
    best = x.copy() if start is None else start[1].copy()
    runs = 0
    for t in range(targets):
        for w in b.weights if weights is None else weights:
            todo = ~found
            if not todo.any():
                break
            adv, ok = pgd(
                model, surrogates, judge, x[todo], y[todo], wrong[todo, t], w, b, seed + runs
            )
            runs += 1
            idx = np.flatnonzero(todo)[ok]
            best[idx], found[idx] = adv[ok], True
    d = (best[found] - x[found]).reshape(int(found.sum()), int(np.prod(x.shape[1:])))
    summary = {
        "success": round(float(found.mean()), 4),
        "n": len(x),
        "broken": int(found.sum()),
        "runs": runs,
        "median_linf": round(float(np.median(np.abs(d).max(1))), 4) if len(d) else None,
        "median_l2": round(float(np.median(np.linalg.norm(d, axis=1))), 4) if len(d) else None,
    }
    return summary, best, found


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    cache = Path("var/cache")
    dataset = getattr(args, "dataset", None) or "mnist5k"
    # the images first: a range out of the split is refused before anything is trained
    test = datasets.load(dataset).split(seed=0).test
    n = 40 if args.quick else args.adaptive_n
    start = getattr(args, "adaptive_from", 0)
    if start >= len(test.x):
        print(
            f"openexample-bench detection: --adaptive-from {start}: the test split has"
            f" {len(test.x)} images",
            file=sys.stderr,
        )
        return 2
    own = Path(args.model).resolve() if getattr(args, "model", None) else None
    model_path = own or ensure_example_model(cache, dataset)
    # a named set (``hardened``) brings its own shares (by calibration); None: even
    on = calibrate_on_for(args.detectors, getattr(args, "calibrate_on", None))
    names, shares = detector_set(args.detectors, getattr(args, "fpr_shares", None), on)
    paths = ensure_artifacts(
        names, dataset=dataset, cache=cache, model=own, shares=shares, calibrate_on=on
    )
    predict = model_fn(model_path)
    dets = [Detector.load(p) for p in paths]
    for d in dets:
        d.model = predict
    fpr = float(sum(d.fpr or 0.0 for d in dets))  # each was calibrated at its share
    judge = Judge(dets, fpr, predict)
    surrogates, skipped = [], {}
    for d in dets:
        s = surrogate(d)
        if s is None:
            skipped[d.name] = "no differentiable surrogate: the attack ignores it"
        else:
            surrogates.append(s)
    module = load_model(model_path)
    for p in module.parameters():
        p.requires_grad_(False)
    x, y = test.x[start : start + n], test.y[start : start + n]
    clean_labels, clean_flagged = judge(x)
    keep = (clean_labels == y) & ~clean_flagged  # inputs the system gets right when clean
    x, y = x[keep], y[keep]
    report: dict[str, Any] = {
        "schema": "openexample.bench.adaptive/1",
        "dataset": dataset,
        "model": str(model_path),
        "detectors": [d.name for d in dets],
        "thresholds": {d.name: d.threshold for d in dets},
        "fused_fpr": fpr,
        "calibrated_on": dets[0].meta.get("calibrated_on", {"inputs": "all"}),
        # each detector's part of the budget, as its artifact records it (even: 1 / n)
        "fpr_shares": {d.name: d.meta.get("fpr_share", 1 / len(dets)) for d in dets},
        "skipped": skipped,
        "test_images": [start, start + n],  # [first, end) of the test split tried
        "n_attacked": len(x),
        "attack": (
            "PGD toward each of `targets` wrong labels (random, distinct), logit hinge with"
            " margin kappa + weight x sum of detector-score hinges under threshold -"
            " slack x |threshold|, weight 0 first (the detector-unaware column), then each"
            " of `weights` on the images still unbroken; random start; step 2.5 eps /"
            f" steps; success judged by the deployed pipeline every {CHECK_EVERY} steps and"
            " at the end"
        ),
        "rows": [],
    }
    t0 = time.perf_counter()
    found: dict[str, np.ndarray] = {}  # the successful adversarials, for anyone to re-check
    for b in attack_budgets(args):
        row = {"budget": b.label, **asdict(b)}
        # the detector-unaware attack first; the adaptive one goes on from what it broke,
        # so it is never weaker than its own weight-0 runs
        row["unaware"], adv, ok = attack(
            module, surrogates, judge, x, y, b, weights=(0.0,), seed=args.seed
        )
        row["adaptive"], adv, ok = attack(
            module, surrogates, judge, x, y, b, seed=args.seed, start=(ok, adv)
        )
        found[f"{b.norm}-{b.eps:g}-x"], found[f"{b.norm}-{b.eps:g}-y"] = adv[ok], y[ok]
        print(
            f"  {b.label}: adaptive {row['adaptive']['success']:.3f},"
            f" detector-unaware {row['unaware']['success']:.3f}",
            file=sys.stderr,
            flush=True,
        )
        report["rows"].append(row)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive.json").write_text(json.dumps(report, indent=2) + "\n")
    np.savez_compressed(out / "adaptive_successes.npz", **found)
    md = markdown(report)
    (out / "adaptive.md").write_text(md)
    plot(report, out)
    print(md)
    print(
        f"wrote {out / 'adaptive.json'}, {out / 'adaptive.md'}, adaptive.png and"
        " adaptive_successes.npz (the successful adversarials and their true labels)"
    )
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"Adaptive white-box attacks on {'+'.join(report['detectors'])}"
        f" (fused FPR {report['fused_fpr']:g}, calibrated on"
        f" {report.get('calibrated_on', {}).get('inputs', 'all')} clean inputs),"
        f" {report['n_attacked']} test images the"
        " system gets right when clean.",
        "",
        f"Attack: {report['attack']}.",
        "",
        "| budget | steps | targets x (1 + weights) | kappa | adaptive success | detector-unaware"
        " success | median L-inf / L2 of successes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        a, u = r["adaptive"], r["unaware"]
        dist = "-" if a["median_l2"] is None else f"{a['median_linf']:.2f} / {a['median_l2']:.2f}"
        lines.append(
            f"| {r['budget']} | {r['steps']} | {r['targets']} x {1 + len(r['weights'])} |"
            f" {r['kappa']:g} | **{a['success']:.3f}** ({a['broken']}) |"
            f" {u['success']:.3f} ({u['broken']}) | {dist} |"
        )
    for name, why in report["skipped"].items():
        lines += ["", f"{name}: {why}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, norm in zip(axes, ("linf", "l2"), strict=True):
        rows = [r for r in report["rows"] if r["norm"] == norm]
        if not rows:
            ax.set_visible(False)
            continue
        eps = [r["eps"] for r in rows]
        ax.plot(eps, [r["adaptive"]["success"] for r in rows], "o-", label="adaptive")
        ax.plot(eps, [r["unaware"]["success"] for r in rows], "s--", label="detector-unaware")
        ax.set_xlabel(f"eps ({'L-inf' if norm == 'linf' else 'L2'})")
        ax.set_ylabel("misclassified and not flagged")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.suptitle("Adaptive attack success against the fused pipeline")
    fig.tight_layout()
    fig.savefig(out / "adaptive.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model")
    p.add_argument("--dataset")
    p.add_argument("--detectors")
    p.add_argument("--adaptive-n", type=int, default=200)
    p.add_argument("--out", default="var/bench/adaptive")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
