"""DeSVig's small-batch path compiled with numba: the copies, the average hash, the distances.

At batch 1 the numpy path (detector.py, inversion.py, hashing.py) is ~100 numpy calls on
arrays of a few hundred elements: call overhead, not arithmetic. Here the same steps run
as loops compiled once (``@njit(cache=True)``: later processes load the machine code from
``__pycache__``), for batches of at most ``CUTOFF`` items; above that the numpy path is as
fast or faster (its products are BLAS calls over the whole batch). ``Kernel`` holds one
CGAN's arrays and runs the steps; ``DesvigDetector`` decides when to use it.

What is computed, and how closely it matches the numpy path:

- the copy G(E(x, y), y) as ``CGAN.copy`` with ``refine_steps=0`` and ``pool == 1``: the
  same float32 weights and operations, the products summed in another order (float32
  rounding). The output sigmoid (``squash_halved``) stays numpy's, between two compiled
  calls: numpy's tanh is vectorised, a compiled loop calls libm's once per pixel (~10x
  slower, and 1-ulp different);
- the average hash as ``hashing.average_hash``, bit for bit on the same float32 pixels:
  the grey levels, PIL's Lanczos passes (matrices and order from ``hashing._passes``,
  passed in as arrays, so no PIL rule lives here), their requantisation, the mean. The
  passes sum integers times 2**-22 in float64: exact in any order;
- the Hamming distance (+ tie-break mse / (1 + mse)) and the L1 distance, summed in
  float64 (numpy sums the squares in float32: float32 rounding);
- the [N, classes] pixel L2 distances of ``DesvigDetector.class_distances``.

No ``fastmath``: it would let LLVM reorder float arithmetic, and nothing here needs it
(the products are written as row updates, which vectorise as they are).

``OPENEXAMPLE_NO_JIT=1`` in the environment when a detector is loaded or fitted makes it
score with the numpy path only (for comparisons and debugging; detector.py reads it, so
that it works without numba too).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from controller.detectors import hashing
from controller.detectors.desvig.inversion import CGAN, squash_halved

# Up to this many items per call, the compiled path; the numpy path is as fast above (its
# products are BLAS calls over the whole batch). The corrected labels' copies (ten per input)
# are one BLAS product for the whole batch in numpy: that wins from ~5 inputs on.
CUTOFF = 16
CLASS_CUTOFF = 4

# the CGAN's arrays, in CGAN's names: e_x, e_y, e_w2, e_b2, g_z, g_y, g_w2_half, g_b2_half
Weights = tuple[np.ndarray, ...]
# the average hash's resize: image h, w, rows pass [w, 8], columns pass [8, h], vertical first
HashTables = tuple[int, int, np.ndarray, np.ndarray, bool]

_F0 = np.float32(0.0)  # float32 constants: a float64 literal would widen float32 loops
_F255 = np.float32(255.0)


# -- the copy, up to its output sigmoid ------------------------------------------------------


@njit(cache=True, nogil=True)
def _relu(v: float) -> float:
    return _F0 if v < _F0 else v  # as np.maximum(v, 0): NaN stays NaN


@njit(cache=True, nogil=True)
def _nonzero_columns(a: np.ndarray) -> np.ndarray:
    """The columns of a [m, k] that are non-zero in some row, in order."""
    used = np.zeros(a.shape[1], np.bool_)
    for i in range(a.shape[0]):
        for c in range(a.shape[1]):
            if a[i, c] != _F0:
                used[c] = True
    return np.nonzero(used)[0]


@njit(cache=True, nogil=True)
def _sparse_product(a: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out = a @ w, reading only the rows of w whose column of a is non-zero somewhere:
    MNIST pixels are ~80% zero, and relu zeroes about half the hidden units. Eight rows
    of w per sweep over out (an eighth of the loads and stores of out: ~1.4x faster than
    four), and each sum is still added term by term in column order (the 0 * w terms of
    other rows add nothing)."""
    cols = _nonzero_columns(a)
    out[:] = _F0
    g = 0
    while g + 8 <= cols.shape[0]:
        c0, c1, c2, c3 = cols[g], cols[g + 1], cols[g + 2], cols[g + 3]
        c4, c5, c6, c7 = cols[g + 4], cols[g + 5], cols[g + 6], cols[g + 7]
        w0, w1, w2, w3, w4, w5, w6, w7 = w[c0], w[c1], w[c2], w[c3], w[c4], w[c5], w[c6], w[c7]
        for i in range(a.shape[0]):
            a0, a1, a2, a3 = a[i, c0], a[i, c1], a[i, c2], a[i, c3]
            a4, a5, a6, a7 = a[i, c4], a[i, c5], a[i, c6], a[i, c7]
            o = out[i]
            for q in range(o.shape[0]):
                v = (((o[q] + a0 * w0[q]) + a1 * w1[q]) + a2 * w2[q]) + a3 * w3[q]
                o[q] = (((v + a4 * w4[q]) + a5 * w5[q]) + a6 * w6[q]) + a7 * w7[q]
        g += 8
    for c in cols[g:]:
        for i in range(a.shape[0]):
            v = a[i, c]
            for q in range(out.shape[1]):
                out[i, q] += v * w[c, q]


