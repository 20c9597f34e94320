"""``openexample-bench detection``: what the detectors catch, beside baselines.

Offline part (per attack, per detector and for the fused pipeline): attack success
rate, mean L2 / L-inf distortion, ROC-AUC, TPR at 1% and 5% FPR (successful
adversarials only; thresholds from the clean calibration split, FPR measured on clean
test inputs) and the corrected-label accuracy on flagged inputs. Baselines in the same
run: feature squeezing (a detector of the pipeline) and ART's BinaryInputDetector
trained on FGSM. Online part: the paper's Table IV through a real controller process
and a real agent (accuracy without and with OpenExample, and the added delay).

The model under test is the example model (``--dataset``: of that data set, mnist5k by
default), or with ``--model`` the user's own TorchScript or ONNX file: the default detector
set is trained for it (once, cached by the file's digest: train.ensure_artifacts), the
attacks are made against it, and input shape and classes come from the data set. ART
cannot differentiate an ONNX model (onnxruntime runs it): it gets the black-box attacks
(bench.attacks.black_box_attacks), and what needs gradients is skipped, said so in the
report (the FGSM-trained BinaryInputDetector, Table IV's attack sets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neighbors import KNeighborsClassifier
from tqdm import tqdm

from bench import table_iv
from bench.attacks import (
    AttackSpec,
    adversarials,
    art_classifier,
    black_box_attacks,
    cache_path,
    classifier,
    generate,
    standard_attacks,
)
from controller.correction import CorrectionPolicy
from controller.detectors.base import Batch, Detector, conformal_threshold
from controller.detectors.fusion import Fused, Pipeline
from controller.reference_model import is_onnx, model_fn
from controller.training import datasets
from controller.training.example_model import _slug, ensure_example_model
from controller.training.train import (
    calibrate_on_for,
    calibration_inputs,
    detector_set,
    ensure_artifacts,
)
from openexample.digests import file_digest
from openexample.v1 import openexample_pb2 as pb

FPRS = (0.01, 0.05)
BID_TRAINING_ATTACK = AttackSpec("FGSM", "FastGradientMethod", {"eps": 0.3}, eps=0.3)


@dataclass(frozen=True)
class Subject:
    """The model under test and its data set: the example model of the data set, or
    (``own``) a user's TorchScript file."""

    model: Path
    dataset: str
    own: bool = False

    calibrate_on: str = "all"  # train.CALIBRATE_ON

    def artifacts(
        self, names: tuple[str, ...], cache: Path, shares: tuple[float, ...] | None = None
    ) -> list[Path]:
        """The detector set ``names`` trained for this model (cached), its FPR budget
        split by ``shares`` (None: evenly), calibrated on ``calibrate_on``."""
        own = self.model if self.own else None
        return ensure_artifacts(
            names,
            dataset=self.dataset,
            cache=cache,
            model=own,
            shares=shares,
            calibrate_on=self.calibrate_on,
        )


def _calibrate_on(args: argparse.Namespace) -> str:
    """``--calibrate-on`` (train.CALIBRATE_ON), else the ``--detectors`` set's own basis
    (``hardened``: right), else "all"."""
    return calibrate_on_for(getattr(args, "detectors", None), getattr(args, "calibrate_on", None))


def subject(args: argparse.Namespace, cache: Path, *, train: bool = True) -> Subject:
    """The run's model: ``--model``, else the example model of ``--dataset`` (trained
    now, unless ``train`` is false: then only where it would be)."""
    dataset = getattr(args, "dataset", None) or "mnist5k"
    on = _calibrate_on(args)
    if getattr(args, "model", None):
        return Subject(Path(args.model).resolve(), dataset, own=True, calibrate_on=on)
    if train:
        return Subject(ensure_example_model(cache, dataset), dataset, calibrate_on=on)
    return Subject(cache / _slug(dataset) / "model.pt", dataset, calibrate_on=on)


