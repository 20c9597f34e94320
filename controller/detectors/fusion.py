"""Several detectors, one verdict: an OR of per-detector thresholds at a shared FPR budget.

Each of the n detectors is calibrated at fpr / n on the same clean batch, split-conformally
(``Detector.calibrate``: the expected FPR of each on unseen clean data exchangeable with the
batch is at most fpr / n), so by the union bound the fused expected false-positive rate on
unseen clean data stays at most fpr, while every detector keeps its own threshold (fusing
by a max of z-scores was measured to lose most of each one's strength). The calibration
batch must then hold at least n / fpr - 1 items (ValueError otherwise).

The fused score puts every detector on one scale, its normalised margin:

    m = (score - threshold) / (threshold - median clean score)

m = 0 is on the threshold, m = -1 is a typical clean input, m = +1 is as far past the
threshold as typical clean inputs sit below it. Fused score = max over detectors of m,
so ``fused >= 0`` exactly when some detector flags the item.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.detectors.base import Batch, Detector, Scores


@dataclass(frozen=True, slots=True)
class Evidence:
    detector: str
    score: float
    threshold: float
    flagged: bool
    corrected: int | None


@dataclass(frozen=True, slots=True)
class Decision:
    flagged: bool  # flagged by any detector
    score: float  # fused normalised margin, >= 0 iff flagged
    label: int  # the label the model gave
    corrected: int | None  # from the first flagged detector that offers one
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True, slots=True)
class Fused:
    """Vectorised result for a batch: what ``decide`` turns into Decisions."""

    flagged: np.ndarray  # [N] bool
    score: np.ndarray  # [N] float
    corrected: np.ndarray  # [N] int64, -1 = none
    per_detector: tuple[Scores, ...]
    flags: np.ndarray  # [D, N] bool
    margins: np.ndarray  # [D, N] normalised margins (see module doc)
    scores: np.ndarray  # [D, N] float64: each detector's scores, stacked


def _median(det: Detector) -> float | None:
    return det.meta.get("calibration", {}).get("median")


def _scale(det: Detector) -> float:
    """threshold - median of clean scores; 1.0 when calibration did not record a spread."""
    median = _median(det)
    if det.threshold is None or median is None or not det.threshold > median:
        return 1.0
    return float(det.threshold - median)


class Pipeline:
    def __init__(self, detectors: Sequence[Detector], fpr: float) -> None:
        if not detectors:
            raise ValueError("a pipeline needs at least one detector")
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {fpr}")
        self.detectors = list(detectors)
        self.fpr = fpr
        self._bounds_key: tuple[object, ...] | None = None
        self._bounds_cache = np.empty((0, 2))

    @property
    def names(self) -> list[str]:
        """Detector names, with ``#2``, ``#3``... on repeats so report keys stay distinct."""
        seen: dict[str, int] = {}
        out = []
        for d in self.detectors:
            seen[d.name] = seen.get(d.name, 0) + 1
            out.append(d.name if seen[d.name] == 1 else f"{d.name}#{seen[d.name]}")
        return out

    def _bounds(self) -> np.ndarray:
        """[D, 2] (threshold, scale) per detector; rebuilt only when a calibration changed
        (threshold or median), not per scored batch."""
        key = tuple((d.threshold, _median(d)) for d in self.detectors)
        if key != self._bounds_key:
            self._bounds_cache = np.array(
                [[d.threshold, _scale(d)] for d in self.detectors], dtype=np.float64
            )
            self._bounds_key = key
        return self._bounds_cache

    @property
    def per_detector_fpr(self) -> float:
        return self.fpr / len(self.detectors)

    def calibrate(self, clean: Batch) -> dict[str, float]:
        """Calibrate every detector at fpr / n on ``clean`` (split-conformal: the fused
        expected FPR on unseen clean data is at most fpr); returns the thresholds."""
        fpr = self.per_detector_fpr
        return {n: d.calibrate(clean, fpr) for n, d in zip(self.names, self.detectors, strict=True)}

    def evaluate(self, batch: Batch, timings: list[float] | None = None) -> Fused:
        """Score ``batch`` with every detector; ``timings`` (optional) gets the seconds
        each detector took, in order (for metrics)."""
        if timings is None:
            per = tuple(d.score(batch) for d in self.detectors)
        else:
            scored = []
            for d in self.detectors:
                t0 = time.perf_counter()
                scored.append(d.score(batch))
                timings.append(time.perf_counter() - t0)
            per = tuple(scored)
        dets = self.detectors
        n, k = len(batch), len(dets)
        scores = np.empty((k, n), np.float64)
        flags = np.empty((k, n), bool)
        for j, (d, s) in enumerate(zip(dets, per, strict=True)):
            scores[j] = s.scores
            flags[j] = d.flag(s.scores)
        # [D, 1] columns: the same element-wise arithmetic as one row at a time
        bounds = self._bounds()
        margins = np.subtract(scores, bounds[:, :1])
        margins /= bounds[:, 1:]
        flagged = np.logical_or.reduce(flags, axis=0)
        corrected = np.full(n, -1, dtype=np.int64)
        if flagged.any():
            # fill from the last detector to the first, so the first flagged one wins
            for s, f in zip(reversed(per), reversed(flags), strict=True):
                if s.corrected is not None:
                    corrected = np.where(f, s.corrected, corrected)
        fused_score = np.maximum.reduce(margins, axis=0)
        return Fused(flagged, fused_score, corrected, per, flags, margins, scores)

    def decide(self, batch: Batch) -> list[Decision]:
        """One Decision per item, with every detector's evidence."""
        fused = self.evaluate(batch)
        names = self.names
        thresholds = [float(d.threshold or 0.0) for d in self.detectors]  # set: evaluate checked
        scores = fused.scores.tolist()
        fixes = [None if s.corrected is None else s.corrected.tolist() for s in fused.per_detector]
        flags = fused.flags.tolist()
        out = []
        for i, label in enumerate(np.asarray(batch.labels).tolist()):
            evidence = tuple(
                Evidence(
                    names[j],
                    scores[j][i],
                    thresholds[j],
                    flags[j][i],
                    None if fixes[j] is None else fixes[j][i],
                )
                for j in range(len(names))
            )
            c = int(fused.corrected[i])
            out.append(
                Decision(
                    bool(fused.flagged[i]),
                    float(fused.score[i]),
                    int(label),
                    c if c >= 0 else None,
                    evidence,
                )
            )
        return out

    def calibration_report(self, clean_batch: Batch) -> dict[str, Any]:
        """Measured false-positive rates on clean inputs, per detector and fused."""
        fused = self.evaluate(clean_batch)
        return {
            "n": len(clean_batch),
            "target_fpr": self.fpr,
            "per_detector_target_fpr": self.per_detector_fpr,
            "detectors": {
                name: {"threshold": d.threshold, "fpr": float(f.mean())}
                for name, d, f in zip(self.names, self.detectors, fused.flags, strict=True)
            },
            "fused_fpr": float(fused.flagged.mean()),
        }
