"""Content digests both planes compare: ``sha256:<hex>`` of a model file or of arrays.

An agent declares its model file's digest in FEATURES (``model_digest``); detector
artifacts record the digest of the model and of the data they were trained with, so the
controller can say when an agent runs another model than its detectors were made for.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    """``sha256:<hex>`` of arrays: their dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()