def load_pipeline(subj: Subject, cache: Path, names: tuple[str, ...]) -> list[Detector]:
    dets = [Detector.load(p) for p in subj.artifacts(names, cache)]
    predict = model_fn(subj.model)
    for d in dets:
        d.model = predict  # detectors that call the model use the reference copy
    return dets


def bid_network(shape: tuple[int, ...]) -> torch.nn.Module | None:
    """The BinaryInputDetector's CNN (two 3x3 conv + 2x2 max-pool, a linear head; on
    28x28: 16x5x5 features) for inputs of ``shape`` (C, H, W); None when the images are
    too small for it (under 10x10)."""
    c, h, w = (int(v) for v in shape)
    fh, fw = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
    if fh < 1 or fw < 1:
        return None
    return torch.nn.Sequential(
        torch.nn.Conv2d(c, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * fh * fw, 2),
    )  # fmt: skip


def binary_input_detector(clf: Any, x: np.ndarray, seed: int, epochs: int) -> Any:
    """ART's BinaryInputDetector: a small CNN told apart clean and FGSM (eps 0.3) inputs.
    The inputs must be large enough for ``bid_network``."""
    from art.defences.detector.evasion import BinaryInputDetector

    torch.manual_seed(seed)
    net = bid_network(x.shape[1:])
    if net is None:
        raise ValueError(f"binary_input_detector: inputs of shape {x.shape[1:]} are too small")
    det_clf = art_classifier(
        net, x.shape[1:], 2, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3)
    )
    adv = adversarials(BID_TRAINING_ATTACK, clf, x)
    xs = np.concatenate([x, adv])
    ys = np.eye(2, dtype=np.float32)[np.r_[np.zeros(len(x), int), np.ones(len(adv), int)]]
    det = BinaryInputDetector(det_clf)
    det.fit(xs, ys, nb_epochs=epochs, batch_size=64)
    return det


def pixel_knn(train: datasets.Dataset, k: int = 5) -> Callable[[np.ndarray], np.ndarray]:
    """The label a ``k``-nearest-neighbour vote in pixel space (L2, the train split) gives
    each input: a reference for what an adversarial still looks like. Where it gives the
    attacker's label rather than the source's, the perturbation has moved the image
    itself (C&W kappa 20 at a mean L2 of 8), and no corrected label can be held to the
    source label (README, "Kappa 20's corrected label")."""
    flat = train.x.reshape(len(train.x), -1)
    knn = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(flat, train.y)
    return lambda v: knn.predict(np.asarray(v, np.float32).reshape(len(v), -1))


def _threshold(clean_cal: np.ndarray, fpr: float) -> float:
    """The split-conformal threshold for ``fpr`` on the clean calibration scores, as
    ``Detector.calibrate`` sets it (flag: score >= threshold)."""
    return conformal_threshold(clean_cal, fpr)


def _tpr(clean_cal: np.ndarray, adv: np.ndarray, fpr: float) -> float:
    thr = _threshold(clean_cal, fpr)
    return float(np.mean(adv >= thr)) if adv.size else float("nan")


def _n_test(quick: bool) -> int:
    return 200 if quick else 1000


def untrained_attacks(args: argparse.Namespace, cache: Path) -> list[AttackSpec]:
    """The attacks of this run whose adversarials are not cached yet (bench.attacks.generate
    keys them by the model file, the inputs, the attack and the seed): all of them while
    the example model is not trained."""
    specs = select_attacks(args)
    subj = subject(args, cache, train=False)
    if not subj.model.is_file():
        return specs
    x = datasets.load(subj.dataset).split(seed=0).test.x[: _n_test(args.quick)]
    return [s for s in specs if not cache_path(s, subj.model, x, cache, args.seed).is_file()]


def _note(text: str) -> None:
    print(f"openexample-bench detection: {text}", file=sys.stderr, flush=True)


