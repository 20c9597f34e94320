"""UDDN's knowledge-transfer step (seed 003, section 4) as an offline command.

The paper retrains the protected model by distillation on denoised images, so that the
residual noise the denoiser leaves does not move its prediction. A runtime controller must
never retrain the user's model, so this is a separate, offline command: it writes a
*student* model, of the teacher's architecture, that the user may choose to deploy (behind
the UDDN detector or not), and prints the clean and adversarial accuracy of teacher and
student so that the choice is an informed one.

What it does:

1. The teacher is the user's TorchScript model (``--model``; the example model of the data
   set by default); the UDDN artifact (``--uddn``, from ``openexample-controller train
   uddn``) gives the denoiser D.
2. Adversarial versions of the *training* split are made with ART against the teacher, with
   the mixture the UDDN artifact was trained with (same images, seed and settings: read
   from the UDDN cache when it made them, controller/detectors/uddn.py
   ``training_adversarials``).
3. The student's training inputs are D(x) and D(x_adv): the UDDN-denoised clean and
   adversarial training images. Its targets are the teacher's outputs softened at
   temperature T (``--temperature``), by default the teacher's outputs on the *clean*
   original of each pair (``--targets clean``): the paper's teacher is itself retrained
   on denoised images with the true labels, so its outputs on a denoised image are about
   the clean answer; the user's teacher is not retrained here, and on D(x_adv) it is still
   fooled now and then, so its output on the clean original is what stands for that
   knowledge. ``--targets denoised`` uses the teacher's outputs on the denoised images
   themselves (the paper's wording, with an un-retrained teacher).
4. Loss, the paper's Equation 6: KL(P_t || P_s) + lambda * KL(P_t^T || P_s^T), the second
   term multiplied by T^2 (Hinton et al.'s scaling, which keeps its gradients the size of
   the first term's whatever T; ``--lam`` is lambda, 1 by default).
5. The student starts as a copy of the teacher: the TorchScript file is loaded a second
   time and its parameters are trained in place (a TorchScript module's parameters are
   ordinary tensors that autograd and an optimizer update; no Python class needed). What
   a trace baked in stays baked in: a traced model with dropout or batch norm keeps the
   mode it was traced in (normally eval: no dropout, batch norm on its running
   statistics, which are not updated). A warning says so when the model has such layers.
6. The student is saved as TorchScript (``--out``), with a JSON report beside it
   (``STUDENT.json``: settings and figures).
7. Figures, on the *test* split: clean accuracy, then for each eps (``--eps``) FGSM and
   PGD (ART; PGD with eps_step eps / 10, 20 iterations, one random start) made white-box
   against each model itself, plus the teacher's adversarials transferred to the student
   and, gray-box (the attack does not see D), teacher and student on the UDDN-denoised
   teacher adversarials.

Run as ``python -m controller.training.distill --uddn DIR --out student.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controller.detectors import nets
from controller.detectors.base import Detector
from controller.detectors.uddn import (
    UddnDetector,
    attack_label,
    training_adversarials,
    training_subset,
)
from controller.reference_model import load_model, quiet_torchscript
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from openexample.digests import file_digest
from openexample.errors import one_line

PGD_STEPS = 20
_BAKED = ("Dropout", "BatchNorm")  # layers whose train/eval behaviour a trace bakes in


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def predict(module: torch.nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """``module``'s logits on ``x`` (eval mode, inference mode), float32 numpy."""
    return nets.forward(module.eval(), x, batch_size)


def accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(predict(module, x).argmax(1) == y)) if len(x) else float("nan")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    lam: float = 1.0,
) -> torch.Tensor:
    """The paper's Equation 6: KL(P_t || P_s) + lam * T^2 * KL(P_t^T || P_s^T), P^T being
    softmax(logits / T); batch mean."""

    def kl(t: float) -> torch.Tensor:
        log_s = torch.log_softmax(student_logits / t, dim=1)
        log_t = torch.log_softmax(teacher_logits / t, dim=1)
        return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()

    return kl(1.0) + lam * temperature**2 * kl(temperature)


def baked_layers(module: torch.nn.Module) -> list[str]:
    """Names of the submodules whose behaviour a TorchScript trace fixed (dropout, BN)."""
    out = []
    for name, sub in module.named_modules():
        kind = getattr(sub, "original_name", type(sub).__name__)
        if any(b in kind for b in _BAKED):
            out.append(f"{name or '<root>'} ({kind})")
    return out


