"""Top-2 softmax margin on the logits the agent sends: model-agnostic, nothing to learn.

Minimal-perturbation attacks (DeepFool, C&W) stop just past the decision boundary, where
the two best classes are nearly tied; clean inputs are usually classified with a wide
margin. Score = -(p_top1 - p_top2), so a small margin scores high.
"""

from __future__ import annotations

import numpy as np

from controller.detectors.arrays import softmax
from controller.detectors.base import Batch, Detector, Scores


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
        p = softmax(logits)
        if p.shape[1] < 2:
            raise ValueError("margin needs at least two classes")
        top2 = np.partition(p, -2, axis=1)  # [..., second best, best]
        scores = -(top2[:, -1] - top2[:, -2])
        # corrected: the most likely class other than the one the model claimed
        labels = np.asarray(batch.labels, dtype=np.int64)
        rows = np.arange(len(p))
        valid = (labels >= 0) & (labels < p.shape[1])
        if valid.all():
            p[rows, labels] = -1.0  # p is ours: softmax made it
        else:
            p[rows[valid], labels[valid]] = -1.0
        return Scores(scores, p.argmax(axis=1).astype(np.int64, copy=False))