def evaluate(args: argparse.Namespace, subj: Subject | None = None) -> tuple[dict, dict]:
    torch.set_num_threads(1)
    cache = Path("var/cache")
    subj = subj or subject(args, cache)
    model = subj.model
    ds = datasets.load(subj.dataset)
    splits = ds.split(seed=0)
    n = _n_test(args.quick)
    x, y = splits.test.x[:n], splits.test.y[:n]
    n = len(x)  # a small data set may have fewer test images
    predict = model_fn(model)
    dets = load_pipeline(subj, cache, _names(args))
    clf = classifier(model, x.shape[1:], ds.num_classes)
    clean_logits = predict(x)
    clean_pred = clean_logits.argmax(1)
    right = clean_pred == y
    # the thresholds' clean inputs: all of the calibration split, or (--calibrate-on
    # right) those the model gets right, as ``train`` picks them
    cal_x, calibrated_on = calibration_inputs(splits.calibration, predict, subj.calibrate_on)
    cal = Batch(cal_x, predict(cal_x), predict(cal_x).argmax(1))
    clean = Batch(x, clean_logits, clean_pred)
    cal_scores = {d.name: np.asarray(d.score(cal).scores) for d in dets}
    clean_scores = {d.name: np.asarray(d.score(clean).scores) for d in dets}
    shares = _shares(args)
    pipes, even = {}, {}
    for f in FPRS:  # the fused pipeline calibrated at each target
        pipes[f] = Pipeline([_copy(d) for d in dets], f, shares)
        pipes[f].calibrate(cal)
        if shares is not None:  # the even split beside it, in the same run
            even[f] = Pipeline([_copy(d) for d in dets], f)
            even[f].calibrate(cal)
    (squeezing,) = load_pipeline(subj, cache, ("feature_squeezing",))

    def squeeze_scores(v: np.ndarray) -> np.ndarray:
        logits = predict(v)
        return np.asarray(squeezing.score(Batch(v, logits, logits.argmax(1))).scores)

    # Baselines measured in the same run, outside the pipeline.
    baselines = {"feature_squeezing": squeeze_scores}
    skipped: dict[str, str] = {}
    if is_onnx(model):  # no gradients: what that leaves out (the FGSM-trained BID too)
        skipped.update(_without_gradients(args))
        for name, why in skipped.items():
            _note(f"{name}: {why}")
    elif bid_network(ds.input_shape) is None:
        h, w = ds.input_shape[1:]
        skipped["binary_input_detector"] = (
            f"skipped: its CNN (two 3x3 conv + 2x2 max-pool) needs images of at least"
            f" 10x10, {subj.dataset} has {h}x{w}"
        )
        _note(f"baseline binary_input_detector {skipped['binary_input_detector']}")
    else:
        # a seeded sample of the train split (stored by class: a prefix is a few digits)
        pick = np.random.default_rng(args.seed).permutation(len(splits.train.x))
        bid_x = splits.train.x[np.sort(pick[: 500 if args.quick else 2000])]
        bid = binary_input_detector(clf, bid_x, args.seed, 2 if args.quick else 5)
        baselines["binary_input_detector"] = lambda v: bid.detector.predict(v)[:, 1]
    for name, fn in baselines.items():
        cal_scores[name], clean_scores[name] = fn(cal_x), fn(x)
    looks_like = pixel_knn(splits.train)
    clean_fused = {f: p.evaluate(clean) for f, p in pipes.items()}
    report: dict[str, Any] = {
        "schema": "openexample.bench.detection/1",
        "dataset": subj.dataset,
        "model": {
            "path": str(model),
            "digest": file_digest(model),
            "example": not subj.own,  # False: the user's own model, not trained here
        },
        "input_shape": list(ds.input_shape),
        "classes": ds.num_classes,
        "n_test": int(n),
        "clean_accuracy": round(float(right.mean()), 4),
        "detectors_in_pipeline": [d.name for d in dets],
        # seconds each took to fit on this machine, when its artifact was made
        "fit_seconds": {d.name: d.meta.get("fit_seconds") for d in dets},
        "baselines": list(baselines),
        "skipped": skipped,
        "fpr_shares": dict(zip(pipes[FPRS[0]].names, pipes[FPRS[0]].shares, strict=True)),
        "calibrated_on": calibrated_on,
        "fused_fpr_on_clean": {
            str(f): round(float(ev.flagged.mean()), 4) for f, ev in clean_fused.items()
        },
        # the same split in two: what the model gets right (false alarms on correct
        # outputs) and its own mistakes (flagging those stops a wrong output)
        "fused_flagged_clean_right": {
            str(f): round(float(ev.flagged[right].mean()), 4) for f, ev in clean_fused.items()
        },
        "fused_flagged_clean_wrong": {
            str(f): round(float(ev.flagged[~right].mean()), 4) if (~right).any() else None
            for f, ev in clean_fused.items()
        },
        # what a pixel-space 5-NN over the train split says of the clean test inputs
        "pixel_5nn_clean_accuracy": round(float(np.mean(looks_like(x) == y)), 4),
        "attacks": [],
    }
    if even:
        report["fused_fpr_on_clean_even_shares"] = {
            str(f): round(float(p.evaluate(clean).flagged.mean()), 4) for f, p in even.items()
        }
    adversarial: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    budgets: dict[str, str] = {}
    rocs: dict[str, dict[str, tuple]] = {}
    operating: dict[str, tuple[float, float]] = {}  # fused at FPRS[0]: (clean FPR, TPR)
    for spec in tqdm(select_attacks(args), desc="attacks", unit="attack"):
        adv = generate(spec, clf, model, x, cache, args.seed)
        adv_pred = predict(adv).argmax(1)
        ok = right & (adv_pred != y)
        row = _attack_row(spec, x, adv, ok, right)
        if ok.any():  # does the adversarial still look like its source, or like the claim?
            seen = looks_like(adv[ok])
            row["pixel_5nn"] = {
                "source": round(float(np.mean(seen == y[ok])), 4),
                "attacker": round(float(np.mean(seen == adv_pred[ok])), 4),
            }
        a = Batch(adv[ok], predict(adv[ok]), adv_pred[ok])
        for d in dets:
            scored = d.score(a) if ok.any() else None
            s = np.asarray(scored.scores) if scored is not None else np.empty(0)
            det_row = _det_row(d.name, cal_scores[d.name], clean_scores[d.name], s)
            if scored is not None and scored.corrected is not None:
                # the detector's own corrected label, on what it flags at 1% FPR
                flag = s >= _threshold(cal_scores[d.name], FPRS[0])
                fixed = np.asarray(scored.corrected)[flag] == y[ok][flag]
                acc = round(float(fixed.mean()), 4) if flag.any() else None
                det_row["corrected_accuracy"] = acc
            row["detectors"].append(det_row)
            rocs.setdefault(_label(spec), {})[d.name] = (clean_scores[d.name], s)
        for name, fn in baselines.items():
            s = fn(adv[ok]) if ok.any() else np.empty(0)
            row["detectors"].append(_det_row(name, cal_scores[name], clean_scores[name], s))
            rocs[_label(spec)][name] = (clean_scores[name], s)
        fused: dict[str, Any] = {"detector": "fused", "tpr_at_fpr": {}}
        for f, p in pipes.items():
            ev = p.evaluate(a) if ok.any() else None
            fused["tpr_at_fpr"][str(f)] = round(float(ev.flagged.mean()), 4) if ev else None
            if f == FPRS[0] and ev is not None:
                flagged = ev.flagged & (ev.corrected >= 0)
                acc = np.mean(ev.corrected[flagged] == y[ok][flagged]) if flagged.any() else None
                fused["corrected_accuracy"] = None if acc is None else round(float(acc), 4)
                fused.update(delivered_corrections(ev, a.labels, y[ok]))
                clean_ev = clean_fused[f]
                fused["auc"] = round(
                    float(
                        roc_auc_score(
                            np.r_[np.zeros(n), np.ones(ok.sum())],
                            np.r_[clean_ev.score, ev.score],
                        )
                    ),
                    4,
                )
                # the fused curve, and where the pipeline's own thresholds put it
                rocs[_label(spec)]["fused"] = (clean_ev.score, ev.score)
                operating[_label(spec)] = (
                    float(clean_ev.flagged.mean()),
                    float(ev.flagged.mean()),
                )
        if even:  # the same fused verdict with the budget split evenly
            fused["even_shares_tpr_at_fpr"] = {
                str(f): round(float(p.evaluate(a).flagged.mean()), 4) if ok.any() else None
                for f, p in even.items()
            }
        row["detectors"].append(fused)
        report["attacks"].append(row)
        if spec.name in table_iv.SETS and (spec.eps in (None, 0.3)):
            adversarial[spec.name] = (adv, y, adv_pred != y)  # every attacked input
            budgets[spec.name] = spec.budget
    data = {"rocs": rocs, "operating": operating, "adversarial": adversarial}
    return report, data | {"clean": (x, y), "budgets": budgets}


