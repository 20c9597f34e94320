"""Calibration on what an agent with privacy noise sends (openexample/privacy.py).

An agent with noise sends noised inputs and, by its ``logits`` mode, raw, no or noised
logits, with the label its model gave on the raw input. Detectors calibrated on such
batches keep their false-positive rate on such traffic: the calibration split and live
clean traffic are noised alike. ``openexample-controller train --privacy SPEC`` and
``python -m bench.privacy`` both go through ``sent_batch``. Detectors are still fitted on
clean training data (DeSVig's CGAN learns what digits look like); only the thresholds
(and DeSVig's distance scales, set in ``calibrate``) see the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from controller.detectors.base import Batch
from openexample.privacy import NO_NOISE, PrivacyNoise

SEED = 20181206  # calibration noise: fixed, so an artifact is rebuilt the same
# Noised copies of each calibration input: a 1% threshold sits in the scores' tail, where
# one draw of noise moved the measured test FPR between 0.6% and 1.5% (mnist5k, 1,000
# calibration inputs, epsilon 1024); more draws average the noise out of the threshold.
DRAWS = 5


def noise_for(
    spec: PrivacyNoise | str | None,
    input_shape: Sequence[int],
    input_range: tuple[float, float] = (0.0, 1.0),
) -> PrivacyNoise:
    """``spec`` (a spec string, None: no noise) with clip and centre fixed for inputs
    of ``input_shape``, as an agent with the same spec fixes them; ValueError when the
    spec does not read."""
    if spec is None:
        return NO_NOISE
    noise = spec if isinstance(spec, PrivacyNoise) else PrivacyNoise.parse(spec, input_range)
    return noise.resolved(tuple(input_shape))


def sent_batch(
    x: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    noise: PrivacyNoise,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
) -> Batch:
    """What the controller receives for inputs ``x`` from an agent with ``noise``: the
    inputs noised, the logits as its mode says (None for ``label``: detectors that read
    logits compute them with their model), and the labels the model gave on the raw
    inputs (``labels``, when the caller has them already)."""
    raw = np.asarray(predict(x), dtype=np.float32)
    if labels is None:
        labels = raw.argmax(axis=1).astype(np.int64)
    inputs = noise.apply(x, rng)
    logits: np.ndarray | None = raw
    if noise.logits == "label":
        logits = None
    elif noise.logits == "noised":
        logits = noise.noise_logits(raw, rng)
    return Batch(inputs, logits, np.asarray(labels, dtype=np.int64))


def calibration_batch(
    x: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    noise: PrivacyNoise,
    draws: int = DRAWS,
    seed: int = SEED,
) -> Batch:
    """The clean calibration batch for ``noise``: ``draws`` noised copies of ``x`` (one
    without noise), each as ``sent_batch`` makes it."""
    rng = np.random.default_rng(seed)
    raw = np.asarray(predict(x), dtype=np.float32)
    labels = raw.argmax(axis=1).astype(np.int64)
    if not noise.on:
        draws = 1
    parts = [sent_batch(x, lambda _: raw, noise, rng, labels) for _ in range(draws)]
    logits = None if parts[0].logits is None else np.concatenate([b.logits for b in parts])
    return Batch(
        np.concatenate([b.inputs for b in parts]), logits, np.concatenate([b.labels for b in parts])
    )
