"""Perceptual keys of inputs, and an index that finds near-copies of known attacks.

An RT entry keyed by the exact fingerprint misses an attack re-sent with one pixel
changed, re-encoded, or lightly noised: each is a new input that pays the round trip
again (and may be released by a standalone fail mode). ADVERSARIAL entries therefore
also carry a 64-bit difference hash of their input (``near_key``) and the 8x9 thumbnail
it is computed from (``near_sketch``), and agents refuse an input of the same model and
label whose key is within ``radius`` bits of one AND whose thumbnail is within
``SKETCH_TOLERANCE`` of its thumbnail (max difference, in units of the image's largest
value).

Why both: clean images of one class are alike at 8x9, so a key alone would make every
false positive refuse its look-alikes. A one-off measurement on mnist5k's 1,000 test
images (a script, not a repo command) found 51% of them with a same-label clean neighbour
within 4 key bits; those pairs' thumbnails differed by 0.085 at least (0.16 at the 1st
percentile), while re-perturbed FGSM copies stayed within 0.06 (noise sigma 0.05), 0.092
(one pixel flipped) and 1e-8 (8-bit re-quantised). ``tests/test_near_copy.py`` checks the
consequence: under 2% of look-alike key pairs match with their thumbnails.

The key: the input averaged over its channels, area-resized to 8 rows x 9 columns,
one bit per horizontal neighbour pair (brighter to the right or not): Krawetz's dHash
with a box filter instead of Lanczos, computed the same way by the controller and the
agents (``python -m bench.near_copy`` measures what it catches and refuses wrongly).

:class:`NearIndex` finds keys within the radius without scanning: the 64 bits are cut
into ``radius + 1`` chunks, and by the pigeonhole principle a key within ``radius`` of
another equals it on at least one chunk (multi-index hashing, Norouzi et al. 2012).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from functools import lru_cache
from itertools import pairwise

import numpy as np

ROWS, COLS = 8, 9  # 8 x 8 horizontal differences: 64 bits
DEFAULT_RADIUS = 4
MAX_RADIUS = 15
# A key with fewer set (or unset) bits than this says little about its image: a flat or
# near-flat input (a blank frame) has key 0, and every other flat input would be its
# near-copy. Such keys are neither indexed nor looked up: the exact fingerprint decides.
MIN_INFORMATIVE_BITS = 8
_RELATIVE_TOLERANCE = 1e-5
SKETCH_TOLERANCE = 0.1  # thumbnail max difference, relative to the image's largest value
SKETCH_BYTES = ROWS * COLS * 2  # float16, little-endian


@lru_cache(maxsize=32)
def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights averaging each output cell's span of the input."""
    m = np.zeros((n_out, n_in))
    step = n_in / n_out
    for i in range(n_out):
        lo, hi = i * step, (i + 1) * step
        for j in range(int(lo), min(n_in, int(np.ceil(hi)))):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    m /= m.sum(axis=1, keepdims=True)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=32)