def delivered_corrections(
    ev: Fused, claimed: np.ndarray, truth: np.ndarray
) -> dict[str, float | None]:
    """What ``on_adversarial: correct`` (``CorrectionPolicy``, the default
    ``correct_min_agree``) hands out on these flagged items, decided by the controller's
    own code (``claimed``: the labels the model gave): the share of flagged items
    released with a corrected label (the rest are dropped) and how many of those labels
    are right."""
    policy = CorrectionPolicy("correct")
    fixes = [None if s.corrected is None else np.asarray(s.corrected) for s in ev.per_detector]
    flagged = np.flatnonzero(ev.flagged)
    if flagged.size == 0:
        return {"corrected_delivered": None, "delivered_accuracy": None}
    out = np.array(
        [
            policy.action(
                int(ev.corrected[i]),
                [None if f is None else int(f[i]) for f in fixes],
                int(claimed[i]),
            )
            == pb.VERDICT_ACTION_CORRECT
            for i in flagged
        ]
    )
    right = ev.corrected[flagged[out]] == truth[flagged[out]]
    return {
        "corrected_delivered": round(float(out.mean()), 4),
        "delivered_accuracy": round(float(right.mean()), 4) if out.any() else None,
    }


def table_iv_defences(
    args: argparse.Namespace,
) -> list[tuple[tuple[str, ...], tuple[float, ...] | None]]:
    """Table IV's defences as (detectors, FPR shares; None: even): ``--table-iv`` (sets
    separated by ';', detectors by ','; a named set such as ``default`` or ``hardened``
    with its own split), else the run's pipeline alone (its ``--fpr-shares``)."""
    spec = getattr(args, "table_iv", None)
    if not spec:
        return [(_names(args), _shares(args))]
    on = _calibrate_on(args)
    return [detector_set(part.strip(), None, on) for part in spec.split(";") if part.strip()]