@njit(cache=True, nogil=True)
def _latent(
    hx: np.ndarray, e_y_row: np.ndarray, e_w2: np.ndarray, e_b2: np.ndarray, z: np.ndarray
) -> None:
    """z = relu(hx + e_y_row) @ e_w2 + e_b2: the encoder after its image product (e_y_row:
    the label's row, first-layer bias folded in); units relu zeroes are skipped."""
    z[:] = _F0
    for j in range(hx.shape[0]):
        a = _relu(hx[j] + e_y_row[j])
        if a != _F0:
            for k in range(z.shape[0]):
                z[k] += a * e_w2[j, k]
    for k in range(z.shape[0]):
        z[k] += e_b2[k]


@njit(cache=True, nogil=True)
def _hidden(z: np.ndarray, g_z: np.ndarray, g_y_row: np.ndarray, h: np.ndarray) -> None:
    """h = relu(z @ g_z + g_y_row): the generator's hidden layer (bias folded in)."""
    h[:] = _F0
    for k in range(z.shape[0]):
        for j in range(h.shape[0]):
            h[j] += z[k] * g_z[k, j]
    for j in range(h.shape[0]):
        h[j] = _relu(h[j] + g_y_row[j])


@njit(cache=True, nogil=True)
def _add_rows(out: np.ndarray, b: np.ndarray) -> None:
    """out[i] += b: the output bias, added after the product as numpy adds it."""
    for i in range(out.shape[0]):
        for q in range(out.shape[1]):
            out[i, q] += b[q]


@njit(cache=True, nogil=True)
def copy_logits(x: np.ndarray, labels: np.ndarray, weights: Weights) -> np.ndarray:
    """G(E(x[i], labels[i]), labels[i]) for x [n, pixels] float32, up to the sigmoid: the
    halved logits [n, pixels] that ``squash_halved`` turns into the copies. One input at
    a time: each skips its own zeros (a batch would share the union of them)."""
    e_x, e_y, e_w2, e_b2, g_z, g_y, g_w2_half, g_b2_half = weights
    n = x.shape[0]
    hx = np.empty((1, e_x.shape[1]), np.float32)
    z = np.empty(e_w2.shape[1], np.float32)
    h = np.empty((1, g_z.shape[1]), np.float32)
    out = np.empty((n, g_w2_half.shape[1]), np.float32)
    for i in range(n):
        y = labels[i] + e_y.shape[0] if labels[i] < 0 else labels[i]  # as numpy indexes
        if y < 0 or y >= e_y.shape[0]:
            raise IndexError("label out of range")  # compiled code checks no bounds
        _sparse_product(x[i : i + 1], e_x, hx)
        _latent(hx[0], e_y[y], e_w2, e_b2, z)
        _hidden(z, g_z, g_y[y], h[0])
        _sparse_product(h, g_w2_half, out[i : i + 1])
    _add_rows(out, g_b2_half)
    return out


@njit(cache=True, nogil=True)
def class_logits(x: np.ndarray, binarize: bool, weights: Weights) -> np.ndarray:
    """``copy_logits`` of every input for every class: [n, classes, pixels] (as
    CGAN.copies_all). With ``binarize`` the inputs are rint(x) (bit_depth(x, 1))."""
    e_x, e_y, e_w2, e_b2, g_z, g_y, g_w2_half, g_b2_half = weights
    n, classes = x.shape[0], e_y.shape[0]
    if binarize:
        x = np.rint(x)
    hx = np.empty((1, e_x.shape[1]), np.float32)
    z = np.empty(e_w2.shape[1], np.float32)
    h = np.empty((classes, g_z.shape[1]), np.float32)
    out = np.empty((n, classes, g_w2_half.shape[1]), np.float32)
    for i in range(n):
        _sparse_product(x[i : i + 1], e_x, hx)  # shared by every class: the label rows differ
        for c in range(classes):
            _latent(hx[0], e_y[c], e_w2, e_b2, z)
            _hidden(z, g_z, g_y[c], h[c])
        # the classes of one input in one product: each weight row read once for all ten
        _sparse_product(h, g_w2_half, out[i])
        _add_rows(out[i], g_b2_half)
    return out


