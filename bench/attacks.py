"""Adversarial examples for evaluation, made with IBM ART (the library the paper used).

Every attack runs against the example model through ART's PyTorchClassifier; results
are cached on disk keyed by the model file, the inputs and the attack's settings, so
a second run of the bench or the demo costs nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class AttackSpec:
    """One row of the evaluation: an ART attack class and its settings."""

    name: str  # "FGSM", "R+FGSM", ...
    art_class: str  # class in art.attacks.evasion
    params: dict[str, Any] = field(default_factory=dict)
    eps: float | None = None
    # R+FGSM (Tramer et al.): a random sign step of alpha first, then FGSM of eps - alpha.
    random_step: float = 0.0

    @property
    def key(self) -> str:
        raw = json.dumps([self.name, self.art_class, self.params, self.random_step], sort_keys=True)
        return hashlib.sha1(raw.encode()).hexdigest()[:10]


def standard_attacks(quick: bool = False) -> list[AttackSpec]:
    """The attacks of the issue: FGSM at three budgets, R+FGSM, BIM, PGD, DeepFool, C&W."""
    specs = [
        AttackSpec("FGSM", "FastGradientMethod", {"eps": 0.1}, eps=0.1),
        AttackSpec("FGSM", "FastGradientMethod", {"eps": 0.2}, eps=0.2),
        AttackSpec("FGSM", "FastGradientMethod", {"eps": 0.3}, eps=0.3),
        AttackSpec("R+FGSM", "FastGradientMethod", {"eps": 0.15}, eps=0.3, random_step=0.15),
        AttackSpec(
            "BIM", "BasicIterativeMethod", {"eps": 0.3, "eps_step": 0.01, "max_iter": 40}, eps=0.3
        ),
        AttackSpec(
            "PGD",
            "ProjectedGradientDescent",
            {"eps": 0.3, "eps_step": 0.01, "max_iter": 40, "num_random_init": 1},
            eps=0.3,
        ),
        AttackSpec("DeepFool", "DeepFool", {"max_iter": 50, "nb_grads": 3, "batch_size": 128}),
        AttackSpec(
            "CW-L2",
            "CarliniL2Method",
            {"max_iter": 10 if quick else 50, "binary_search_steps": 3, "batch_size": 128},
        ),
        AttackSpec(
            "CW-Linf",
            "CarliniLInfMethod",
            {"max_iter": 10 if quick else 50, "batch_size": 128},
            eps=0.3,
        ),
    ]
    if quick:  # the smoke run keeps one of each family
        keep = {("FGSM", 0.3), ("R+FGSM", 0.3), ("PGD", 0.3), ("DeepFool", None)}
        specs = [s for s in specs if (s.name, s.eps) in keep]
    return specs


def classifier(model_path: Path, input_shape: tuple[int, ...], classes: int) -> Any:
    from art.estimators.classification import PyTorchClassifier

    from controller.models import load_model

    return PyTorchClassifier(
        model=load_model(model_path),
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=input_shape,
        nb_classes=classes,
        clip_values=(0.0, 1.0),
    )


def generate(
    spec: AttackSpec, clf: Any, model_path: Path, x: np.ndarray, cache: Path, seed: int = 0
) -> np.ndarray:
    """Adversarial versions of ``x`` (cached)."""
    digest = hashlib.sha1(Path(model_path).read_bytes() + x.tobytes()).hexdigest()[:10]
    path = cache / "attacks" / f"{spec.name}-{spec.key}-{digest}-{seed}.npy"
    if path.is_file():
        return np.load(path)
    import art.attacks.evasion as evasion

    cls = getattr(evasion, spec.art_class)
    quiet = {"verbose": False} if "verbose" in inspect.signature(cls.__init__).parameters else {}
    attack = cls(clf, **spec.params, **quiet)
    start = x
    if spec.random_step:
        rng = np.random.default_rng(seed)
        start = np.clip(x + spec.random_step * np.sign(rng.standard_normal(x.shape)), 0, 1)
        start = start.astype(np.float32)
    t0 = time.perf_counter()
    adv = attack.generate(x=start).astype(np.float32)
    print(f"  {spec.name} {spec.params}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, adv)
    return adv