def train_student(
    student: torch.nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    temperature: float,
    lam: float = 1.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train ``student`` in place on (inputs, teacher logits); the mean loss per epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    xt, tt = nets.as_tensor(inputs), nets.as_tensor(targets)
    student.train()
    losses = []
    start = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        for idx in nets.minibatches(len(xt), batch_size, rng):
            i = torch.from_numpy(idx)
            loss = distillation_loss(student(xt[i]), tt[i], temperature, lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / max(len(xt), 1))
        _log(
            f"  student: epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}"
            f" ({time.perf_counter() - start:.0f}s)"
        )
    student.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def _attacks(module: torch.nn.Module, x: np.ndarray, classes: int, eps: float, seed: int):
    """{"FGSM@eps": adv, "PGD@eps": adv} on ``x`` against ``module`` (ART, white-box)."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    from controller.training.adversarial import art_classifier

    clf = art_classifier(module, x.shape[1:], classes)
    np_state = np.random.get_state()
    try:
        np.random.seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fgsm = FastGradientMethod(clf, eps=eps, batch_size=256).generate(x)
            pgd = ProjectedGradientDescent(
                clf,
                eps=eps,
                eps_step=eps / 10,
                max_iter=PGD_STEPS,
                num_random_init=1,
                batch_size=256,
                verbose=False,
            ).generate(x)
    finally:
        np.random.set_state(np_state)
    return {f"FGSM@{eps:g}": fgsm.astype(np.float32), f"PGD@{eps:g}": pgd.astype(np.float32)}


def evaluate(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    uddn: UddnDetector,
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    eps_list: list[float],
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{row: {column: accuracy}} on the test images (see the module docstring, 7)."""
    rows: dict[str, dict[str, float]] = {
        "clean": {"teacher": accuracy(teacher, x, y), "student": accuracy(student, x, y)},
        "clean, UDDN-denoised": {
            "teacher": accuracy(teacher, uddn.denoise(x), y),
            "student": accuracy(student, uddn.denoise(x), y),
        },
    }
    for eps in eps_list:
        t0 = time.perf_counter()
        on_teacher = _attacks(teacher, x, classes, eps, seed)
        on_student = _attacks(student, x, classes, eps, seed)
        for name, adv in on_teacher.items():
            denoised = uddn.denoise(adv)
            rows[f"{name} white-box"] = {
                "teacher": accuracy(teacher, adv, y),
                "student": accuracy(student, on_student[name], y),
            }
            rows[f"{name} teacher's, transferred"] = {
                "teacher": accuracy(teacher, adv, y),
                "student": accuracy(student, adv, y),
            }
            rows[f"{name} teacher's, UDDN-denoised"] = {
                "teacher": accuracy(teacher, denoised, y),
                "student": accuracy(student, denoised, y),
            }
        _log(f"  attacks at eps {eps:g} in {time.perf_counter() - t0:.0f}s")
    return rows


def _table(rows: dict[str, dict[str, float]]) -> str:
    width = max(len(r) for r in rows)
    lines = [f"{'accuracy on the test split':<{width}}  {'teacher':>8}  {'student':>8}"]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  {row['teacher']:>8.4f}  {row['student']:>8.4f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="openexample-controller train distill",
        description=(
            "UDDN's knowledge transfer, offline: train a student copy of a model on its"
            " softened outputs over UDDN-denoised clean and adversarial training images,"
            " save it as TorchScript and print teacher and student accuracy (clean, FGSM,"
            " PGD on the test split). The controller never deploys it: the user may."
        ),
    )
    ap.add_argument("--model", help="teacher TorchScript file (default: the example model)")
    ap.add_argument("--dataset", default="mnist5k", help="data set (as for train)")
    ap.add_argument("--uddn", required=True, help="a trained UDDN artifact folder")
    ap.add_argument("--out", required=True, help="where to write the student (TorchScript)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=4.0, help="T >= 1 (default 4)")
    ap.add_argument("--lam", type=float, default=1.0, help="weight of the softened term")
    ap.add_argument(
        "--targets",
        choices=("clean", "denoised"),
        default="clean",
        help="teacher outputs on the clean originals (default) or on the denoised images",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-train", type=int, help="training images (default: the UDDN's)")
    ap.add_argument("--num-test", type=int, help="test images evaluated (default: all)")
    ap.add_argument("--eps", default="0.1,0.3", help="L-inf budgets of the test attacks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cache", default="var/cache", help="example model and UDDN cache")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = "openexample-controller train distill"
    try:
        eps_list = [float(e) for e in args.eps.split(",") if e.strip()]
    except ValueError:
        print(f"{prog}: --eps takes numbers, comma-separated: {args.eps!r}", file=sys.stderr)
        return 2
    if args.temperature < 1 or args.epochs < 1 or args.threads < 1 or args.batch_size < 1:
        print(
            f"{prog}: --temperature, --epochs, --threads, --batch-size must be >= 1",
            file=sys.stderr,
        )
        return 2
    if not (Path(args.uddn) / "manifest.json").is_file():
        print(
            f"{prog}: --uddn {args.uddn}: not a detector artifact (no manifest.json); train"
            " one with: openexample-controller train uddn --out DIR",
            file=sys.stderr,
        )
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, eps_list)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, eps_list: list[float]) -> int:
    start = time.perf_counter()
    cache = Path(args.cache)
    uddn = Detector.load(args.uddn)
    if not isinstance(uddn, UddnDetector):
        raise ValueError(f"--uddn {args.uddn} holds a {uddn.name!r} artifact, not uddn")
    teacher_path = Path(args.model or ensure_example_model(cache, args.dataset))
    teacher = nets.frozen(load_model(teacher_path))
    digest = file_digest(teacher_path)
    if uddn.meta.get("model_digest") not in (None, digest):
        _log(
            f"  warning: the UDDN artifact was trained for {uddn.meta.get('model')}"
            f" ({uddn.meta['model_digest'][:19]}...), not for {teacher_path}"
        )
    baked = baked_layers(teacher)
    if baked:
        _log(
            "  warning: the student keeps the traced (eval) behaviour of "
            + ", ".join(baked)
            + ": dropout stays off and batch norm keeps its running statistics"
        )
    splits = datasets.load(args.dataset).split()
    classes = splits.train.num_classes
    cfg = uddn.train_config
    num_train = args.num_train if args.num_train is not None else cfg.num_train
    x = training_subset(splits.train.x, num_train, cfg.seed)
    y = training_subset(splits.train.y, num_train, cfg.seed)
    adv, _, summary = training_adversarials(
        teacher, x, classes, cfg.attack_specs(), seed=cfg.seed, cache=cache
    )
    inputs = np.concatenate([uddn.denoise(x), uddn.denoise(adv)])
    targets = predict(teacher, np.concatenate([x, x]) if args.targets == "clean" else inputs)
    _log(
        f"  {len(inputs)} training inputs (UDDN-denoised clean + adversarial), teacher's"
        f" targets ({args.targets}) with the true label on top for"
        f" {np.mean(targets.argmax(1) == np.r_[y, y]):.4f} of them"
    )
    student = load_model(teacher_path)  # a second, independent copy of the teacher
    losses = train_student(
        student,
        inputs,
        targets,
        epochs=args.epochs,
        temperature=args.temperature,
        lam=args.lam,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with quiet_torchscript():
        student.save(str(tmp))
    os.replace(tmp, out)
    student = nets.frozen(load_model(out))  # evaluate what was written
    test = splits.test
    n_test = len(test) if args.num_test is None else min(args.num_test, len(test))
    rows = evaluate(
        teacher, student, uddn, test.x[:n_test], test.y[:n_test], classes, eps_list, args.seed
    )
    report: dict[str, Any] = {
        "teacher": str(teacher_path.resolve()),
        "teacher_digest": digest,
        "student": str(out.resolve()),
        "student_digest": file_digest(out),
        "uddn": str(Path(args.uddn).resolve()),
        "dataset": args.dataset,
        "settings": {
            k: getattr(args, k)
            for k in ("epochs", "temperature", "lam", "targets", "lr", "batch_size", "seed")
        },
        "num_train_inputs": len(inputs),
        "training_attacks": [attack_label(a) for a in cfg.attack_specs()],
        "adversarials": summary,
        "losses": [round(v, 5) for v in losses],
        "num_test": n_test,
        "accuracy": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(_table(rows))
    print(f"student: {out} ({report['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