# -- the average hash (hashing.average_hash) and the distances --------------------------------


@njit(cache=True, nogil=True)
def _levels(px: np.ndarray, out: np.ndarray) -> None:
    """hashing._levels: rint(x * 255) in float32, clipped to 0..255 (NaN -> 0), float64."""
    for p in range(px.shape[0]):
        v = np.rint(px[p] * _F255)
        if v > _F255:
            v = _F255
        if not v > _F0:  # and NaN
            v = _F0
        out[p] = v


@njit(cache=True, nogil=True)
def _clip8(acc: float) -> float:
    """hashing._requantise: PIL's clip8 on a sum scaled by 2**-22, floor(acc + 1/2) in 0..255."""
    return min(max(np.floor(acc + 0.5), 0.0), 255.0)


@njit(cache=True, nogil=True)
def _pass_rows(src: np.ndarray, m: np.ndarray, dst: np.ndarray) -> None:
    """A horizontal pass, dst = clip8(src @ m), m [w, width]; grey level 0 (most of an
    MNIST image) adds nothing and is skipped."""
    dst[:] = 0.0
    for r in range(src.shape[0]):
        for k in range(src.shape[1]):
            v = src[r, k]
            if v != 0.0:
                for c in range(dst.shape[1]):
                    dst[r, c] += v * m[k, c]
    for r in range(dst.shape[0]):
        for c in range(dst.shape[1]):
            dst[r, c] = _clip8(dst[r, c])


@njit(cache=True, nogil=True)
def _pass_cols(src: np.ndarray, m: np.ndarray, dst: np.ndarray) -> None:
    """A vertical pass, dst = clip8(m @ src), m [height, h]."""
    dst[:] = 0.0
    for o in range(dst.shape[0]):
        for r in range(src.shape[0]):
            f = m[o, r]
            if f != 0.0:
                for c in range(dst.shape[1]):
                    dst[o, c] += f * src[r, c]
    for o in range(dst.shape[0]):
        for c in range(dst.shape[1]):
            dst[o, c] = _clip8(dst[o, c])


@njit(cache=True, nogil=True)
def _average_hash(px: np.ndarray, tables: HashTables, bits: np.ndarray) -> None:
    """bits[:] = hashing.average_hash of one image px (float32 [h * w]), imagehash's order."""
    h, w, m_rows, m_cols, vertical_first = tables
    width, height = m_rows.shape[1], m_cols.shape[0]
    lev = np.empty((h, w), np.float64)
    _levels(px, lev.reshape(h * w))
    small = np.empty((height, width), np.float64)
    if vertical_first:  # the order of the passes shows in the result: PIL's, from hashing
        mid = np.empty((height, w), np.float64)
        _pass_cols(lev, m_cols, mid)
        _pass_rows(mid, m_rows, small)
    else:
        mid = np.empty((h, width), np.float64)
        _pass_rows(lev, m_rows, mid)
        _pass_cols(mid, m_cols, small)
    flat = small.reshape(height * width)
    total = 0.0
    for q in range(flat.shape[0]):
        total += flat[q]  # integers: exact in any order
    mean = total * (1.0 / flat.shape[0])
    for q in range(flat.shape[0]):
        bits[q] = flat[q] > mean


@njit(cache=True, nogil=True)
def average_hashes(x: np.ndarray, tables: HashTables) -> np.ndarray:
    """hashing.average_hash of x [n, h * w] float32: [n, 64] bool (for the tests)."""
    out = np.empty((x.shape[0], tables[2].shape[1] * tables[3].shape[0]), np.bool_)
    for i in range(x.shape[0]):
        _average_hash(x[i], tables, out[i])
    return out


@njit(cache=True, nogil=True)
def hash_distances(
    x: np.ndarray, copies: np.ndarray, tie_break: bool, tables: HashTables
) -> np.ndarray:
    """DesvigDetector.distances from inputs and copies [n, pixels] float32: [2, n] float64,
    rows (Hamming distance of the average hashes [+ mse / (1 + mse)], L1 distance)."""
    n, pixels = x.shape
    out = np.empty((2, n), np.float64)
    size = tables[2].shape[1] * tables[3].shape[0]
    bits_x = np.empty(size, np.bool_)
    bits_c = np.empty(size, np.bool_)
    for i in range(n):
        _average_hash(x[i], tables, bits_x)
        _average_hash(copies[i], tables, bits_c)
        ham = 0.0
        for q in range(size):
            ham += bits_x[q] != bits_c[q]
        sq = 0.0
        l1 = 0.0
        for p in range(pixels):
            d = np.float64(x[i, p] - copies[i, p])  # the float32 difference, as numpy's
            sq += d * d
            l1 += abs(d)
        if tie_break:
            mse = sq / pixels
            ham += mse / (1.0 + mse)
        out[0, i] = ham
        out[1, i] = l1
    return out