def _onnx(args: argparse.Namespace) -> bool:
    model = getattr(args, "model", None)
    return bool(model) and is_onnx(model)


def select_attacks(args: argparse.Namespace) -> list[AttackSpec]:
    """The run's attacks (``standard_attacks``; for an ONNX model ``black_box_attacks``),
    only those ``--attacks`` names by their table label; ValueError naming the labels
    when one is unknown, or needs gradients an ONNX model has not."""
    specs = black_box_attacks(args.quick) if _onnx(args) else standard_attacks(args.quick)
    wanted = getattr(args, "attacks", None)
    if not wanted:
        return specs
    by_label = {_label(s): s for s in specs}
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [w for w in names if w not in by_label]
    gradient = {_label(s) for s in standard_attacks(args.quick)}
    if unknown and _onnx(args) and set(unknown) <= gradient:
        raise ValueError(
            f"{unknown} need the model's gradients, which ART cannot take from an ONNX model;"
            f" for it this run has {', '.join(by_label)}"
        )
    if unknown:
        raise ValueError(f"unknown {unknown}; this run has {', '.join(by_label)}")
    return [by_label[w] for w in names]


def _without_gradients(args: argparse.Namespace) -> dict[str, str]:
    """What a run on an ONNX model leaves out, and why (the report's ``skipped``)."""
    gradient = ", ".join(dict.fromkeys(s.name for s in standard_attacks()))
    black = ", ".join(dict.fromkeys(s.name for s in black_box_attacks(args.quick)))
    why = "ART takes them from the model's gradients, and an ONNX model (run by onnxruntime)"
    return {
        "gradient_attacks": f"skipped ({gradient}): {why} has none; {black} (black-box) instead",
        "binary_input_detector": (
            "skipped: it is trained on FGSM inputs, a gradient attack (an ONNX model has no"
            " gradients here)"
        ),
        "table_iv_attacks": (
            "Table IV's FGSM, R+FGSM and DeepFool sets need the model's gradients: for an"
            " ONNX model it runs the clean set alone, through a controller and an agent"
            " running the ONNX file"
        ),
    }


