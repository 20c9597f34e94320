"""Small numpy helpers the detectors share: input conversion, softmax, squeezing, pooling.

One definition each, imported from here (``hashing.to_uint8`` stays with the hashes: it is
the conversion their bit-exactness against ``imagehash`` is defined on).
"""

from __future__ import annotations

import numpy as np


def as_float(x: np.ndarray) -> np.ndarray:
    """Inputs as float32 in [0, 1]: uint8 images are divided by 255, anything else cast."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255)
    return np.asarray(x, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row max, so large logits are safe)."""
    z = np.asarray(logits, dtype=np.float64)
    # the ufuncs' reduce: what .max / .sum run, without their Python wrappers
    z = np.exp(z - np.maximum.reduce(z, axis=1, keepdims=True))
    z /= np.add.reduce(z, axis=1, keepdims=True)
    return z


def sigmoid_(v: np.ndarray) -> np.ndarray:
    """Logistic sigmoid of a float array, in place (``v`` is overwritten and returned)."""
    # 0.5 * tanh(v / 2) + 0.5: one transcendental, and no overflow warning for large |v|
    np.multiply(v, 0.5, out=v)
    np.tanh(v, out=v)
    np.multiply(v, 0.5, out=v)
    return np.add(v, 0.5, out=v)


def bit_depth(x: np.ndarray, bits: int = 1) -> np.ndarray:
    """Reduce [0, 1] images to ``bits`` bits per pixel: round(x * (2^b - 1)) / (2^b - 1)."""
    levels = np.float32(2**bits - 1)
    return (np.rint(np.asarray(x, np.float32) * levels) / levels).astype(np.float32)


def pool(x: np.ndarray, k: int) -> np.ndarray:
    """[N, C, H, W] -> [N, C * H/k * W/k]: k x k average pooling, flattened."""
    n, c, h, w = x.shape
    if k == 1:
        return x.reshape(n, c * h * w)
    return x.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5)).reshape(n, -1)
