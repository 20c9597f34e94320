"""Top-2 softmax margin on the logits the agent sends: model-agnostic, nothing to learn.

Minimal-perturbation attacks (DeepFool, C&W) stop just past the decision boundary, where
the two best classes are nearly tied; clean inputs are usually classified with a wide
margin. Score = -(p_top1 - p_top2), so a small margin scores high.

Up to ``SMALL`` items the rows are done in plain Python floats (the controller's batch-1
case): a dozen numpy calls on ten numbers cost more than the arithmetic. Same formulas,
float64; the sums may differ from numpy's pairwise ones in the last bit.
"""

from __future__ import annotations

import math

import numpy as np

from controller.detectors.arrays import softmax
from controller.detectors.base import Batch, Detector, Scores

SMALL = 4  # up to this many items, plain Python floats (see the module docstring)


def _small(logits: np.ndarray, labels: np.ndarray) -> Scores:
    scores, corrected = [], []
    for row, label in zip(np.asarray(logits, np.float64).tolist(), labels.tolist(), strict=True):
        top = max(row)
        p = [math.exp(v - top) for v in row]
        total = sum(p)
        p = [v / total for v in p]
        best = second = -math.inf  # partition's top two, ties included
        for v in p:
            if v > best:
                best, second = v, best
            elif v > second:
                second = v
        scores.append(-(best - second))
        if 0 <= label < len(p):
            p[label] = -1.0
        # argmax: the first of the largest, as numpy's
        corrected.append(max(range(len(p)), key=p.__getitem__))
    return Scores(np.asarray(scores, np.float64), np.asarray(corrected, np.int64))


class MarginDetector(Detector):
    name = "margin"
    can_purify = True  # corrected: the runner-up class
    needs_logits = True  # unless a reference model is attached (self.model)

    def score(self, batch: Batch) -> Scores:
        logits = batch.logits
        if logits is None:
            if self.model is None:
                raise ValueError("margin needs logits in the batch or fit(..., model=...)")
            logits = self.model(batch.inputs)
        logits = np.asarray(logits)
        labels = np.asarray(batch.labels, dtype=np.int64)
        if len(labels) <= SMALL and logits.ndim == 2 and logits.shape[1] >= 2:
            return _small(logits, labels)
        p = softmax(logits)
        if p.shape[1] < 2:
            raise ValueError("margin needs at least two classes")
        top2 = np.partition(p, -2, axis=1)  # [..., second best, best]
        scores = -(top2[:, -1] - top2[:, -2])
        # corrected: the most likely class other than the one the model claimed
        rows = np.arange(len(p))
        valid = (labels >= 0) & (labels < p.shape[1])
        if valid.all():
            p[rows, labels] = -1.0  # p is ours: softmax made it
        else:
            p[rows[valid], labels[valid]] = -1.0
        return Scores(scores, p.argmax(axis=1).astype(np.int64, copy=False))
