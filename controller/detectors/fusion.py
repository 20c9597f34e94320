"""Several detectors, one verdict: an OR of per-detector thresholds at a shared FPR budget.

Each of the n detectors is calibrated at fpr x share_i on the same clean batch,
split-conformally (``Detector.calibrate``: the expected FPR of each on unseen clean data
exchangeable with the batch is at most fpr x share_i); the shares sum to 1 (default: even,
1 / n each), so by the union bound the fused expected false-positive rate on unseen clean
data stays at most fpr, while every detector keeps its own threshold (fusing by a max of
z-scores was measured to lose most of each one's strength). Uneven shares give more of the
budget to the detector that matters most (README "Adaptive attacks": the robust reference
model). The calibration batch must then hold at least (1 - a) / a items for the smallest
a = fpr x share_i (ValueError otherwise; n / fpr - 1 with even shares).

The fused score puts every detector on one scale, its normalised margin:

    m = (score - threshold) / (threshold - median clean score)

m = 0 is on the threshold, m = -1 is a typical clean input, m = +1 is as far past the
threshold as typical clean inputs sit below it. Fused score = max over detectors of m,
so ``fused >= 0`` exactly when some detector flags the item.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.detectors.base import Batch, Detector, Scores, conformal_rank


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
    corrected: int | None  # see Pipeline.evaluate: a label other than the claim
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


def _relabelled(
    dets: Sequence[Detector],
    per: tuple[Scores, ...],
    batch: Batch,
    flagged: np.ndarray,
    flags: np.ndarray,
) -> tuple[Scores, ...]:
    """``per`` with each purifier's label filled in (``Detector.relabel``) on the items
    the pipeline flagged and it did not: one more opinion for the corrected label and for
    ``on_adversarial: correct``'s agreement. Only flagged items pay for it."""
    out = list(per)
    for j, (d, s) in enumerate(zip(dets, per, strict=True)):
        todo = np.flatnonzero(flagged & ~flags[j])
        if s.corrected is None or todo.size == 0:
            continue
        labels = d.relabel(_subset(batch, todo))
        if labels is None:
            continue
        fixed = np.array(s.corrected, dtype=np.int64, copy=True)
        fixed[todo] = labels
        out[j] = Scores(s.scores, fixed)
    return tuple(out)


def _subset(batch: Batch, idx: np.ndarray) -> Batch:
    logits = None if batch.logits is None else np.asarray(batch.logits)[idx]
    acts = {k: np.asarray(v)[idx] for k, v in batch.activations.items()}
    return Batch(np.asarray(batch.inputs)[idx], logits, np.asarray(batch.labels)[idx], acts)


def _median(det: Detector) -> float | None:
    return det.meta.get("calibration", {}).get("median")


MIN_SCALE = 1e-9  # below it the spread is a tie, not a scale (see _scale)


def _scale(det: Detector) -> float:
    """threshold - median of clean scores; 1.0 when calibration did not record a spread,
    or recorded none to speak of: a score with an atom at its median (the robust model's
    0 wherever it agrees, at a loose FPR) puts the threshold one float above it, and
    dividing by 5e-324 made every flagged margin inf."""
    median = _median(det)
    if det.threshold is None or median is None or not det.threshold - median > MIN_SCALE:
        return 1.0
    return float(det.threshold - median)


SHARE_TOLERANCE = 1e-9  # how far from 1 the shares may sum


def check_shares(names: Sequence[str], shares: Sequence[float]) -> tuple[float, ...]:
    """``shares`` as floats, one per detector of ``names``, each positive and finite, the
    sum 1 within ``SHARE_TOLERANCE``; ValueError naming the detector (or the sum)
    otherwise."""
    shares = tuple(shares)
    if len(shares) != len(names):
        raise ValueError(
            f"fpr shares: {len(shares)} given for {len(names)} detectors ({', '.join(names)})"
        )
    out = []
    for name, share in zip(names, shares, strict=True):
        try:
            value = float(share)
        except (TypeError, ValueError):
            raise ValueError(f"fpr share of detector {name!r}: not a number: {share!r}") from None
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"fpr share of detector {name!r}: must be positive, got {share!r}")
        out.append(value)
    total = math.fsum(out)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        given = ", ".join(f"{n}={v:g}" for n, v in zip(names, out, strict=True))
        raise ValueError(f"fpr shares must sum to 1, got {total:.12g} ({given})")
    return tuple(out)