def _operators(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [8, h], columns [w, 9]) in float32: the area resize as two products."""
    rows = _area_matrix(ROWS, h).astype(np.float32)
    cols = np.ascontiguousarray(_area_matrix(COLS, w).T.astype(np.float32))
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def perceptual(x: np.ndarray) -> tuple[int, bytes]:
    """The 64-bit key and the 8x9 thumbnail (float16 bytes, scaled by the image's
    largest absolute value) of one input (``[..., H, W]``: leading axes are averaged)."""
    a = np.asarray(x)
    if a.ndim < 2 or a.shape[-1] < 2 or a.shape[-2] < 1:
        raise ValueError(f"a perceptual key needs an image ([..., H, W]), got shape {a.shape}")
    if a.ndim > 2:
        a = a.reshape(-1, a.shape[-2], a.shape[-1])
        a = a[0] if a.shape[0] == 1 else a.mean(axis=0, dtype=np.float32)
    rows, cols = _operators(a.shape[0], a.shape[1])
    a = a.astype(np.float32, copy=False)
    scale = float(np.abs(a).max())
    px = rows @ a @ cols
    if scale > 0:
        px /= scale
    # Rounding leaves flat regions a few 1e-8 of "difference": a dead zone keeps their
    # bits 0, so a flat image's key is 0 whatever its level, not rounding noise.
    bits = (px[:, 1:] - px[:, :-1]) > _RELATIVE_TOLERANCE
    key = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return key, px.astype("<f2").tobytes()


def dhash64(x: np.ndarray) -> int:
    """The 64-bit perceptual key of one input (see :func:`perceptual`)."""
    return perceptual(x)[0]


def sketch_array(sketch: bytes, *, check: bool = True) -> np.ndarray | None:
    """A thumbnail's float16 values, a view of ``sketch`` (None when it is not one;
    ``check``: also refuse NaN and infinity, for thumbnails that came from a peer)."""
    if len(sketch) != SKETCH_BYTES:
        return None
    arr = np.frombuffer(sketch, "<f2")
    return arr if not check or np.isfinite(arr).all() else None


class NearIndex:
    """Keys by (model, label), found within ``radius`` bits. Values are what the
    caller keys its RT with; at most ``max_entries`` are kept (oldest out first)."""

    def __init__(self, radius: int = DEFAULT_RADIUS, max_entries: int = 100_000) -> None:
        if not 0 <= radius <= MAX_RADIUS:
            raise ValueError(f"radius: 0..{MAX_RADIUS}, got {radius}")
        self.radius = radius
        self.max_entries = max_entries
        chunks = radius + 1
        edges = [round(64 * k / chunks) for k in range(chunks + 1)]
        # (shift, mask) of each chunk
        self._chunks = [(64 - hi, (1 << (hi - lo)) - 1) for lo, hi in pairwise(edges)]
        # value -> (model, label, key, thumbnail as float16)
        self._keys: dict[Hashable, tuple[str, int, int, np.ndarray]] = {}
        self._buckets: dict[tuple, set[Hashable]] = {}
        self._per_label: Counter[tuple[str, int]] = Counter()

    def __len__(self) -> int:
        return len(self._keys)

    def has(self, model_id: str, label: int) -> bool:
        """Whether any key is held for (model, label): the caller computes a key only then."""
        return self._per_label[(model_id, label)] > 0

    @staticmethod
    def informative(key: int) -> bool:
        """Whether ``key`` has enough set and unset bits to stand for its image."""
        return MIN_INFORMATIVE_BITS <= key.bit_count() <= 64 - MIN_INFORMATIVE_BITS

    def add(self, model_id: str, label: int, key: int, sketch: bytes, value: Hashable) -> None:
        """Index ``key`` and its thumbnail for ``value`` (not kept: a key that is not
        :meth:`informative`, or a thumbnail that is not one)."""
        if value in self._keys:
            self.remove(value)
        thumb = sketch_array(sketch)
        if thumb is None or not self.informative(key):
            return
        while len(self._keys) >= self.max_entries:
            self.remove(next(iter(self._keys)))
        self._keys[value] = (model_id, label, key, thumb)
        self._per_label[(model_id, label)] += 1
        for j, (shift, mask) in enumerate(self._chunks):
            self._buckets.setdefault((model_id, label, j, (key >> shift) & mask), set()).add(value)

    def remove(self, value: Hashable) -> None:
        held = self._keys.pop(value, None)
        if held is None:
            return
        model_id, label, key, _ = held
        self._per_label[(model_id, label)] -= 1
        for j, (shift, mask) in enumerate(self._chunks):
            b = (model_id, label, j, (key >> shift) & mask)
            bucket = self._buckets.get(b)
            if bucket is not None:
                bucket.discard(value)
                if not bucket:
                    del self._buckets[b]

    def clear(self, model_id: str | None = None) -> None:
        """Forget every key, or those of ``model_id``."""
        for value in [v for v, held in self._keys.items() if model_id in (None, held[0])]:
            self.remove(value)

    def find(
        self, model_id: str, label: int, key: int, sketch: bytes
    ) -> tuple[Hashable, int] | None:
        """The closest held value within the radius whose thumbnail is within
        ``SKETCH_TOLERANCE``, and its key distance; None if none (always None for a key
        that is not :meth:`informative`)."""
        if not self.informative(key):
            return None
        thumb = sketch_array(sketch, check=False)  # the caller's own, from perceptual()
        if thumb is None:
            return None
        best: tuple[Hashable, int] | None = None
        keys = self._keys
        seen: set[Hashable] = set()
        for j, (shift, mask) in enumerate(self._chunks):
            bucket = self._buckets.get((model_id, label, j, (key >> shift) & mask))
            if not bucket:
                continue
            for value in bucket:
                if value in seen:
                    continue
                seen.add(value)
                held = keys[value]
                d = (held[2] ^ key).bit_count()
                if d > self.radius or (best is not None and d >= best[1]):
                    continue
                if float(np.abs(held[3] - thumb).max()) <= SKETCH_TOLERANCE:
                    best = (value, d)
                    if d == 0:
                        return best
        return best
