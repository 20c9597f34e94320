"""Adversarial training data for detectors that learn from attacks (offline room).

ISMN, UDDN and the feature-map transformer learn from adversarial versions of the
*training* split, made with IBM ART against the protected model; the detection bench
evaluates them on attacks of the *test* split (bench/attacks.py), so no evaluation
input is ever seen in training. ``mixed_adversarials`` draws one attack per input from
a mixture (kind and eps), as the seeds do.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class TrainingAttack:
    """One component of the mixture: an ART evasion attack class and its settings."""

    art_class: str
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # sampling weight in the mixture

    @property
    def label(self) -> str:
        eps = self.params.get("eps")
        return self.art_class if eps is None else f"{self.art_class}@{eps:g}"


# FGSM and PGD at several L-inf budgets (seed 002's training mixture).
DEFAULT_ATTACKS: tuple[TrainingAttack, ...] = (
    TrainingAttack("FastGradientMethod", {"eps": 0.1}),
    TrainingAttack("FastGradientMethod", {"eps": 0.2}),
    TrainingAttack("FastGradientMethod", {"eps": 0.3}),
    TrainingAttack("ProjectedGradientDescent", {"eps": 0.1, "eps_step": 0.01, "max_iter": 20}),
    TrainingAttack("ProjectedGradientDescent", {"eps": 0.2, "eps_step": 0.02, "max_iter": 20}),
    TrainingAttack("ProjectedGradientDescent", {"eps": 0.3, "eps_step": 0.03, "max_iter": 20}),
)


def art_classifier(module: torch.nn.Module, input_shape: Sequence[int], classes: int) -> Any:
    """ART's PyTorchClassifier over ``module``: cross-entropy, inputs clipped to [0, 1]."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=module,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(int(d) for d in input_shape),
        nb_classes=int(classes),
        clip_values=(0.0, 1.0),
    )


def attack(spec: TrainingAttack, clf: Any, x: np.ndarray) -> np.ndarray:
    """Adversarial versions of ``x`` under one attack (float32)."""
    import art.attacks.evasion as evasion

    cls = getattr(evasion, spec.art_class)
    params = dict(spec.params)
    params.setdefault("batch_size", 256)  # ART's 32 is ~7x slower on CPU (PGD, measured)
    if spec.art_class == "ProjectedGradientDescent":
        params.setdefault("verbose", False)
        params.setdefault("num_random_init", 1)
    return cls(clf, **params).generate(x=np.asarray(x, np.float32)).astype(np.float32)


def mixed_adversarials(
    module: torch.nn.Module,
    x: np.ndarray,
    classes: int,
    *,
    attacks: Sequence[TrainingAttack] = DEFAULT_ATTACKS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One adversarial version of each input of ``x``, its attack drawn from the mixture
    (probability proportional to ``weight``). Returns the adversarials and, per input,
    the index of the attack used."""
    if not attacks:
        raise ValueError("mixed_adversarials: no attacks")
    rng = np.random.default_rng(seed)
    w = np.array([a.weight for a in attacks], np.float64)
    kind = rng.choice(len(attacks), size=len(x), p=w / w.sum())
    clf = art_classifier(module, x.shape[1:], classes)
    out = np.empty_like(np.asarray(x, np.float32))
    for i, spec in enumerate(attacks):
        idx = np.flatnonzero(kind == i)
        if idx.size == 0:
            continue
        t0 = time.perf_counter()
        out[idx] = attack(spec, clf, x[idx])
        took = time.perf_counter() - t0
        print(f"    {spec.label}: {idx.size} inputs, {took:.1f}s", file=sys.stderr, flush=True)
    return out, kind