@njit(cache=True, nogil=True)
def class_l2(x: np.ndarray, binarize: bool, copies: np.ndarray) -> np.ndarray:
    """[n, classes] float32 pixel L2 distance between input i (rint(x) with ``binarize``)
    and copies[i, c] (``class_logits`` squashed)."""
    n, classes, pixels = copies.shape
    out = np.empty((n, classes), np.float32)
    for i in range(n):
        for c in range(classes):
            sq = 0.0
            for p in range(pixels):
                v = np.rint(x[i, p]) if binarize else x[i, p]
                d = np.float64(copies[i, c, p] - v)
                sq += d * d
            out[i, c] = math.sqrt(sq)
    return out


# -- the Python side --------------------------------------------------------------------------


def _hash_tables(h: int, w: int) -> HashTables:
    """(h, w, rows pass [w, 8], columns pass [8, h], vertical first) from hashing._passes.
    A pass PIL skips (that side already 8) is the identity: requantising integer levels
    leaves them as they are. Copies: writable arrays, the one type the kernels compile for."""
    size = hashing.HASH_SIZE
    passes = hashing._passes(h, w, size, size)
    mats = dict(passes)
    m_rows = np.array(mats.get("h", np.eye(w)), np.float64, order="C")
    m_cols = np.array(mats.get("v", np.eye(h)), np.float64, order="C")
    return h, w, m_rows, m_cols, bool(passes) and passes[0][0] == "v"


def _inputs(x: np.ndarray, n: int, pixels: int) -> np.ndarray:
    """[n, pixels] float32, C-contiguous and writable: the kernels are compiled for that
    type only, and decoded requests are read-only views (a new type would mean compiling)."""
    flat = np.asarray(x).reshape(n, pixels)
    if flat.dtype != np.float32 or not (flat.flags.c_contiguous and flat.flags.writeable):
        flat = np.array(flat, np.float32, order="C")
    return flat


class Kernel:
    """The compiled small-batch path for one CGAN (``pool == 1``, one grey channel)."""

    cutoff = CUTOFF
    class_cutoff = CLASS_CUTOFF

    def __init__(self, cgan: CGAN) -> None:
        if cgan.pool != 1 or cgan.shape[0] != 1:
            raise ValueError(f"needs pool 1 and one channel, got {cgan.pool}, {cgan.shape}")
        self.cgan = cgan
        w = cgan.w
        encoder = (cgan._e_x, cgan._e_y, w["e_w2"], w["e_b2"])
        generator = (cgan._g_z, cgan._g_y, cgan._g_w2_half, cgan._g_b2_half)
        self._weights: Weights = tuple(
            np.require(a, np.float32, ("C", "W")) for a in (*encoder, *generator)
        )
        self._hash = _hash_tables(*cgan.shape[1:])

    def distances(
        self, x: np.ndarray, labels: np.ndarray, tie_break: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """DesvigDetector.distances (average hash, no refinement): (Hamming [+ tie-break],
        L1), float64 [n] each."""
        labels = np.array(labels, np.int64)  # a copy: contiguous and writable, as compiled
        x = _inputs(x, len(labels), self.cgan.pixels)
        copies = squash_halved(copy_logits(x, labels, self._weights))
        out = hash_distances(x, copies, bool(tie_break), self._hash)
        return out[0], out[1]

    def class_distances(self, x: np.ndarray, binarize: bool) -> np.ndarray:
        """DesvigDetector.class_distances: [n, classes] float32 pixel L2 distances."""
        x = _inputs(x, len(x), self.cgan.pixels)
        copies = squash_halved(class_logits(x, bool(binarize), self._weights))
        return class_l2(x, bool(binarize), copies)

    def average_hash(self, x: np.ndarray) -> np.ndarray:
        """hashing.average_hash of [n, *shape] float32 images, computed here: [n, 64] bool."""
        return average_hashes(_inputs(x, len(x), self.cgan.pixels), self._hash)

    def warm(self) -> None:
        """Run every kernel once, so that numba compiles them (or loads them from its
        cache) now rather than on the first request."""
        x = np.zeros((1, self.cgan.pixels), np.float32)
        self.distances(x, np.zeros(1, np.int64), True)
        self.class_distances(x, True)
