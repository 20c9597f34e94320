"""Score arrays with trained detector artifacts, without a controller or an agent.

For notebooks, batch jobs and audits (Alibi Detect's ``load_detector`` / ``predict``)::

    from controller.offline import load_detectors

    dets = load_detectors(["var/artifacts/mnist/desvig", "var/artifacts/mnist/margin"])
    p = dets.predict(x, logits=model_logits)     # or load_detectors(..., model="model.pt")
    p.flagged, p.score, p.corrected, p.scores["desvig"]

The artifacts are loaded and checked exactly as ``serve`` does (``pipeline.load_scorers``:
calibrated, trained for the same inputs and classes, the reference model attached where a
detector needs one), and the verdicts are the daemon's: an OR of each detector's calibrated
threshold (controller/detectors/fusion.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controller.config import Config, ConfigError, ModelConfig
from controller.detectors.base import Batch
from controller.detectors.fusion import Pipeline


@dataclass(frozen=True)
class Prediction:
    """What the pipeline says of N inputs."""

    flagged: np.ndarray  # [N] bool: some detector is over its threshold
    score: np.ndarray  # [N] fused normalised margin: >= 0 exactly when flagged
    corrected: np.ndarray  # [N] int64: the label without the perturbation, -1 = none
    labels: np.ndarray  # [N] int64: the labels that were checked (the model's claims)
    scores: dict[str, np.ndarray]  # per detector: its raw scores
    flags: dict[str, np.ndarray]  # per detector: over its own threshold


class DetectorSet:
    """Trained detectors fused as the controller fuses them."""

    def __init__(self, pipeline: Pipeline, names: list[str]) -> None:
        from controller.pipeline import trained_for  # loads torch: only when used

        self.pipeline = pipeline
        self.names = names
        want = trained_for(pipeline.detectors)
        self.input_shape = want.input_shape if want else ()  # (): not recorded, not checked
        self.classes = want.classes if want else 0

    @property
    def thresholds(self) -> dict[str, float]:
        dets = self.pipeline.detectors
        return {n: float(d.threshold or 0.0) for n, d in zip(self.names, dets, strict=True)}

    def predict(
        self,
        x: np.ndarray,
        logits: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> Prediction:
        """Score ``x`` [N, *input_shape]. ``logits`` [N, classes]: what the protected model
        gave (needed by detectors that read them, unless a reference model was loaded);
        ``labels``: the labels to check, default the logits' argmax."""
        x = np.asarray(x)
        if self.input_shape and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"inputs of shape {x.shape[1:]}, the detectors want {self.input_shape}"
            )
        if logits is None:
            model = next((d.model for d in self.pipeline.detectors if d.model is not None), None)
            if model is None:
                raise ValueError("predict needs logits, or load_detectors(..., model=...)")
            logits = model(x)
        logits = np.asarray(logits, np.float32)
        if logits.ndim != 2 or logits.shape != (len(x), self.classes or logits.shape[1]):
            raise ValueError(f"logits of shape {logits.shape} for {len(x)} inputs")
        if labels is None:
            labels = logits.argmax(axis=1)
        labels = np.asarray(labels, np.int64)
        fused = self.pipeline.evaluate(Batch(x, logits, labels))
        return Prediction(
            flagged=fused.flagged,
            score=fused.score,
            corrected=fused.corrected,
            labels=labels,
            scores={n: fused.scores[j] for j, n in enumerate(self.names)},
            flags={n: fused.flags[j] for j, n in enumerate(self.names)},
        )


def load_detectors(
    paths: Sequence[str | Path],
    *,
    fpr: float = 0.01,
    model: str | Path | Callable[[np.ndarray], np.ndarray] | None = None,
) -> DetectorSet:
    """Load artifact folders (made by ``openexample-controller train``) as one fused set.

    ``fpr``: the fused target they were calibrated for (a mismatch is logged, as by the
    daemon); ``model``: a TorchScript or ONNX file, or a function from inputs to logits,
    used by detectors that need the model and by ``predict`` when no logits are given.
    Raises ConfigError naming the artifact that cannot be used.
    """
    from controller.pipeline import load_scorers  # loads torch: only when asked

    if not paths:
        raise ConfigError("load_detectors: no artifact paths")
    ref = "" if model is None or callable(model) else str(model)
    spec = ModelConfig(detectors=tuple(str(p) for p in paths), fpr=fpr, reference_model=ref)
    scorer = load_scorers(Config(models={"offline": spec}))["offline"]
    pipeline = scorer.pipeline  # type: ignore[attr-defined]
    if callable(model):
        for d in pipeline.detectors:
            if d.model is None:
                d.model = model
    return DetectorSet(pipeline, list(scorer.metric_names))  # type: ignore[attr-defined]
