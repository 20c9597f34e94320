"""From admitted PKG_INs to PKG_OUT items: batch across jobs, score, split back.

A ``Scorer`` is what the core needs per model id: a batch of decoded inferences in,
one ``pb.PkgOutItem`` per item out. ``FusedScorer`` adapts the detector pipeline
(controller/detectors) to it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from controller.config import Config, ConfigError
from controller.core import InspectJob
from controller.detectors.base import Batch, Detector
from controller.detectors.fusion import Pipeline
from controller.metrics import ControllerMetrics
from controller.reference_model import model_fn
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger("openexample.controller")


class Scorer(Protocol):
    def score(
        self,
        inputs: np.ndarray,
        logits: np.ndarray | None,
        labels: np.ndarray,
        metrics: ControllerMetrics | None = None,
        detector_s: list[tuple[str, float]] | None = None,
    ) -> list[pb.PkgOutItem]: ...


def score_jobs(
    scorer: Scorer,
    jobs: list[InspectJob],
    metrics: ControllerMetrics | None = None,
    detector_s: list[tuple[str, float]] | None = None,
) -> list[list[pb.PkgOutItem]]:
    """Score jobs of one model together; a detector failure answers UNKNOWN.

    ``detector_s``, when given, gets (detector name, seconds) for each detector that
    ran (PKG_OUT's ``Timings.detectors``).
    """
    pkgs = [j.pkg for j in jobs]
    inputs = pkgs[0].inputs if len(pkgs) == 1 else np.concatenate([p.inputs for p in pkgs])
    logits = None
    if all(p.logits is not None for p in pkgs):
        logits = pkgs[0].logits if len(pkgs) == 1 else np.concatenate([p.logits for p in pkgs])
    labels = np.concatenate([p.labels for p in pkgs])
    try:
        items = scorer.score(inputs, logits, labels, metrics, detector_s)
    except Exception:
        log.exception("detector pipeline failed on %d items", len(labels))
        fail = pb.PkgOutItem(
            verdict=pb.VERDICT_UNKNOWN,
            action=pb.VERDICT_ACTION_RELEASE,
            unknown_reason=pb.UNKNOWN_REASON_DETECTOR_FAILED,
        )
        items = [fail] * len(labels)
    out, at = [], 0
    for p in pkgs:
        out.append(items[at : at + len(p.items)])
        at += len(p.items)
    return out


class FusedScorer:
    """The detector pipeline of one model as a Scorer (OR of per-detector thresholds)."""

    def __init__(self, model_id: str, pipeline: Pipeline) -> None:
        self.model_id = model_id
        self.pipeline = pipeline
        self.names = [d.name for d in pipeline.detectors]
        self.thresholds = [float(d.threshold) for d in pipeline.detectors]  # type: ignore[arg-type]

    def score(
        self,
        inputs: np.ndarray,
        logits: np.ndarray | None,
        labels: np.ndarray,
        metrics: ControllerMetrics | None = None,
        detector_s: list[tuple[str, float]] | None = None,
    ) -> list[pb.PkgOutItem]:
        if metrics is None and detector_s is None:
            fused = self.pipeline.evaluate(Batch(inputs, logits, labels))
        else:
            timings: list[float] = []
            t0 = time.perf_counter()
            fused = self.pipeline.evaluate(Batch(inputs, logits, labels), timings)
            timings.append(time.perf_counter() - t0)  # the whole pipeline, last
            names = self.pipeline.names
            if detector_s is not None:  # zip stops before the whole pipeline's time
                detector_s.extend(zip(names, timings, strict=False))
            if metrics is not None:
                metrics.observe_detectors(self.model_id, names, timings, fused.margins, fused.flags)
        # Plain lists: indexing numpy scalars per item costs more than the conversion.
        flagged = fused.flagged.tolist()
        score = fused.score.tolist()
        corrected = fused.corrected.tolist()
        per = fused.scores.tolist()
        flags = fused.flags.tolist()
        per_fix = [
            None if s.corrected is None else s.corrected.tolist() for s in fused.per_detector
        ]
        verdicts = (pb.VERDICT_BENIGN, pb.VERDICT_ADVERSARIAL)
        actions = (pb.VERDICT_ACTION_RELEASE, pb.VERDICT_ACTION_DROP)
        evidence = [
            (name, threshold, per[j], flags[j], per_fix[j])
            for j, (name, threshold) in enumerate(zip(self.names, self.thresholds, strict=True))
        ]
        items = []
        for i, f in enumerate(flagged):
            item = pb.PkgOutItem(
                verdict=verdicts[f],
                action=actions[f],
                score=score[i],
                threshold=0.0,  # the fused score is a margin: >= 0 means flagged
            )
            if corrected[i] >= 0:
                item.corrected_label = corrected[i]
            add = item.evidence.add
            for name, threshold, det_score, det_flag, det_fix in evidence:
                if det_fix is None:
                    add(detector=name, score=det_score[i], threshold=threshold, flagged=det_flag[i])
                else:
                    add(
                        detector=name,
                        score=det_score[i],
                        threshold=threshold,
                        flagged=det_flag[i],
                        corrected_label=det_fix[i],
                    )
            items.append(item)
        return items


def load_scorers(cfg: Config) -> dict[str, Scorer]:
    """One FusedScorer per configured model id, from artifact folders.

    Raises ConfigError naming the model and path when an artifact cannot be used.
    """
    scorers: dict[str, Scorer] = {}
    for model_id, mcfg in cfg.models.items():
        if not mcfg.detectors:
            continue
        dets = []
        for i, path in enumerate(mcfg.detectors):
            where = f"models.{model_id}.detectors[{i}]"
            try:
                det = Detector.load(Path(path))
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(
                    f"{where}: cannot load detector artifact {path!r}: {exc}"
                ) from None
            if det.threshold is None:
                raise ConfigError(f"{where}: artifact {path!r} is not calibrated")
            # the config's reference model, else (for detectors that cannot score without
            # one) the model file the artifact was trained with, recorded in its manifest
            ref = mcfg.reference_model
            if not ref and det.needs_model:
                ref = det.meta.get("model")
                if not ref:
                    raise ConfigError(
                        f"{where}: {det.name} needs models.{model_id}.reference_model"
                    )
            if det.model is None and ref:
                try:
                    det.model = model_fn(ref)
                except (OSError, RuntimeError, ValueError) as exc:
                    raise ConfigError(f"{where}: cannot load model {ref!r}: {exc}") from None
            dets.append(det)
        want = mcfg.fpr / len(dets)
        for d in dets:
            if d.fpr is not None and abs(d.fpr - want) > 1e-9:
                log.warning(
                    "model %s: detector %s was calibrated at fpr %.4g, the fused target wants"
                    " %.4g per detector: retrain them together (openexample-controller train"
                    " %s)",
                    model_id,
                    d.name,
                    d.fpr,
                    want,
                    ",".join(x.name for x in dets),
                )
        scorers[model_id] = FusedScorer(model_id, Pipeline(dets, mcfg.fpr))
    return scorers
