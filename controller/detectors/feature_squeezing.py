"""Feature squeezing (Xu, Evans & Qi, NDSS 2018), the MNIST configuration.

Squeeze the input (1-bit colour depth; 2x2 median smoothing), run the model on each
squeezed version and compare its softmax with the softmax on the input:

    score = max over squeezers of || softmax(f(x)) - softmax(f(squeeze(x))) ||_1

An adversarial perturbation tuned against f rarely survives squeezing, so the prediction
moves; clean inputs barely change. It needs the model itself: ``fit(..., model=...)``,
and in the controller the reference model of the config (``reference_model``) or, when
that is not set, the model file the artifact was trained with (its manifest's ``model``,
see controller/pipeline.py ``load_scorers``). The logits the agent sent stand for f(x)
when the batch carries them, so a batch costs one model call on the squeezed inputs.

The median filter is scipy.ndimage.median_filter(size=2, mode="reflect") (the paper's
code) written out: for an even window scipy takes the window's upper median and anchors
it at the bottom-right pixel, with a reflected first row and column; the upper median of
four values is the second largest, a few elementwise max / min.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from controller.detectors.arrays import as_float, bit_depth, softmax
from controller.detectors.base import Batch, Detector, Scores

SQUEEZERS = ("bit_depth_1", "median_2x2")


def median_2x2(x: np.ndarray) -> np.ndarray:
    """scipy.ndimage.median_filter(x, size=(1, 1, 2, 2), mode="reflect") on [N, C, H, W]."""
    x = np.asarray(x, np.float32)
    p = np.concatenate([x[:, :, :1], x], axis=2)  # reflect: row -1 is row 0
    p = np.concatenate([p[:, :, :, :1], p], axis=3)
    a, b = p[:, :, :-1, :-1], p[:, :, :-1, 1:]  # the window: (i-1, j-1) .. (i, j)
    c, d = p[:, :, 1:, :-1], p[:, :, 1:, 1:]
    hi1, lo1 = np.maximum(a, b), np.minimum(a, b)
    hi2, lo2 = np.maximum(c, d), np.minimum(c, d)
    return np.maximum(np.minimum(hi1, hi2), np.maximum(lo1, lo2))  # second largest of four


_SQUEEZE = {"bit_depth_1": bit_depth, "median_2x2": median_2x2}


class FeatureSqueezingDetector(Detector):
    name = "feature_squeezing"
    needs_model = True  # the controller re-attaches the reference model (pipeline.py)

    def __init__(self, squeezers: list[str] | tuple[str, ...] = SQUEEZERS) -> None:
        super().__init__()
        unknown = [s for s in squeezers if s not in _SQUEEZE]
        if unknown or not squeezers:
            raise ValueError(f"squeezers must be a non-empty subset of {SQUEEZERS}: {unknown}")
        self.squeezers = list(squeezers)

    def config(self) -> dict[str, Any]:
        return {"squeezers": self.squeezers}

    def squeezed(self, x: np.ndarray) -> np.ndarray:
        """Every squeezed version of ``x``, stacked: [S * N, ...] in squeezer order."""
        return np.concatenate([_SQUEEZE[s](x) for s in self.squeezers])

    def score(self, batch: Batch) -> Scores:
        if self.model is None:
            raise ValueError(
                "feature_squeezing needs the model: fit(..., model=...), or a reference_model"
                " in the controller config"
            )
        x = as_float(batch.inputs)
        n = len(x)
        if batch.logits is not None:
            p = softmax(batch.logits)
            logits = self.model(self.squeezed(x))
        else:
            logits = self.model(np.concatenate([x, self.squeezed(x)]))
            p, logits = softmax(logits[:n]), logits[n:]
        q = softmax(logits).reshape(len(self.squeezers), n, -1)
        l1 = np.abs(q - p[None]).sum(axis=2)  # [S, N]
        return Scores(l1.max(axis=0), None)
