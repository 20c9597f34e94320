"""The feature-map detector's adversarial share and mixture (``python -m bench.featuremap_ratio``).

Fits ``featuremap`` once per ``--ratios`` value (``adv_ratio``: the adversarial share of
its training set) on the mnist5k training split, calibrates it alone at 1% FPR on the
calibration split, and reports, on the detection bench's attacks of the first 1,000
test images (cached under ``var/cache/attacks``: FGSM 0.1 and 0.3, PGD 0.3, DeepFool,
C&W L2), the TPR over successful adversarials, the ROC-AUC against the clean test
images the model gets right, and the clean FPR. ``--deepfool W`` adds DeepFool to the
default FGSM + PGD training mixture with weight W (the six others weigh 1 each), so it
is no longer an unseen attack. One JSON line per fit, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from bench.attacks import classifier, generate, standard_attacks
from controller.detectors.base import make_batch
from controller.detectors.featuremap import FeatureMapDetector
from controller.reference_model import model_fn
from controller.training import datasets
from controller.training.example_model import ensure_example_model

ATTACKS = (("FGSM", 0.1), ("FGSM", 0.3), ("PGD", 0.3), ("DeepFool", None), ("CW-L2", None))
DEEPFOOL = {"max_iter": 50, "nb_grads": 3, "batch_size": 128}  # as the bench's


def fit_and_measure(ratio: float, deepfool: float, cache: Path, n: int) -> dict[str, Any]:
    ds = datasets.load("mnist5k")
    sp = ds.split()
    model = ensure_example_model(cache, "mnist5k")
    predict = model_fn(model)
    x, y = sp.test.x[:n], sp.test.y[:n]
    clf = classifier(model, x.shape[1:], len(ds.class_names))
    specs = [s for s in standard_attacks() if (s.name, s.eps) in ATTACKS]
    attacks = None
    if deepfool > 0:
        from controller.training.adversarial import DEFAULT_ATTACKS

        attacks = [{"art_class": a.art_class, "params": a.params} for a in DEFAULT_ATTACKS]
        attacks.append({"art_class": "DeepFool", "params": DEEPFOOL, "weight": deepfool})
    t0 = time.perf_counter()
    det = FeatureMapDetector(adv_ratio=ratio, attacks=attacks, cache=str(cache), progress=False)
    det.fit(sp.train.x, sp.train.y, model=predict, dataset="mnist5k", class_names=ds.class_names)
    out: dict[str, Any] = {"adv_ratio": ratio, "deepfool_weight": deepfool}
    out["fit_s"] = round(time.perf_counter() - t0, 1)
    det.calibrate(make_batch(sp.calibration.x, predict), 0.01)
    test = make_batch(x, predict)
    right = test.labels == y
    clean = det.score(test).scores
    out["clean_fpr"] = round(float(det.flag(clean).mean()), 3)
    for spec in specs:
        adv = generate(spec, clf, model, x, cache)
        fooled = right & (make_batch(adv, predict).labels != y)
        s = det.score(make_batch(adv[fooled], predict)).scores
        truth = np.r_[np.zeros(int(right.sum())), np.ones(len(s))]
        auc = roc_auc_score(truth, np.r_[clean[right], s])
        label = spec.name if spec.eps is None else f"{spec.name} {spec.eps:g}"
        out[label] = {"n": int(fooled.sum()), "tpr": round(float(det.flag(s).mean()), 3)}
        out[label]["auc"] = round(float(auc), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--deepfool", type=float, default=0.0, help="DeepFool's mixture weight")
    ap.add_argument("--cache", default="var/cache")
    ap.add_argument("-n", type=int, default=1000, help="test images (the bench's: 1000)")
    args = ap.parse_args(argv)
    rows = []
    for r in (float(v) for v in args.ratios.split(",") if v):
        rows.append(fit_and_measure(r, args.deepfool, Path(args.cache), args.n))
        print(json.dumps(rows[-1]), flush=True)
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    print("\n| adv_ratio | " + " | ".join(names) + " | clean FPR |")
    print("|---" * (len(names) + 2) + "|")
    for row in rows:
        cells = [f"{row[k]['tpr']:.3f} ({row[k]['auc']:.3f})" for k in names]
        print(f"| {row['adv_ratio']:g} | " + " | ".join(cells) + f" | {row['clean_fpr']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
