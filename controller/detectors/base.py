"""The detector interface: fit on clean data, calibrate to a false-positive rate, score.

Modelled on Alibi Detect's ``infer_threshold`` / ``predict`` pair, kept small so a new
detector is one module (or one package): subclass ``Detector``, set ``name`` and the
contract flags it needs (``needs_model``, ``needs_logits``, ``needs_activations``,
``can_purify``), implement ``score`` (and the ``_fit`` / ``config`` / ``arrays`` /
``_restore`` hooks if it learns anything), and declare it in the entry-point group
``openexample.detectors`` (``name = package.module:Class``; see
controller/detectors/__init__.py). Artifacts are folders with a JSON manifest and one
``.npz``: no pickle, so loading an artifact never runs code from it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import inspect
import json
import math
import os
import platform
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

ModelFn = Callable[[np.ndarray], np.ndarray]
"""A reference copy of the model: inputs [N, *shape] -> logits [N, C]."""

MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
FORMAT = 1
_VERSIONED = ("numpy", "scipy", "pillow", "imagehash", "torch", "openexample")


@dataclass(frozen=True, slots=True)
class Batch:
    """What PKG_IN carries, decoded, for one model."""

    inputs: np.ndarray  # [N, *input_shape] float32 (or uint8)
    logits: np.ndarray | None  # [N, C]
    labels: np.ndarray  # [N] int64, the label the model gave
    activations: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def make_batch(
    inputs: np.ndarray, model: ModelFn | None = None, *, logits: np.ndarray | None = None
) -> Batch:
    """A Batch for ``inputs`` with the model's logits and labels (argmax), for offline use."""
    if logits is None:
        if model is None:
            raise ValueError("make_batch needs a model or logits")
        logits = np.asarray(model(inputs), dtype=np.float32)
    return Batch(inputs, logits, np.asarray(logits).argmax(axis=1).astype(np.int64))


@dataclass(frozen=True, slots=True)
class Scores:
    scores: np.ndarray  # [N] float, higher = more adversarial
    corrected: np.ndarray | None  # [N] int64 label the detector would give, or None


