"""The robust reference model of ``controller/detectors/robust.py`` on its own
(``python -m bench.robust_model``): its training time, its accuracy on the clean test
split, its agreement there with the protected model, and its robust accuracy under
ART's PGD (L-inf, ``--eps``; ``--pgd-steps`` steps of eps / 10 from a random start, the
untargeted attack on the robust model itself, white-box).

``--options '{"epochs": 30}'``: other training settings (``RobustConfig``); the network
is trained on the training split once per settings and cached in var/cache/robust.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.attacks import art_classifier
from controller.detectors.base import Batch
from controller.detectors.robust import RobustDetector
from controller.reference_model import model_fn
from controller.training import datasets
from controller.training.example_model import ensure_example_model


def evaluate(args: argparse.Namespace) -> dict:
    cache = Path("var/cache")
    ds = datasets.load(args.dataset)
    sp = ds.split(seed=0)
    det = RobustDetector(**json.loads(args.options), cache=str(cache))
    t0 = time.perf_counter()
    det.fit(sp.train.x, sp.train.y, dataset=args.dataset, class_names=ds.class_names)
    fit_s = time.perf_counter() - t0
    assert det.net is not None
    x, y = sp.test.x[: args.n], sp.test.y[: args.n]
    predict = model_fn(ensure_example_model(cache, args.dataset))
    protected = predict(x).argmax(1)
    robust = det.score(Batch(x, None, protected)).corrected
    assert robust is not None
    torch.set_num_threads(2)
    clf = art_classifier(det.net, ds.input_shape, ds.num_classes)
    from art.attacks.evasion import ProjectedGradientDescent

    rows = {}
    for eps in args.eps:
        attack = ProjectedGradientDescent(
            clf,
            norm=np.inf,
            eps=eps,
            eps_step=eps / 10,
            max_iter=args.pgd_steps,
            num_random_init=1,
            batch_size=128,
            verbose=False,
        )
        t1 = time.perf_counter()
        adv = attack.generate(x=x)
        pred = clf.predict(adv).argmax(1)
        rows[str(eps)] = {
            "robust_accuracy": round(float(np.mean(pred == y)), 4),
            "seconds": round(time.perf_counter() - t1, 1),
        }
    return {
        "settings": det.config(),
        "fit_seconds_here": round(fit_s, 1),
        "trained": det.meta["robust"],
        "n_test": len(x),
        "clean_accuracy": round(float(np.mean(robust == y)), 4),
        "protected_clean_accuracy": round(float(np.mean(protected == y)), 4),
        "agreement_with_protected": round(float(np.mean(robust == protected)), 4),
        "pgd": {"steps": args.pgd_steps, "step": "eps / 10", "random_start": 1, "by_eps": rows},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--options", default="{}", help="RobustDetector settings, JSON")
    p.add_argument("--n", type=int, default=500, help="test images")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--pgd-steps", type=int, default=40)
    report = evaluate(p.parse_args(argv))
    report["trained"].pop("epochs", None)  # the per-epoch log: in the artifact's manifest
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