def _names(args: argparse.Namespace) -> tuple[str, ...]:
    return detector_set(args.detectors)[0]


def _shares(args: argparse.Namespace) -> tuple[float, ...] | None:
    """``--fpr-shares`` in the order of the run's detectors, else a named set's own for
    ``--calibrate-on``; None: even."""
    return detector_set(args.detectors, getattr(args, "fpr_shares", None), _calibrate_on(args))[1]


def _copy(d: Detector) -> Detector:
    """A detector sharing the learned state, with its own threshold."""
    c = type(d).__new__(type(d))
    c.__dict__.update(d.__dict__)
    c.meta = dict(d.meta)
    return c


def _label(spec: AttackSpec) -> str:
    return spec.name if spec.eps is None else f"{spec.name} eps={spec.eps:g}"


def _attack_row(
    spec: AttackSpec, x: np.ndarray, adv: np.ndarray, ok: np.ndarray, right: np.ndarray
) -> dict:
    d = (adv - x).reshape(len(x), -1)
    return {
        "attack": spec.name,
        "eps": spec.eps,
        "params": spec.params,
        "success_rate": round(float(ok.sum() / max(right.sum(), 1)), 4),
        "n_successful": int(ok.sum()),
        "mean_l2": round(float(np.linalg.norm(d[ok], axis=1).mean()), 4) if ok.any() else None,
        "mean_linf": round(float(np.abs(d[ok]).max(axis=1).mean()), 4) if ok.any() else None,
        "detectors": [],
    }


def _det_row(name: str, cal: np.ndarray, clean: np.ndarray, adv: np.ndarray) -> dict:
    # the clean test inputs (never seen by calibration) flagged at each threshold
    clean_fpr = {str(f): round(float(np.mean(clean >= _threshold(cal, f))), 4) for f in FPRS}
    if adv.size == 0:
        return {
            "detector": name,
            "auc": None,
            "tpr_at_fpr": {str(f): None for f in FPRS},
            "clean_fpr": clean_fpr,
        }
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    return {
        "detector": name,
        "auc": round(float(roc_auc_score(labels, np.r_[clean, adv])), 4),
        "tpr_at_fpr": {str(f): round(_tpr(cal, adv, f), 4) for f in FPRS},
        "clean_fpr": clean_fpr,
    }


def run_table_iv(
    subj: Subject,
    data: dict,
    defences: list[tuple[str, ...]],
    feed: int,
    cache: Path = Path("var/cache"),
    shares: dict[tuple[str, ...], tuple[float, ...] | None] | None = None,
) -> list[dict]:
    """The paper's Table IV (bench.table_iv), one block of rows per defence (a detector
    set, trained and calibrated together), each through its own controller process;
    ``shares``: the FPR split of a set (default: even)."""
    sets = table_iv.feeds(data, data["budgets"], feed)
    predict = model_fn(subj.model)
    rows: list[dict] = []
    for names in defences:
        rows += table_iv.run_defence(
            "+".join(names),
            subj.model,
            "own-model" if subj.own else "mnist-cnn",
            subj.artifacts(names, cache, (shares or {}).get(names)),
            sets,
            predict,
            Path(f"var/bench/detection/controller-{'+'.join(names)}"),
        )
    return rows