class Detector(ABC):
    """Base class. ``threshold`` and ``fpr`` are set by ``calibrate``; ``meta`` holds what
    the manifest records (dataset, classes, input shape, calibration figures).

    The class attributes below are the detector's contract with the controller; a
    subclass sets those it needs, and callers read them instead of guessing."""

    name: ClassVar[str]
    """The registry and manifest name: equal to the detector's entry-point name."""

    needs_model: ClassVar[bool] = False
    """Scores need the controller's reference copy of the model (``self.model``): the
    controller attaches the configured ``reference_model``, or the model file recorded in
    the artifact's manifest, and refuses the artifact when there is neither."""

    fits_through_model: ClassVar[bool] = False
    """``fit`` needs the reference copy's torch module (``nets.module_of``: it trains
    through the model's gradients), which an ONNX reference model has not: training is
    refused up front for such a model (controller/training/train.py, ``check_model``)."""

    scores_through_model: ClassVar[bool] = False
    """``score`` needs the reference copy's torch module too: the controller refuses an
    ONNX ``reference_model`` for such a detector (controller/pipeline.py)."""

    needs_logits: ClassVar[bool] = False
    """Scores need the logits the agent sends (``Batch.logits``), unless ``self.model`` is
    attached, from which the detector computes them. PKG_IN may come without logits: the
    controller then leaves such a detector out for those items (controller/pipeline.py,
    ``FusedScorer``)."""

    needs_activations: ClassVar[bool] = False
    """Scores need the intermediate activations the agent attaches to PKG_IN
    (``Batch.activations``)."""

    can_purify: ClassVar[bool] = False
    """``score`` may give a corrected label (``Scores.corrected``): the label the input
    would get once the perturbation is taken out, for the agent to answer with."""

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.fpr: float | None = None
        self.meta: dict[str, Any] = {}
        self.model: ModelFn | None = None  # not saved: the controller re-attaches its copy

    # -- learning -------------------------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        model: ModelFn | None = None,
        dataset: str | None = None,
        class_names: list[str] | None = None,
    ) -> Self:
        """Learn from clean training data ``x`` [N, *shape] with true labels ``y`` [N]."""
        x, y = np.asarray(x), np.asarray(y, dtype=np.int64)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} items, y has {len(y)}")
        self.model = model
        if class_names:
            num_classes = len(class_names)
        else:  # the labels seen, or the model's logits where a few labels miss classes
            num_classes = int(y.max()) + 1 if len(y) else 0
            if model is not None and len(x):
                num_classes = max(num_classes, int(np.asarray(model(x[:1])).shape[-1]))
        self.meta.update(
            dataset=dataset,
            classes=list(class_names) if class_names else [str(i) for i in range(num_classes)],
            input_shape=[int(d) for d in x.shape[1:]],
            num_fit=len(x),
        )
        self._fit(x, y)
        return self

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Override to learn; ``self.model`` is set when a reference model was given."""

    @abstractmethod
    def score(self, batch: Batch) -> Scores:
        """Score every item of ``batch``: higher = more adversarial."""

    # -- threshold ------------------------------------------------------------------------
    def calibrate(self, clean: Batch, fpr: float) -> float:
        """Set ``threshold`` by split-conformal calibration (``conformal_threshold``): on
        clean inputs exchangeable with ``clean`` but never seen by it (the test split,
        live traffic from the same distribution), the expected share flagged is at most
        ``fpr``. ValueError when ``clean`` is too small for ``fpr`` (fewer than
        (1 - fpr) / fpr items).

        ``meta["calibration"]`` records the method, the rank used and the share of
        ``clean`` itself flagged (``measured_fpr``: just under ``fpr``, by about 1 / n).
        """
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {fpr}")
        s = np.asarray(self.score(clean).scores, dtype=np.float64)
        if s.size == 0 or not np.isfinite(s).all():
            raise ValueError("calibration needs a non-empty batch with finite scores")
        self.threshold = conformal_threshold(s, fpr, who=f"detector {self.name!r}")
        self.fpr = fpr
        self.meta["calibration"] = {
            "method": CALIBRATION,
            "n": int(s.size),
            "rank": conformal_rank(s.size, fpr),
            "target_fpr": fpr,
            "measured_fpr": float(np.mean(s >= self.threshold)),
            "median": float(np.median(s)),
            "quantiles": {str(q): float(np.quantile(s, q)) for q in (0.01, 0.5, 0.9, 0.99)},
        }
        return self.threshold

    def relabel(self, batch: Batch) -> np.ndarray | None:
        """Corrected labels [N] for items the fused pipeline flagged but this detector did
        not, or None when ``score``'s own labels stand. A purifier that computes its label
        only above its own threshold (to save time on clean traffic: DeSVig) gives it here,
        so that ``on_adversarial: correct`` can count it as a second opinion."""
        return None

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """scores >= threshold, as a bool array."""
        if self.threshold is None:
            raise RuntimeError(f"detector {self.name!r} is not calibrated")
        return np.asarray(scores) >= self.threshold

    # -- persistence ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON values) that rebuild this detector."""
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """Learned state as named numeric arrays."""
        return {}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Inverse of ``arrays``."""

    def save(self, path: str | Path) -> None:
        """Write the artifact folder: ``manifest.json`` + ``arrays.npz``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": self.config(),
            "threshold": self.threshold,
            "fpr": self.fpr,
            **self.meta,
            "versions": _versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        tmp = path / f".{ARRAYS}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **self.arrays())
        os.replace(tmp, path / ARRAYS)
        tmp = path / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path / MANIFEST)  # last: a manifest means a complete artifact

    @classmethod
    def unknown_settings(cls, config: Mapping[str, Any]) -> list[str]:
        """The keys of an artifact's ``config`` the constructor does not take (written by
        another version of the detector), sorted."""
        params = inspect.signature(cls.__init__).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        takes = {p.name for p in params if p.kind in kinds and p.name != "self"}
        return sorted(set(config) - takes)

    @classmethod
    def changed_defaults(cls, config: Mapping[str, Any]) -> list[str]:
        """The keys of an artifact's ``config`` whose value is not this version's default
        (constructor parameters with a default other than None), sorted: an artifact
        cached with defaults that have changed since (the robust model's epochs) is
        rebuilt rather than silently reused."""
        params = inspect.signature(cls.__init__).parameters
        changed = []
        for key, value in config.items():
            p = params.get(key)
            if p is None or p.default is inspect.Parameter.empty or p.default is None:
                continue
            if json.loads(json.dumps(p.default)) != json.loads(json.dumps(value)):
                changed.append(key)
        return sorted(changed)

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        """Read an artifact folder; on ``Detector`` itself, dispatch on the manifest's name."""
        path = Path(path)
        manifest = read_manifest(path)
        if cls is Detector:
            from controller.detectors import get  # the registry discovers plugins

            return get(manifest["name"]).load(path)
        if manifest.get("name") != cls.name:
            raise ValueError(f"{path} holds a {manifest.get('name')!r} detector, not {cls.name!r}")
        config = manifest.get("config", {})
        unknown = cls.unknown_settings(config)
        if unknown:  # written by another version of the detector: refused by name
            raise ValueError(
                f"{path}: this version's {cls.name} detector has no setting"
                f" {', '.join(unknown)}; retrain the artifact (openexample-controller train)"
            )
        det = cls(**config)
        with np.load(path / ARRAYS, allow_pickle=False) as z:
            det._restore({k: z[k] for k in z.files})
        det.threshold = manifest.get("threshold")
        det.fpr = manifest.get("fpr")
        skip = {"format", "name", "class", "config", "threshold", "fpr", "versions", "created"}
        det.meta = {k: v for k, v in manifest.items() if k not in skip}
        return det

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} threshold={self.threshold}>"


