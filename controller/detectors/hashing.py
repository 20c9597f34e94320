"""Batched perceptual hashes (average, difference, DCT) that match ``imagehash`` bit for bit.

``imagehash`` works on one PIL image at a time: ``convert("L")``, a LANCZOS resize, then a
comparison. Here the resize is PIL's own algorithm (``libImaging/Resample.c``) redone on a
whole batch with two matrix products: per axis a table of Lanczos weights, quantised to
22-bit fixed point exactly as PIL does, then ``(sum + 2**21) >> 22`` clipped to uint8 after
each pass, in the order PIL runs the passes. The products run in float64, which is exact
here: every partial sum is an integer far below 2**53. The grey levels stay float64 from
the conversion to the comparison (``_levels``, ``_resize_levels``): no uint8 round trip.

Hashes are ``[N, 64]`` bool arrays in ``imagehash``'s row-major bit order; ``pack`` turns
them into uint64 (first bit = most significant, so ``f"{h:016x}"`` equals ``str(imagehash)``)
and ``hamming`` / ``pairwise_hamming`` count differing bits.
"""

from __future__ import annotations

import importlib.metadata
import math
from functools import lru_cache

import numpy as np
import scipy.fftpack

HASH_SIZE = 8
_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed point for 8-bit images
_LANCZOS_SUPPORT = 3.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 the way the rest of the project makes PIL images.

    The single definition of the conversion: the reference ``imagehash`` calls in the tests
    use ``Image.fromarray(to_uint8(x))`` so both sides see the same pixels. uint8 input is
    returned unchanged.
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return _levels(x).astype(np.uint8)


def _levels(x: np.ndarray) -> np.ndarray:
    """``to_uint8``'s grey levels as float64 (integers 0..255), for the resampling passes.

    Float input is scaled and rounded in its own precision (float16 and integers go through
    float32): ``(x * 255).round()`` (half to even, like ndarray.round()), clipped to 0..255
    (NaN -> 0, as the uint8 cast gave it).
    """
    if x.dtype == np.uint8:
        return x.astype(np.float64)
    dt = np.float64 if x.dtype == np.float64 else np.float32
    y = np.multiply(x, dt(255), dtype=dt)
    np.rint(y, out=y)
    np.fmax(y, 0, out=y)
    # float64 out: a float32 @ float64 product would miss BLAS
    return np.fmin(y, 255, out=np.empty(y.shape, np.float64))


def _gray(images: np.ndarray) -> np.ndarray:
    """[N,H,W], [N,1,H,W] or one [H,W] image -> [N,H,W] (a view, not converted)."""
    a = np.asarray(images)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(f"expected one grey channel, got shape {a.shape}")
        return a[:, 0]
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise ValueError(f"expected [N,H,W] or [N,1,H,W] images, got shape {a.shape}")
    return a