def markdown(report: dict) -> str:
    names = [d["detector"] for d in report["attacks"][0]["detectors"]] if report["attacks"] else []
    lines = []
    model = report.get("model", {})
    if model and not model["example"]:
        lines += [f"Model: {model['path']} ({model['digest'][:19]}), the user's own.", ""]
    lines += [
        f"Clean accuracy {report['clean_accuracy']:.3f} on {report['n_test']}"
        f" {report.get('dataset', 'mnist5k')} test images;"
        f" fused FPR on clean {report['fused_fpr_on_clean']}.",
        "",
    ]
    if "fused_flagged_clean_right" in report:
        on = report.get("calibrated_on", {})
        lines += [
            f"Calibrated on {on.get('inputs', 'all')} clean inputs ({on.get('n', '?')} of the"
            " calibration split); clean test inputs flagged where the model is right"
            f" {report['fused_flagged_clean_right']}, where it is wrong"
            f" {report['fused_flagged_clean_wrong']}.",
            "",
        ]
    lines += [
        "TPR at 1% FPR (AUC) over successful adversarials:",
        "",
        "| attack | success | L2 | Linf | " + " | ".join(names) + " |",
        "|" + "---|" * (4 + len(names)),
    ]
    for a in report["attacks"]:
        cells = []
        for d in a["detectors"]:
            tpr, auc = d["tpr_at_fpr"].get("0.01"), d.get("auc")
            cells.append("-" if tpr is None else f"{tpr:.3f} ({auc:.3f})" if auc else f"{tpr:.3f}")
        label = a["attack"] if a["eps"] is None else f"{a['attack']} {a['eps']:g}"
        lines.append(
            f"| {label} | {a['success_rate']:.2f} | {a['mean_l2'] or 0:.2f} |"
            f" {a['mean_linf'] or 0:.2f} | " + " | ".join(cells) + " |"
        )
    if "fused_fpr_on_clean_even_shares" in report:
        split = ", ".join(f"{k} {v:g}" for k, v in report["fpr_shares"].items())
        lines += [
            "",
            f"Fused TPR at 1% FPR with the budget split {split}, beside an even split (same"
            f" run); fused FPR on clean: {report['fused_fpr_on_clean']} against"
            f" {report['fused_fpr_on_clean_even_shares']}:",
            "",
            "| attack | these shares | even shares |",
            "|---|---|---|",
        ]
        for a in report["attacks"]:
            f = a["detectors"][-1]
            ours, evens = f["tpr_at_fpr"].get("0.01"), f["even_shares_tpr_at_fpr"].get("0.01")
            label = a["attack"] if a["eps"] is None else f"{a['attack']} {a['eps']:g}"
            lines.append(
                f"| {label} | {'-' if ours is None else f'{ours:.3f}'} |"
                f" {'-' if evens is None else f'{evens:.3f}'} |"
            )
    if report["attacks"]:
        per = report["attacks"][0]["detectors"][:-1]  # the fused row has its own line
        lines += [
            "",
            "Clean test inputs flagged at each detector's 1% / 5% calibration threshold: "
            + ", ".join(
                f"{d['detector']} {d['clean_fpr']['0.01']:.3f} / {d['clean_fpr']['0.05']:.3f}"
                for d in per
                if "clean_fpr" in d
            )
            + ".",
            "",
            "Corrected label right, on what each purifier flags at 1% FPR (fused: on what"
            " the pipeline flags):",
            "",
            "| attack | " + " | ".join(names) + " |",
            "|" + "---|" * (1 + len(names)),
        ]
        for a in report["attacks"]:
            cells = [
                "-" if d.get("corrected_accuracy") is None else f"{d['corrected_accuracy']:.3f}"
                for d in a["detectors"]
            ]
            label = a["attack"] if a["eps"] is None else f"{a['attack']} {a['eps']:g}"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Delivered under `on_adversarial: correct` (correct_min_agree 2): the share of"
            " flagged inputs released with a corrected label (the rest dropped), and how"
            " many of those labels are right:",
            "",
            "Beside them, what a pixel-space 5-NN over the train split says the successful"
            " adversarials look like: the source label or the attacker's (on the clean test"
            f" inputs it is right on {report.get('pixel_5nn_clean_accuracy', 0):.3f}):",
            "",
            "| attack | delivered | right | 5-NN: source | 5-NN: attacker's |",
            "|---|---|---|---|---|",
        ]
        for a in report["attacks"]:
            fused = a["detectors"][-1]
            got, right = fused.get("corrected_delivered"), fused.get("delivered_accuracy")
            seen = a.get("pixel_5nn", {})
            label = a["attack"] if a["eps"] is None else f"{a['attack']} {a['eps']:g}"
            lines.append(
                f"| {label} | {'-' if got is None else f'{got:.3f}'} |"
                f" {'-' if right is None else f'{right:.3f}'} |"
                + "".join(
                    f" {'-' if seen.get(k) is None else f'{seen[k]:.3f}'} |"
                    for k in ("source", "attacker")
                )
            )
    fits = {k: v for k, v in report.get("fit_seconds", {}).items() if v is not None}
    if fits:
        lines += ["", "Training time (s): " + ", ".join(f"{k} {v:g}" for k, v in fits.items())]
    for name, why in report.get("skipped", {}).items():
        lines += ["", f"{name}: {why}."]
    if report.get("table_iv"):
        lines += ["", *table_iv.markdown(report["table_iv"])]
    return "\n".join(lines) + "\n"


