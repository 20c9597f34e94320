"""What privacy noise costs detection: clean accuracy and TPR at 1% FPR against epsilon.

    python -m bench.privacy [--quick] [--n 1000] [--eps 1,4,...,inf] [--delta 1e-5]
        [--options clip=C,centre=V,logits=label] [--cache var/cache] [--out var/bench/privacy]
    openexample-bench privacy [the same flags]

Agents noise with ``gaussian:EPS:DELTA`` plus ``--options`` (openexample/privacy.py: the
whole input's L2 norm around the centre clipped, the analytic Gaussian mechanism; ``inf``:
no noise). For each epsilon the default detector set (DeSVig + margin, fitted once on the
clean training split, DeSVig's CGAN from the cache) is calibrated at a fused 1% FPR on the
calibration split as such agents send it (controller/training/privacy.py, what
``openexample-controller train --privacy`` does; nothing is retrained per epsilon), then
measured on ``--n`` test images (every k-th: the split is sorted by class), noised the
same way:

- sigma: the noise per pixel;
- noised acc: the example model's accuracy on the noised inputs (what is left of them);
- clean acc: the user's accuracy with the defence (the model answers the raw input; a
  clean input the detectors flag is withheld): right and not flagged;
- FPR: clean test inputs flagged (the calibration target is 1%);
- TPR: successful FGSM / PGD eps 0.3 adversarials (ART, cached) flagged once noised as
  an agent sends them (labels: the model's on the raw adversarial).

Writes privacy.json, privacy.md and privacy.png under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EPSILONS = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, math.inf)
QUICK_EPSILONS = (4.0, 1024.0, 16384.0, 65536.0, math.inf)
FPR = 0.01
ATTACKS = ("FGSM eps 0.3", "PGD eps 0.3")


def spec_for(epsilon: float, delta: float, options: str) -> str:
    """The agents' privacy spec at ``epsilon`` (inf: no noise, with the logits mode of
    the other rows where it exists without noise: label, the default with noise)."""
    opts = [o for o in options.split(",") if o.strip()]
    if math.isinf(epsilon):
        other = any(o.replace(" ", "").startswith(("logits=raw", "logits=noised")) for o in opts)
        return "none" if other else "none,logits=label"
    return ",".join([f"gaussian:{epsilon:g}:{delta:g}", *opts])


def evaluate(
    dets: list[Any],
    predict: Any,
    cal_x: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    advs: dict[str, np.ndarray],
    spec: str,
    seed: int = 0,
) -> dict[str, Any]:
    """One row: calibrate ``dets`` on what agents with ``spec`` send, then score."""
    from controller.detectors.fusion import Pipeline
    from controller.training.privacy import calibration_batch, noise_for, sent_batch

    x, y = test
    noise = noise_for(spec, x.shape[1:])
    pipe = Pipeline(dets, FPR)
    pipe.calibrate(calibration_batch(cal_x, predict, noise))
    rng = np.random.default_rng(seed)
    clean = sent_batch(x, predict, noise, rng)
    right = clean.labels == y
    flagged = pipe.evaluate(clean).flagged
    row: dict[str, Any] = {
        "spec": str(noise),
        "epsilon": noise.epsilon,
        "sigma": noise.scale,
        "noised_accuracy": float(np.mean(np.asarray(predict(clean.inputs)).argmax(1) == y)),
        "clean_accuracy": float(np.mean(right & ~flagged)),
        "fpr": float(flagged.mean()),
        "tpr": {},
        "n_adversarial": {},
    }
    for name, adv in advs.items():
        batch = sent_batch(adv, predict, noise, rng)
        ok = right & (batch.labels != y)  # successful: the clean one right, this one wrong
        hit = pipe.evaluate(batch).flagged[ok]
        row["tpr"][name] = float(hit.mean()) if hit.size else math.nan
        row["n_adversarial"][name] = int(ok.sum())
    return row


def markdown(report: dict[str, Any]) -> str:
    head = ["epsilon", "sigma / pixel", "noised acc", "clean acc", "FPR", *report["attacks"]]
    lines = [
        f"Privacy noise against detection ({report['date']}, n={report['n']} test images,"
        f" delta {report['delta']:g}, options {report['options'] or 'none'}; detectors"
        f" {'+'.join(report['detectors'])} calibrated at {FPR:.0%} fused FPR per epsilon)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report["rows"]:
        eps = f"{r['epsilon']:g}" if math.isfinite(r["epsilon"]) else "inf (off)"
        cells = [eps, f"{r['sigma']:.3g}", f"{r['noised_accuracy']:.3f}"]
        cells += [f"{r['clean_accuracy']:.3f}", f"{r['fpr']:.3f}"]
        cells += [f"{r['tpr'][a]:.3f}" for a in report["attacks"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    finite = [math.log2(r["epsilon"]) for r in rows if math.isfinite(r["epsilon"])]
    top = max(finite, default=0.0) + 2.0
    xs = [math.log2(r["epsilon"]) if math.isfinite(r["epsilon"]) else top for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["clean_accuracy"] for r in rows], "o-", color="k", label="clean accuracy")
    ax.plot(xs, [r["noised_accuracy"] for r in rows], ".:", color="grey",
            label="model accuracy on the noised input")  # fmt: skip
    for a in report["attacks"]:
        ax.plot(xs, [r["tpr"][a] for r in rows], "s-", label=f"TPR {a} at 1% FPR")
    ax.plot(xs, [r["fpr"] for r in rows], "x--", color="red", label="clean FPR (target 0.01)")
    ax.set_xticks(xs, [f"{r['epsilon']:g}" if math.isfinite(r["epsilon"]) else "off" for r in rows])
    ax.set_xlabel("epsilon per input (Gaussian, L2 over the whole image)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Privacy noise vs detection (n={report['n']}, delta {report['delta']:g})")
    ax.legend(fontsize=8, loc="center left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench import attacks
    from controller import detectors
    from controller.reference_model import model_fn
    from controller.training import datasets
    from controller.training.example_model import ensure_example_model
    from controller.training.train import DEFAULT_DETECTORS

    torch.set_num_threads(2)
    cache = Path(args.cache)
    ds = datasets.load("mnist5k")
    sp = ds.split()
    model_path = ensure_example_model(cache, "mnist5k")
    predict = model_fn(model_path)
    every = max(1, len(sp.test.x) // args.n)  # the split is sorted by class: spread out
    x, y = sp.test.x[::every][: args.n], sp.test.y[::every][: args.n]
    clf = None
    advs = {}
    for name, spec in zip(ATTACKS, (attacks.FGSM, attacks.PGD), strict=True):
        if clf is None and not attacks.cache_path(spec, model_path, x, cache, 0).is_file():
            clf = attacks.classifier(model_path, tuple(x.shape[1:]), len(ds.class_names))
        advs[name] = attacks.generate(spec, clf, model_path, x, cache)
    dets = []
    for name in DEFAULT_DETECTORS:
        t0 = time.perf_counter()
        cls = detectors.get(name)
        det = cls(cache=str(cache)) if name == "desvig" else cls()
        det.fit(sp.train.x, sp.train.y, model=predict, dataset="mnist5k",
                class_names=ds.class_names)  # fmt: skip
        print(f"  fit {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        dets.append(det)
    rows = []
    for eps in args.eps:
        t0 = time.perf_counter()
        row = evaluate(dets, predict, sp.calibration.x, (x, y), advs,
                       spec_for(eps, args.delta, args.options), seed=args.seed)  # fmt: skip
        rows.append(row)
        tprs = ", ".join(f"{a} {v:.3f}" for a, v in row["tpr"].items())
        print(f"  eps {eps:g}: sigma {row['sigma']:.3g}, clean acc {row['clean_accuracy']:.3f},"
              f" FPR {row['fpr']:.3f}, TPR {tprs} ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    return {
        "date": datetime.date.today().isoformat(),
        "n": len(x),
        "delta": args.delta,
        "options": args.options,
        "detectors": list(DEFAULT_DETECTORS),
        "attacks": list(ATTACKS),
        "rows": rows,
    }


def _epsilons(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"epsilons: numbers or inf, got {text!r}") from None
    if not out or any(not e > 0 for e in out):
        raise argparse.ArgumentTypeError(f"epsilons: > 0, got {text!r}")
    return out


def main(argv: list[str] | None = None, prog: str = "python -m bench.privacy") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 images, 5 epsilons (< 2 min)")
    p.add_argument("--n", type=int, help="test images (default 1000, --quick 200)")
    p.add_argument("--eps", type=_epsilons, help="epsilons, comma-separated; inf = no noise")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--options", default="", help="more of the spec: clip=C,centre=V,logits=...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="var/cache")
    p.add_argument("--out", default="var/bench/privacy")
    args = p.parse_args(argv)
    args.n = min(args.n or (200 if args.quick else 1000), 1000)
    args.eps = args.eps or (QUICK_EPSILONS if args.quick else EPSILONS)
    from openexample.privacy import PrivacyNoise

    try:  # a bad spec is one line before anything is loaded
        for eps in args.eps:
            PrivacyNoise.parse(spec_for(eps, args.delta, args.options))
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in report["rows"]:
        r["epsilon"] = r["epsilon"] if math.isfinite(r["epsilon"]) else None  # JSON
    (out / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    for r in report["rows"]:
        r["epsilon"] = math.inf if r["epsilon"] is None else r["epsilon"]
    table = markdown(report)
    (out / "privacy.md").write_text(table)
    plot(report, out / "privacy.png")
    print(table)
    print(f"wrote {out / 'privacy.md'}, {out / 'privacy.json'}, {out / 'privacy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
