"""From admitted PKG_INs to PKG_OUT items: batch across jobs, score, split back.

A ``Scorer`` is what the core needs per model id: a batch of decoded inferences in,
one ``pb.PkgOutItem`` per item out. ``FusedScorer`` adapts the detector pipeline
(controller/detectors) to it.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from controller.core import InspectJob
from controller.metrics import ControllerMetrics
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger("openexample.controller")


class Scorer(Protocol):
    def score(
        self,
        inputs: np.ndarray,
        logits: np.ndarray | None,
        labels: np.ndarray,
        metrics: ControllerMetrics | None = None,
    ) -> list[pb.PkgOutItem]: ...


def score_jobs(
    scorer: Scorer, jobs: list[InspectJob], metrics: ControllerMetrics | None = None
) -> list[list[pb.PkgOutItem]]:
    """Score jobs of one model together; a detector failure answers UNKNOWN."""
    pkgs = [j.pkg for j in jobs]
    inputs = pkgs[0].inputs if len(pkgs) == 1 else np.concatenate([p.inputs for p in pkgs])
    logits = None
    if all(p.logits is not None for p in pkgs):
        logits = pkgs[0].logits if len(pkgs) == 1 else np.concatenate([p.logits for p in pkgs])
    labels = np.concatenate([p.labels for p in pkgs])
    try:
        items = scorer.score(inputs, logits, labels, metrics)
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