def roc_plots(rocs: dict, out: Path, operating: dict | None = None) -> list[Path]:
    """One ROC plot per attack: each detector, the baselines, and the fused pipeline
    with its operating point (its own thresholds at FPRS[0], on clean test inputs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for attack, per in rocs.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        for name, (clean, adv) in per.items():
            if adv.size == 0:
                continue
            fpr, tpr, _ = roc_curve(
                np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv]
            )
            fused = name == "fused"
            ax.plot(
                fpr, tpr, label=name, linewidth=2.2 if fused else 1.0, color="k" if fused else None
            )
        if operating and attack in operating:
            op_fpr, op_tpr = operating[attack]
            ax.plot(
                [op_fpr], [op_tpr], "o", color="red",
                label=f"operating point (target {FPRS[0]:g}): FPR {op_fpr:.3f}, TPR {op_tpr:.3f}",
            )  # fmt: skip
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("false-positive rate (clean)")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"ROC, {attack}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"roc_{attack.replace(' ', '_').replace('=', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def eps_plot(report: dict, out: Path) -> list[Path]:
    """Fused detection rate (at FPRS[0]) against the attack budget, per attack that was
    run at more than one eps; none when there is no such attack (``--quick``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for a in report["attacks"]:
        fused = a["detectors"][-1]["tpr_at_fpr"].get(str(FPRS[0]))
        if a["eps"] is not None and fused is not None:
            series.setdefault(a["attack"], []).append((a["eps"], fused))
    series = {k: sorted(v) for k, v in series.items() if len({e for e, _ in v}) > 1}
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, points in series.items():
        ax.plot(*zip(*points, strict=True), "o-", label=name)
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel(f"detected, fused at {FPRS[0]:g} FPR")
    ax.set_ylim(0, 1.02)
    ax.set_title("Detection rate against the attack budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "detection_vs_eps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subj = subject(args, Path("var/cache"))
    report, data = evaluate(args, subj)
    defences = table_iv_defences(args)
    report["table_iv"] = run_table_iv(
        subj, data, [names for names, _ in defences], args.table_iv_n, shares=dict(defences)
    )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    json_path = Path(args.json) if args.json else out / "detection.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "detection.md").write_text(md)
    plots = roc_plots(data["rocs"], out, data["operating"])
    plots += eps_plot(report, out)
    print(md)
    print(f"wrote {json_path}, {out / 'detection.md'} and {len(plots)} plots in {out}")
    return 0
