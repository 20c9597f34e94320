"""DeSVig (seed 000): a CGAN copy of the input for the claimed label, compared by hash.

Table III: the controller draws a copy X' of the input X for the label L the model gave
(step 6, gan.py beside this file), hashes both (steps 11-16: resize to 8x8, compare each pixel
with the mean, 64 bits) and compares the hashes; the paper's "flexible threshold" on their
Hamming distance is learned here by ``calibrate`` on clean data for a target FPR.

If L is right, X' is the same digit drawn in X's style and the hashes nearly agree; if an
attack made the model claim a wrong label, X' is another digit and the hashes disagree.

Scores (``distance``):

- ``"hash"``, the paper's: the Hamming distance between hash(X) and hash(X'), plus, with
  ``tie_break`` (the default), mse / (1 + mse) of the pixels (in [0, 0.5]): the Hamming
  order is kept, and the ties of a 0..64 integer distance no longer make the calibrated
  FPR overshoot.
- ``"hash+l1"`` (the default): the larger of that Hamming distance and the L1 pixel
  distance between X and X', each divided by its 99th percentile on the clean
  calibration data (``calibrate``; the training split until then). The 8x8 hash
  averages away the dense noise of L-inf attacks (FGSM, PGD at 0.3), which the copy
  cannot reproduce and L1 sums up: on mnist5k at 1% FPR the hash alone caught ~80% of
  them, hash-or-L1 all of them (bench/detection_probe.py).

Corrected label = the class whose copy is closest (pixel L2) to the input. With
``correct_on="binarized"`` (the default, for MNIST-like ink-on-paper images) the copies
are made from, and compared with, the 1-bit squeezed input, which strips L-inf noise
below 0.5: on FGSM inputs the closest-copy label went from ~40% to ~90% right. It is
computed for flagged items only once calibrated (for every item before), since it costs
one copy per class.

- hash: ``average`` (imagehash.average_hash, Table III; the paper's step 12, "simplify
  the colour into 64 levels", is read as the greyscale conversion of the standard aHash,
  since imagehash is the reference), ``dhash`` or ``phash``, bit-exact with imagehash
  (controller/detectors/hashing.py). whash is not offered: there is no batched
  implementation checked bit for bit against imagehash's.
- ``refine_steps`` > 0 refines the encoder's latent by iterative inversion (the paper's
  "iteratively optimize") at a cost of about that many generator passes per input.

Scoring is numpy only (the artifact holds the encoder and generator weights) and runs
BLAS single-threaded, which on a shared 2-core machine is both faster and steadier than
letting OpenBLAS spawn threads for these small products (at batch 1, threads bought ~5%
of latency for twice the CPU). Scoring one input is call overhead and weight traffic:
~100 numpy calls, and two weight matrices (~0.8 MB each for MNIST) that mostly come from
memory, not cache; for small batches the encoder reads only the rows of the pixels that
are not 0 (inversion.py ``CGAN._image_product``). Scores depend on the batch size at
the level of float32 rounding only (BLAS sums in another order).

Small batches (up to 16 items, 4 for the corrected labels; with the average hash, no
refinement and no pooling) are scored compiled instead (kernel.py, numba): the same steps
in a few calls, ~3x faster at batch 1. ``warm`` compiles it when the detector is loaded or
fitted. Without numba, or if the compiled path fails: one WARNING and the numpy path;
``OPENEXAMPLE_NO_JIT=1`` in the environment: the numpy path, silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from controller.detectors import hashing
from controller.detectors.arrays import as_float, bit_depth
from controller.detectors.base import Batch, Detector, Scores
from controller.detectors.desvig.gan import CGANConfig, ensure_cgan, train_cgan
from controller.detectors.desvig.inversion import CGAN

if TYPE_CHECKING:
    from controller.detectors.desvig.kernel import Kernel

log = logging.getLogger("openexample.controller")

NO_JIT_ENV = "OPENEXAMPLE_NO_JIT"  # "1": numpy only (read by warm, when loaded or fitted)
_T = TypeVar("_T")
_FAR = 1e6  # the score of an item whose label is not a class: above any distance
DISTANCES = ("hash", "hash+l1")
CORRECT_ON = ("binarized", "raw")
_SCALE_QUANTILE = 0.99


def _blas_switches() -> list[tuple[Callable[[], int], Callable[[int], Any]]]:
    """(get, set) of the thread count of each BLAS library loaded, looked up once: the C
    functions themselves where threadpoolctl can name them (its methods look them up on
    every call: ~10 us a limit() for the two OpenBLAS copies numpy and scipy bring)."""
    try:
        from threadpoolctl import ThreadpoolController

        libs = ThreadpoolController().select(user_api="blas").lib_controllers
    except Exception:  # optional: without it, BLAS keeps its own threads
        return []
    switches = []
    for lib in libs:
        get, put = lib.get_num_threads, lib.set_num_threads
        if lib.internal_api == "openblas" and getattr(lib, "threading_layer", "") == "pthreads":
            with contextlib.suppress(Exception):
                c_get = lib._get_symbol("openblas_get_num_threads")
                c_put = lib._get_symbol("openblas_set_num_threads")
                if c_get is not None and c_put is not None:
                    get, put = c_get, c_put
        switches.append((get, put))
    return switches


_BLAS = _blas_switches()


@contextlib.contextmanager
def _blas_limit() -> Iterator[None]:
    """BLAS on one thread inside the block (where threadpoolctl is installed)."""
    saved = [(put, get()) for get, put in _BLAS]
    for put, threads in saved:
        if threads != 1:
            put(1)
    try:
        yield
    finally:
        for put, threads in saved:
            if threads != 1:
                put(threads)


class DesvigDetector(Detector):
    name = "desvig"
    can_purify = True  # corrected: the class whose copy is closest to the input

    def __init__(
        self,
        hash: str = "average",
        distance: str = "hash+l1",
        refine_steps: int = 0,
        tie_break: bool = True,
        correct: bool = True,
        correct_on: str = "binarized",
        cgan: Mapping[str, Any] | None = None,
        *,
        cache: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        """``cgan``: CGANConfig fields for training; ``cache``: a folder where a trained
        CGAN is kept and reused (keyed by the training data and settings; not saved)."""
        super().__init__()
        if hash not in hashing.HASHES:
            raise ValueError(f"hash must be one of {sorted(hashing.HASHES)}, got {hash!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if correct_on not in CORRECT_ON:
            raise ValueError(f"correct_on must be one of {CORRECT_ON}, got {correct_on!r}")
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        self.hash = hash
        self.distance = distance
        self.correct_on = correct_on
        self.refine_steps = int(refine_steps)
        self.tie_break = bool(tie_break)
        self.correct = bool(correct)
        self.cgan_config = CGANConfig(**dict(cgan or {}))
        self.cache = cache
        self.progress = progress
        self.cgan: CGAN | None = None
        self.scales = np.ones(2)  # clean 99th percentiles of (Hamming, L1), set by fit
        # the compiled small-batch path (kernel.py): the Kernel, the CGAN it was made for
        # (another one, e.g. assigned to .cgan, means warming again), and whether it broke
        self._jit: Kernel | None = None
        self._jit_for: CGAN | None = None
        self._jit_broken = False

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "distance": self.distance,
            "refine_steps": self.refine_steps,
            "tie_break": self.tie_break,
            "correct": self.correct,
            "correct_on": self.correct_on,
            "cgan": dataclasses.asdict(self.cgan_config),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        if self.cgan is None:
            raise RuntimeError("desvig is not fitted")
        shape = np.asarray(self.cgan.shape, np.int64)
        return {**self.cgan.arrays(), "shape": shape, "scales": self.scales}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.cgan = CGAN(dict(arrays), tuple(int(s) for s in arrays["shape"]))
        if "scales" in arrays:
            self.scales = np.asarray(arrays["scales"], np.float64)
        else:  # an artifact from before the L1 distance: its threshold is on the hash score
            self.distance, self.scales = "hash", np.ones(2)
        self.warm()

    # -- the compiled small-batch path ------------------------------------------------------
    def warm(self) -> None:
        """Make the compiled path for the current CGAN and run it once, so that numba
        compiles it (or loads it from its cache) now, not at the first request. Nothing
        when the settings need the numpy path or ``OPENEXAMPLE_NO_JIT=1``; on any error,
        one WARNING and the numpy path from then on."""
        self._jit, self._jit_for = None, self.cgan
        if not self._jit_applies() or os.environ.get(NO_JIT_ENV, "").strip() not in ("", "0"):
            return
        try:
            from controller.detectors.desvig.kernel import Kernel

            jit = Kernel(self.cgan)
            jit.warm()
        except Exception as exc:  # numba missing or failing: numpy works, only slower
            self._jit_failed(exc)
            return
        self._jit = jit

    def _jit_applies(self) -> bool:
        """The settings the compiled path implements: average hash, no refinement, and an
        encoder on the full grey image."""
        cgan = self.cgan
        return (
            cgan is not None
            and not self._jit_broken
            and self.hash == "average"
            and self.refine_steps == 0
            and cgan.pool == 1
            and cgan.shape[0] == 1
        )

    def _jit_failed(self, exc: BaseException) -> None:
        self._jit, self._jit_broken = None, True
        log.warning(
            "desvig: compiled scoring path disabled, using numpy (%s: %s)",
            type(exc).__name__,
            exc,
        )

    def _kernel(self, n: int, classes: bool = False) -> Kernel | None:
        """The compiled path for n inputs (of ``class_distances`` with ``classes``), or
        None for the numpy path."""
        if self._jit_for is not self.cgan:
            self.warm()  # a CGAN set by hand: made on first use
        jit = self._jit
        if jit is None or not self._jit_applies():
            return None
        return jit if n <= (jit.class_cutoff if classes else jit.cutoff) else None

    # -- learning ---------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        x = as_float(x)
        classes = len(self.meta["classes"])
        if self.cache is not None:
            self.cgan, summary = ensure_cgan(
                self.cache, x, y, classes, self.cgan_config, progress=self.progress
            )
        else:
            self.cgan, summary = train_cgan(x, y, classes, self.cgan_config, progress=self.progress)
        self.meta["cgan"] = {k: v for k, v in summary.items() if k != "settings"}
        self.warm()
        with _blas_limit():
            self._set_scales(*self.distances(x, y))  # until calibrate sees held-out data

    def _set_scales(self, ham: np.ndarray, l1: np.ndarray) -> None:
        self.scales = np.maximum(np.quantile(np.stack([ham, l1], 1), _SCALE_QUANTILE, 0), 1e-6)
        self.meta["scales"] = {"hamming": float(self.scales[0]), "l1": float(self.scales[1])}

    def calibrate(self, clean: Batch, fpr: float) -> float:
        """Scale each distance by its 99th percentile on ``clean`` (held-out data: copies
        of training images are closer than of new ones), then set the threshold."""
        if self.cgan is None:
            raise RuntimeError("desvig is not fitted")
        labels = np.asarray(clean.labels, dtype=np.int64)
        valid = (labels >= 0) & (labels < self.cgan.classes)
        with _blas_limit():
            self._set_scales(*self.distances(as_float(clean.inputs)[valid], labels[valid]))
        return super().calibrate(clean, fpr)

    # -- scoring ----------------------------------------------------------------------------
    def distances(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distance [+ tie-break], L1 distance) between inputs and their copies."""
        if self.cgan is None:
            raise RuntimeError("desvig is not fitted")
        return self._distances(x, labels, self._kernel(len(labels)))

    def _distances(
        self, x: np.ndarray, labels: np.ndarray, jit: Kernel | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``distances`` on the path already chosen (``jit`` None: numpy)."""
        return self._either(
            jit,
            lambda k: k.distances(x, labels, self.tie_break),
            lambda: self._numpy_distances(x, labels),
        )

    def _numpy_distances(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cgan, n = self.cgan, len(labels)
        assert cgan is not None
        # inputs and copies in one array, so that one hash call covers both
        both = np.empty((2 * n, cgan.pixels), np.float32)
        both[:n] = x.reshape(n, cgan.pixels)
        cgan.copy(x, labels, self.refine_steps, out=both[n:])
        bits = hashing.HASHES[self.hash](both.reshape(2 * n, *cgan.shape))
        # Hamming distance: the bits that differ
        ham = np.add.reduce(bits[:n] != bits[n:], axis=1, dtype=np.float64)
        diff = np.subtract(both[:n], both[n:], out=both[n:])
        if self.tie_break:
            mse = np.divide(np.einsum("ij,ij->i", diff, diff), diff.shape[1], dtype=np.float64)
            ham += mse / (1.0 + mse)
        np.abs(diff, out=diff)
        return ham, np.add.reduce(diff, axis=1, dtype=np.float64)  # what .sum runs

    def class_distances(self, x: np.ndarray) -> np.ndarray:
        """[N, classes] pixel L2 distance between each input and its copy for every class
        (the input binarized with ``correct_on="binarized"``): argmin = corrected label."""
        if self.cgan is None:
            raise RuntimeError("desvig is not fitted")
        x = as_float(x)
        binarize = self.correct_on == "binarized"
        return self._either(
            self._kernel(len(x), classes=True),
            lambda jit: jit.class_distances(x, binarize),
            lambda: self._numpy_class_distances(bit_depth(x, 1) if binarize else x),
        )

    def _numpy_class_distances(self, x: np.ndarray) -> np.ndarray:
        cgan = self.cgan
        assert cgan is not None
        with _blas_limit():  # (a no-op inside score's)
            copies = cgan.copies_all(x, self.refine_steps)
        diff = (copies - x[:, None]).reshape(len(x), cgan.classes, -1)
        return np.sqrt(np.einsum("ncp,ncp->nc", diff, diff))

    def _either(
        self, jit: Kernel | None, compiled: Callable[[Kernel], _T], numpy: Callable[[], _T]
    ) -> _T:
        """``compiled(jit)``, or ``numpy()`` without a kernel. If the compiled path raises,
        the numpy path answers: raising too, the inputs were at fault (its error goes
        out, the kernel stays); else the kernel is broken (one WARNING, numpy from now)."""
        if jit is None:
            return numpy()
        try:
            return compiled(jit)
        except Exception as exc:
            out = numpy()
            self._jit_failed(exc)
            return out

    def relabel(self, batch: Batch) -> np.ndarray | None:
        """The closest class copy's label, which ``score`` computes only above DeSVig's own
        threshold (ten copies per input): for what another detector flagged."""
        if not self.correct:
            return None
        return self.class_distances(batch.inputs).argmin(axis=1).astype(np.int64)

    def score(self, batch: Batch) -> Scores:
        if self.cgan is None:
            raise RuntimeError("desvig is not fitted")
        x = as_float(batch.inputs)
        labels = np.asarray(batch.labels, dtype=np.int64)
        n, classes = len(labels), self.cgan.classes
        valid = (labels >= 0) & (labels < classes)
        all_valid = bool(valid.all())
        # the compiled path calls no BLAS: limiting its threads would only cost time
        jit = self._kernel(n)
        with contextlib.nullcontext() if jit is not None else _blas_limit():
            ham, l1 = self._distances(x, labels if all_valid else np.where(valid, labels, 0), jit)
            if self.distance == "hash":
                scores = ham
            else:
                scores = np.maximum(ham / self.scales[0], l1 / self.scales[1])
            if not all_valid:
                scores = np.where(valid, scores, _FAR)
            if not self.correct:
                return Scores(scores, None)
            corrected = labels.copy()
            if self.threshold is None:
                todo = np.ones(n, bool)
            else:
                todo = scores >= self.threshold
                if not all_valid:
                    todo |= ~valid
            if todo.any():
                corrected[todo] = self.class_distances(x[todo]).argmin(axis=1)
        return Scores(scores, corrected)