CALIBRATION = "split-conformal/1"
"""How ``Detector.calibrate`` sets thresholds; recorded in every manifest, so artifacts
calibrated otherwise (an older rule) are rebuilt by ``ensure_artifacts``."""


def conformal_rank(n: int, alpha: float) -> int:
    """The 1-based rank k = ceil((n + 1)(1 - alpha)) of the split-conformal threshold
    among ``n`` sorted calibration scores; ValueError when k > n (too few scores for
    ``alpha``: n must be at least (1 - alpha) / alpha)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {alpha}")
    # the 1e-9: (n + 1)(1 - alpha) computed in floats may land just above an integer
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k > n:
        need = math.ceil((1.0 - alpha) / alpha - 1e-9)
        raise ValueError(
            f"{n} clean calibration inputs are too few for a false-positive rate of"
            f" {alpha:g}: split-conformal calibration needs at least {need}; give more"
            " calibration data or a larger fpr (a set of k detectors calibrates each at"
            " fpr / k, or at fpr x its --fpr-shares share)"
        )
    return k


def conformal_threshold(scores: np.ndarray, alpha: float, *, who: str = "") -> float:
    """Split-conformal threshold (Vovk et al. 2005; Angelopoulos & Bates 2021, §1.1):
    just above the k-th smallest of the ``n`` clean calibration scores, k = ceil((n + 1)
    (1 - alpha)). With ``flag = score >= threshold`` an input is flagged when its score
    is above that k-th smallest; for a clean score S exchangeable with the calibration
    scores, P(S > s_(k)) <= 1 - k / (n + 1) <= alpha, ties included. The promise is on
    average over calibration sets; any one set's FPR on unseen data scatters around
    it by ~sqrt(alpha / n). ``who`` names the caller in the too-few-scores error."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    try:
        k = conformal_rank(s.size, alpha)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}" if who else str(exc)) from None
    return float(np.nextafter(s[k - 1], np.inf))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed manifest of an artifact folder, checked for a name and a known format."""
    file = Path(path) / MANIFEST
    manifest = json.loads(file.read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("name"), str):
        raise ValueError(f"{file}: not a detector manifest")
    if manifest.get("format", FORMAT) > FORMAT:
        raise ValueError(f"{file}: artifact format {manifest['format']} is newer than {FORMAT}")
    return manifest


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        if dist == "torch" and "torch" not in sys.modules:
            continue  # only record torch when this detector actually used it
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out
