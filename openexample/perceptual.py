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

:class:`NearIndex` finds keys within the radius with one scan of the (model, label)'s
keys. On the agent's fast path (:meth:`NearIndex.find_input`) the key, the scan and the
thumbnail check are one call into a small compiled kernel (``_nearkernel.c``, built by
``pip install``): ~2 us for a 28x28 input and 500 known attacks, where the same work in
numpy takes ~12 calls and 10-20 us, against issue 18's budget of 20 us at p99. Without
a C compiler the numpy path runs (and agents say so once); tests/test_near_kernel.py
checks that both give the same keys and the same matches.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import lru_cache

import numpy as np

try:  # built by `pip install` where a C compiler is (setup.py): one call per lookup
    from openexample import _nearkernel
except ImportError:  # pragma: no cover - the numpy path below does the same
    _nearkernel = None

# Which path lookups take, for the agent's log line and FEATURES-side diagnostics.
KERNEL = "compiled" if _nearkernel is not None else "numpy"
ROWS, COLS = 8, 9  # 8 x 8 horizontal differences: 64 bits
DEFAULT_RADIUS = 4
MAX_RADIUS = 15
# A key with fewer set (or unset) bits than this says little about its image: a flat or
# near-flat input (a blank frame) has key 0, and every other flat input would be its
# near-copy. Such keys are neither indexed nor looked up: the exact fingerprint decides.
MIN_INFORMATIVE_BITS = 8
_RELATIVE_TOLERANCE = 1e-5
_KEY_END, _MAX_SET = 1 << 64, 64 - MIN_INFORMATIVE_BITS
SKETCH_TOLERANCE = 0.1  # thumbnail max difference, relative to the image's largest value
SKETCH_BYTES = ROWS * COLS * 2  # float16, little-endian
_KERNEL_MAX_SIDE = 4096  # MAX_SIDE in _nearkernel.c
_F32 = np.dtype(np.float32)


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
    """(rows [8, h], columns [w, 17]) in float32: ``rows @ a @ columns`` is the 8x9
    thumbnail (columns 0-8) and its 8x8 horizontal differences (columns 9-16) at once.
    The differences are linear in the input, so they cost no extra numpy call: the
    lookup path is a handful of small calls (issue 18's budget is 20 us at p99)."""
    rows = _area_matrix(ROWS, h).astype(np.float32)
    cols = _area_matrix(COLS, w).T
    cols = np.ascontiguousarray(np.concatenate([cols, cols[:, 1:] - cols[:, :-1]], axis=1))
    cols = cols.astype(np.float32)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def _image(x: np.ndarray) -> np.ndarray:
    a = x if type(x) is np.ndarray else np.asarray(x)
    if a.ndim != 2:
        if a.ndim < 2:
            raise ValueError(f"a perceptual key needs an image ([..., H, W]), got shape {a.shape}")
        a = a.reshape(-1, a.shape[-2], a.shape[-1])
        a = a[0] if a.shape[0] == 1 else a.mean(axis=0, dtype=np.float32)
    if a.shape[-1] < 2 or a.shape[-2] < 1:
        raise ValueError(f"a perceptual key needs an image ([..., H, W]), got shape {a.shape}")
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _key_and_thumb(x: np.ndarray) -> tuple[np.uint64, np.ndarray]:
    """The key (numpy uint64) and the thumbnail ([8, 9] float32, scaled by the image's
    largest absolute value): the lookup path's form of :func:`perceptual`."""
    a = _image(x)
    rows, cols = _operators(a.shape[0], a.shape[1])
    v = np.dot(np.dot(rows, a), cols)
    scale = np.abs(a).max()
    # Rounding leaves flat regions a few 1e-8 of "difference": a dead zone keeps their
    # bits 0, so a flat image's key is 0 whatever its level, not rounding noise.
    key = np.packbits(v[:, COLS:] > _RELATIVE_TOLERANCE * scale).view(">u8")[0]
    thumb = v[:, :COLS]
    return key, (thumb / scale if scale > 0 else thumb)