class Pipeline:
    def __init__(
        self,
        detectors: Sequence[Detector],
        fpr: float,
        shares: Sequence[float] | None = None,
    ) -> None:
        """``shares``: each detector's part of the ``fpr`` budget, in order (positive,
        summing to 1); None: even, 1 / n each."""
        if not detectors:
            raise ValueError("a pipeline needs at least one detector")
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {fpr}")
        self.detectors = list(detectors)
        self.fpr = fpr
        n = len(self.detectors)
        self.shares: tuple[float, ...] = (
            (1.0 / n,) * n if shares is None else check_shares(self.names, shares)
        )
        self.even = shares is None
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
        """The smallest per-detector target, fpr x min(share) (fpr / n with even shares):
        the one the calibration batch's size is checked against."""
        return self.fpr * min(self.shares)

    @property
    def detector_fprs(self) -> dict[str, float]:
        """Each detector's target, fpr x its share, by name (they sum to fpr)."""
        return {n: self.fpr * s for n, s in zip(self.names, self.shares, strict=True)}

    def calibrate(self, clean: Batch) -> dict[str, float]:
        """Calibrate every detector at fpr x its share on ``clean`` (split-conformal: the
        fused expected FPR on unseen clean data is at most fpr); returns the thresholds.
        ValueError before any is touched when ``clean`` is too small for the smallest
        share."""
        smallest = min(range(len(self.shares)), key=self.shares.__getitem__)
        try:  # too few for the smallest share: refuse before any threshold moves
            conformal_rank(len(clean), self.per_detector_fpr)
        except ValueError as exc:
            raise ValueError(f"detector {self.names[smallest]!r}: {exc}") from None
        out = {}
        for name, d, share in zip(self.names, self.detectors, self.shares, strict=True):
            out[name] = d.calibrate(clean, self.fpr * share)
            d.meta["fpr_share"] = share  # saved in the manifest: how the set was split
        return out

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
            per = _relabelled(dets, per, batch, flagged, flags)
            # On a flagged item: the first detector, in set order, that flagged it and
            # whose label differs from the claimed one (a "correction" equal to the claim
            # corrects nothing); where none did, the first whose label differs at all:
            # the robust model often disagrees below its own threshold on what MagNet
            # flags, and its label is the better one (README "The hardened set": right on
            # 0.91-0.99 of flagged L-inf and C&W L2/L-inf inputs, 0.82-0.99 taken from the
            # first detector that flagged). Filled last to first, so the first wins.
            claimed = np.asarray(batch.labels, np.int64)
            fixes = [
                (np.asarray(s.corrected, np.int64), f)
                for s, f in zip(per, flags, strict=True)
                if s.corrected is not None
            ]
            for fix, _ in reversed(fixes):
                corrected = np.where(flagged & (fix >= 0) & (fix != claimed), fix, corrected)
            for fix, f in reversed(fixes):
                corrected = np.where(f & (fix >= 0) & (fix != claimed), fix, corrected)
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
            "fpr_shares": dict(zip(self.names, self.shares, strict=True)),
            "detectors": {
                name: {
                    "threshold": d.threshold,
                    "target_fpr": self.fpr * share,
                    "fpr_share": share,
                    "fpr": float(f.mean()),
                }
                for name, d, share, f in zip(
                    self.names, self.detectors, self.shares, fused.flags, strict=True
                )
            },
            "fused_fpr": float(fused.flagged.mean()),
        }