def _pillow_major() -> int:
    try:
        return int(importlib.metadata.version("pillow").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 13


# Pillow >= 13 (python-pillow/Pillow#9549) resizes vertically first when the height shrinks
# by more than twice as many pixels as the width; older versions always go horizontal first.
_VERTICAL_FIRST_RULE = _pillow_major() >= 13


def _lanczos(x: float) -> float:
    # Same expression order as PIL's sinc_filter / lanczos_filter, with libm's sin via math.
    if not -3.0 <= x < 3.0:
        return 0.0

    def sinc(v: float) -> float:
        if v == 0.0:
            return 1.0
        v = v * math.pi
        return math.sin(v) / v

    return sinc(x) * sinc(x / 3)


@lru_cache(maxsize=64)
def _resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of PIL's fixed-point LANCZOS weights (precompute_coeffs), / 2**22."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    ss = 1.0 / filterscale
    one = float(1 << _PRECISION_BITS)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        for x, v in enumerate(w):
            k = (v / ww if ww != 0.0 else v) * one
            # normalize_coeffs_8bpc: round half away from zero via C's truncating int cast
            m[xx, xmin + x] = int(k - 0.5) if k < 0 else int(k + 0.5)
    # scaled by 2**-22 (exact: a power of two), so the sums come out in pixel units
    m *= 1.0 / (1 << _PRECISION_BITS)
    m.setflags(write=False)
    return m


def _requantise(acc: np.ndarray) -> np.ndarray:
    """PIL's clip8 on sums already scaled by 2**-22, in place: floor(acc + 1/2) in 0..255."""
    acc += 0.5
    np.floor(acc, out=acc)
    np.maximum(acc, 0, out=acc)  # ufuncs: np.clip's wrapper costs microseconds per call
    return np.minimum(acc, 255, out=acc)


@lru_cache(maxsize=64)
def _passes(h: int, w: int, width: int, height: int) -> tuple[tuple[str, np.ndarray], ...]:
    """PIL's LANCZOS resize of [h, w] images to [height, width] as float64 passes, in the
    order PIL runs them: ("h", [w, width]) on rows of pixels, ("v", [height, h]) on columns."""
    if (h, w) == (height, width):
        return ()  # PIL returns a copy without resampling
    # each pass rounds to uint8, so the order of the passes shows in the result
    vertical_first = _VERTICAL_FIRST_RULE and height < h and h - height > 2 * (w - width)
    horizontal = ("h", np.ascontiguousarray(_resample_matrix(w, width).T))
    passes = [horizontal] if w != width else []
    if h != height:
        passes.insert(0 if vertical_first else len(passes), ("v", _resample_matrix(h, height)))
    for _, m in passes:
        m.setflags(write=False)
    return tuple(passes)


def _resize_levels(levels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``resize`` on float64 grey levels [N, h, w] (``_levels``): [N, height * width]
    float64 levels (a new array), each pass requantised as PIL does."""
    n, rows, cols = levels.shape
    out = levels.reshape(n, rows * cols)
    passes = _passes(rows, cols, width, height)
    for kind, m in passes:
        if kind == "h":
            out = (out.reshape(n * rows, cols) @ m).reshape(n, rows * width)
            cols = width
        else:
            out = np.matmul(m, out.reshape(n, rows, cols)).reshape(n, height * cols)
            rows = height
        _requantise(out)
    return out if passes else out.copy()


def resize(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """PIL ``Image.resize((width, height), LANCZOS)`` on a batch of grey images -> uint8 [N,h,w]."""
    a = _gray(images)
    if a.dtype == np.uint8 and a.shape[1:] == (height, width):
        return a.copy()
    return _resize_levels(_levels(a), width, height).astype(np.uint8).reshape(-1, height, width)


def average_hash(images: np.ndarray) -> np.ndarray:
    """``imagehash.average_hash`` on a batch: [N, 64] bool."""
    px = _resize_levels(_levels(_gray(images)), HASH_SIZE, HASH_SIZE)
    # px > mean(px): exact in float64, the sum of 64 levels and its division by 64 both are
    return px > np.add.reduce(px, axis=1, keepdims=True) * (1.0 / px.shape[1])


def dhash(images: np.ndarray) -> np.ndarray:
    """``imagehash.dhash`` (horizontal gradient) on a batch: [N, 64] bool."""
    px = resize(images, HASH_SIZE + 1, HASH_SIZE)
    return (px[:, :, 1:] > px[:, :, :-1]).reshape(-1, HASH_SIZE * HASH_SIZE)


def phash(images: np.ndarray, highfreq_factor: int = 4) -> np.ndarray:
    """``imagehash.phash`` on a batch: [N, 64] bool.

    The DCT is scipy.fftpack's, the routine imagehash calls, run over the batch axis so
    every coefficient is computed by the same code path (a hand-written DCT matrix would
    differ in the last bits and flip ties against the median).
    """
    size = HASH_SIZE * highfreq_factor
    px = resize(images, size, size)
    # rows are transformed independently, so only the 8 kept rows need the second pass
    cols = scipy.fftpack.dct(px, axis=1)[:, :HASH_SIZE, :]
    low = scipy.fftpack.dct(cols, axis=2)[:, :, :HASH_SIZE].reshape(-1, HASH_SIZE * HASH_SIZE)
    return low > np.median(low, axis=1, keepdims=True)


HASHES = {"average": average_hash, "dhash": dhash, "phash": phash}


def pack(bits: np.ndarray) -> np.ndarray:
    """[N, 64] bool -> [N] uint64, first bit most significant (imagehash's hex order)."""
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim != 2 or bits.shape[1] != 64:
        raise ValueError(f"expected [N, 64] bits, got shape {bits.shape}")
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def unpack(hashes: np.ndarray) -> np.ndarray:
    """[N] uint64 -> [N, 64] bool, inverse of ``pack``."""
    h = np.asarray(hashes, dtype=np.uint64).astype(">u8")
    return np.unpackbits(h.reshape(-1, 1).view(np.uint8), axis=1).astype(bool)


def to_hex(hashes: np.ndarray) -> list[str]:
    """Packed hashes -> hex strings equal to ``str(imagehash.ImageHash)``."""
    return [f"{int(h):016x}" for h in np.asarray(hashes, dtype=np.uint64).ravel()]


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(v: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(v)
    # byte lookup table for older numpy
    return _POPCOUNT8[v[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise (broadcast) Hamming distance of packed uint64 hashes, as uint8."""
    return _popcount(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def pairwise_hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N] x [M] packed hashes -> [N, M] Hamming distances (uint8)."""
    return hamming(np.asarray(a, np.uint64)[:, None], np.asarray(b, np.uint64)[None, :])