@lru_cache(maxsize=32)
def _kernel_args(shape: tuple[int, ...]) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """(h, w, rows, columns) for the compiled kernel, for inputs of ``shape``; None where
    it does not apply (several channels, sizes out of its range): numpy does those."""
    if len(shape) < 2 or math.prod(shape[:-2]) != 1:
        return None
    h, w = shape[-2], shape[-1]
    if not (2 <= w <= _KERNEL_MAX_SIDE and 1 <= h <= _KERNEL_MAX_SIDE):
        return None
    return (h, w, *_operators(h, w))


def _kernel_ready(x: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """The kernel's arguments for ``x`` when it takes it as is (a C-contiguous float32
    single-channel image, no copy), else None."""
    if (
        _nearkernel is None
        or type(x) is not np.ndarray
        or x.dtype != _F32
        or not x.flags.c_contiguous
        or not x.flags.aligned
    ):
        return None
    return _kernel_args(x.shape)


def perceptual(x: np.ndarray) -> tuple[int, bytes]:
    """The 64-bit key and the 8x9 thumbnail (float16 bytes, scaled by the image's
    largest absolute value) of one input (``[..., H, W]``: leading axes are averaged)."""
    args = _kernel_ready(x)
    if args is not None:
        thumb = np.empty(ROWS * COLS, np.float32)
        key = _nearkernel.key_thumb(x, *args, thumb)
        return key, thumb.astype("<f2").tobytes()
    key, thumb = _key_and_thumb(x)
    return int(key), thumb.astype("<f2").tobytes()


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


class _Group:
    """The keys and thumbnails of one (model, label), in arrays a lookup scans at once."""

    __slots__ = ("keys", "live", "n", "slots", "thumbs", "values")

    def __init__(self) -> None:
        self.keys = np.zeros(8, np.uint64)
        self.thumbs = np.zeros((8, ROWS, COLS), np.float32)
        self.values: list[Hashable] = []
        self.slots: dict[Hashable, int] = {}
        self.n = 0
        self.live = self.keys[:0]  # the first n keys: a view kept, not sliced per lookup

    def append(self, value: Hashable, key: int, thumb: np.ndarray) -> None:
        if self.n == len(self.keys):  # amortised growth
            self.keys = np.concatenate([self.keys, np.zeros_like(self.keys)])
            self.thumbs = np.concatenate([self.thumbs, np.zeros_like(self.thumbs)])
        self.keys[self.n] = key
        self.thumbs[self.n] = thumb.reshape(ROWS, COLS)
        self.values.append(value)
        self.slots[value] = self.n
        self.n += 1
        self.live = self.keys[: self.n]

    def remove(self, value: Hashable) -> None:
        """Drop ``value``: the last one moves into its slot."""
        i = self.slots.pop(value)
        last = self.n - 1
        moved = self.values.pop()
        if i != last:
            self.keys[i] = self.keys[last]
            self.thumbs[i] = self.thumbs[last]
            self.values[i] = moved
            self.slots[moved] = i
        self.n = last
        self.live = self.keys[:last]


class NearIndex:
    """Keys by (model, label), found within ``radius`` bits. Values are what the
    caller keys its RT with; at most ``max_entries`` are kept (oldest out first).

    A lookup scans the (model, label)'s keys in one vectorised pass (XOR, popcount):
    a few microseconds for thousands of keys. Multi-index hashing (buckets on chunks of
    the key) was tried first and lost: dHash bits of real images are far from uniform
    (MNIST's blank borders make whole chunks alike), so a query of a label with 500
    known attacks met ~120 candidates one Python step each (18 us p50, 32 us p99)."""

    def __init__(self, radius: int = DEFAULT_RADIUS, max_entries: int = 100_000) -> None:
        if not 0 <= radius <= MAX_RADIUS:
            raise ValueError(f"radius: 0..{MAX_RADIUS}, got {radius}")
        self.radius = radius
        self.max_entries = max_entries
        self._order: dict[Hashable, tuple[str, int]] = {}  # value -> group; oldest first
        self._groups: dict[tuple[str, int], _Group] = {}

    def __len__(self) -> int:
        return len(self._order)

    def has(self, model_id: str, label: int) -> bool:
        """Whether any key is held for (model, label): the caller computes a key only then."""
        g = self._groups.get((model_id, label))
        return g is not None and g.n > 0

    @staticmethod
    def informative(key: int) -> bool:
        """Whether ``key`` (an unsigned 64-bit int) has enough set and unset bits to
        stand for its image."""
        return 0 <= key < _KEY_END and MIN_INFORMATIVE_BITS <= key.bit_count() <= _MAX_SET

    def add(self, model_id: str, label: int, key: int, sketch: bytes, value: Hashable) -> None:
        """Index ``key`` and its thumbnail for ``value`` (not kept: a key that is not
        :meth:`informative`, or a thumbnail that is not one)."""
        if value in self._order:
            self.remove(value)
        thumb = sketch_array(sketch)
        if thumb is None or not self.informative(key):
            return
        while len(self._order) >= self.max_entries:
            self.remove(next(iter(self._order)))
        group = (model_id, label)
        self._order[value] = group
        self._groups.setdefault(group, _Group()).append(value, key, thumb)

    def remove(self, value: Hashable) -> None:
        group = self._order.pop(value, None)
        if group is None:
            return
        g = self._groups[group]
        g.remove(value)
        if g.n == 0:
            del self._groups[group]

    def clear(self, model_id: str | None = None) -> None:
        """Forget every key, or those of ``model_id``."""
        for value in [v for v, group in self._order.items() if model_id in (None, group[0])]:
            self.remove(value)

    def find(
        self, model_id: str, label: int, key: int, sketch: bytes
    ) -> tuple[Hashable, int] | None:
        """The closest held value within the radius whose thumbnail is within
        ``SKETCH_TOLERANCE``, and its key distance; None if none (always None for a key
        that is not :meth:`informative`)."""
        g = self._groups.get((model_id, label))
        thumb = sketch_array(sketch, check=False)
        if g is None or thumb is None or not self.informative(key):
            return None
        return self._match(g, np.uint64(key), thumb.reshape(ROWS, COLS))

    def find_input(self, model_id: str, label: int, x: np.ndarray) -> tuple[Hashable, int] | None:
        """:meth:`find` for the input ``x`` itself: its key and thumbnail are computed
        only when (model, label) has keys, and kept in numpy form (no bytes between)."""
        g = self._groups.get((model_id, label))
        if g is None:
            return None
        args = _kernel_ready(x)
        if args is not None:
            found = _nearkernel.lookup(
                x, *args, g.keys, g.n, g.thumbs, self.radius, SKETCH_TOLERANCE,
                MIN_INFORMATIVE_BITS, _MAX_SET,
            )  # fmt: skip
            return None if found is None else (g.values[found[0]], found[1])
        key, thumb = _key_and_thumb(x)
        if not MIN_INFORMATIVE_BITS <= int(key).bit_count() <= _MAX_SET:
            return None
        return self._match(g, key, thumb)

    def _match(self, g: _Group, key: np.uint64, thumb: np.ndarray) -> tuple[Hashable, int] | None:
        # Few numpy calls: most lookups end at the first test (no key within the radius).
        d = np.bitwise_count(g.live ^ key)
        if d.min() > self.radius:
            return None
        near = np.flatnonzero(d <= self.radius)
        gap = np.abs(g.thumbs[near] - thumb).max(axis=(1, 2))
        alike = near[gap <= SKETCH_TOLERANCE]
        if alike.size == 0:
            return None
        best = alike[np.argmin(d[alike])] if alike.size > 1 else alike[0]
        return g.values[best], int(d[best])
