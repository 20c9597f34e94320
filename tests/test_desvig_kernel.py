"""DeSVig's compiled small-batch path (controller/detectors/desvig/kernel.py) against numpy.

The hash is compared bit for bit (with hashing.average_hash and imagehash); the distances
within float32 rounding (the products sum in another order), and what they decide (flags,
corrected labels) exactly. The CGAN and the example model are the cached ones the desvig
tests use (tests/conftest.py CACHE): no training here.
"""

import logging
import sys

import imagehash
import numpy as np
import pytest
from PIL import Image

from controller.detectors import Batch, hashing, make_batch
from controller.detectors.desvig import DesvigDetector
from controller.detectors.desvig import detector as desvig_detector
from controller.reference_model import model_fn
from tests.conftest import CACHE

kernel = pytest.importorskip("controller.detectors.desvig.kernel")

CUTOFF = kernel.CUTOFF
LOGGER = "openexample.controller"


@pytest.fixture(scope="module")
def predict(example_model):
    return model_fn(example_model)


@pytest.fixture(autouse=True)
def _jit_allowed(monkeypatch):
    monkeypatch.delenv(desvig_detector.NO_JIT_ENV, raising=False)


@pytest.fixture(scope="module")
def fitted(mnist, predict):
    det = DesvigDetector(cache=CACHE, progress=False)  # the cached CGAN: no training here
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(desvig_detector.NO_JIT_ENV, raising=False)
        det.fit(mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k")
    det.calibrate(make_batch(mnist.calibration.x, predict), 0.05)  # 5%: some items flagged
    assert det._jit is not None, "fit should have warmed the compiled path"
    return det


@pytest.fixture(scope="module")
def twin(fitted, tmp_path_factory):
    """The same detector loaded with OPENEXAMPLE_NO_JIT=1: the numpy path only."""
    path = tmp_path_factory.mktemp("desvig")
    fitted.save(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(desvig_detector.NO_JIT_ENV, "1")
        det = DesvigDetector.load(path)
    assert det._jit is None
    return det


@pytest.fixture(scope="module")
def cases(mnist, predict):
    """~500 test inputs with the model's labels, FGSM-like noisy ones (x + 0.3 sign(noise))
    with theirs, and clean ones with wrong labels: (x, labels)."""
    rng = np.random.default_rng(0)
    x = mnist.test.x[:500]
    noisy = np.clip(x[:150] + 0.3 * np.sign(rng.standard_normal(x[:150].shape)), 0, 1)
    noisy = noisy.astype(np.float32)
    wrong = (mnist.test.y[:150] + rng.integers(1, 10, 150)) % 10
    xs = np.concatenate([x, noisy, x[:150]])
    labels = np.concatenate([predict(x).argmax(1), predict(noisy).argmax(1), wrong])
    return xs, labels.astype(np.int64)


def _chunks(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# -- the hash ----------------------------------------------------------------------------------


def _imagehash_bits(images):
    pil = [Image.fromarray(hashing.to_uint8(im.reshape(im.shape[-2:]))) for im in images]
    return np.array([imagehash.average_hash(im).hash.flatten() for im in pil])


def _kernel_hash(images):
    n, h, w = len(images), *images.shape[-2:]
    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(n, h * w)
    return kernel.average_hashes(flat, kernel._hash_tables(h, w))


def test_hash_is_average_hash_bit_for_bit(mnist):
    rng = np.random.default_rng(1)
    flat = np.stack([np.zeros((28, 28)), np.ones((28, 28)), np.full((28, 28), 0.5)])
    images = np.concatenate(
        [
            mnist.test.x[:300, 0],
            rng.random((200, 28, 28), dtype=np.float32),
            np.clip(rng.normal(0.5, 1.0, (50, 28, 28)), -0.5, 1.5),  # out of [0, 1]: clipped
            flat,
            np.tile([0.0, 1.0], (3, 28, 14)),
        ]
    ).astype(np.float32)
    bits = _kernel_hash(images)
    assert bits.shape == (len(images), 64) and bits.dtype == bool
    np.testing.assert_array_equal(bits, hashing.average_hash(images))
    np.testing.assert_array_equal(bits[::4], _imagehash_bits(images[::4]))


@pytest.mark.parametrize(
    "shape", [(8, 8), (9, 8), (32, 32), (40, 3), (100, 20), (3, 5)], ids=str
)  # fmt: skip
def test_hash_tables_follow_pil_on_other_sizes(shape):
    # 8x8: no pass (PIL copies); 9x8 / 40x3: one side only; 100x20: vertical pass first
    # (Pillow >= 13); 3x5: upsampling on both axes
    x = np.random.default_rng(sum(shape)).random((20, *shape), dtype=np.float32)
    bits = _kernel_hash(x)
    np.testing.assert_array_equal(bits, hashing.average_hash(x))
    np.testing.assert_array_equal(bits, _imagehash_bits(x))


def test_hash_of_non_finite_pixels():
    x = np.tile(np.array([[np.nan, np.inf, -np.inf, 0.5]], np.float32), (2, 7, 7))
    np.testing.assert_array_equal(_kernel_hash(x), hashing.average_hash(x))


# -- the distances against the numpy path ------------------------------------------------------


def test_distances_match_numpy(fitted, cases):
    x, labels = cases
    ham_np, l1_np = fitted._numpy_distances(x, labels)
    parts = [fitted._jit.distances(x[s], labels[s], fitted.tie_break) for s in _chunks(len(x), 7)]
    ham, l1 = (np.concatenate(p) for p in zip(*parts, strict=True))
    np.testing.assert_array_equal(np.floor(ham), np.floor(ham_np))  # the Hamming distances
    np.testing.assert_allclose(ham - np.floor(ham), ham_np - np.floor(ham_np), rtol=1e-5)
    np.testing.assert_allclose(l1, l1_np, rtol=1e-5)


def test_scores_flags_and_corrections_match_numpy(fitted, twin, cases):
    x, labels = cases
    want = twin.score(Batch(x, None, labels))
    flagged = want.scores >= fitted.threshold
    assert 0.1 < flagged.mean() < 0.9  # both kinds are compared
    for size in (1, 3, CUTOFF):
        got = [fitted.score(Batch(x[s], None, labels[s])) for s in _chunks(len(x), size)]
        scores = np.concatenate([g.scores for g in got])
        np.testing.assert_allclose(scores, want.scores, rtol=1e-5)
        np.testing.assert_array_equal(scores >= fitted.threshold, flagged)
        np.testing.assert_array_equal(np.concatenate([g.corrected for g in got]), want.corrected)


def test_class_distances_match_numpy(fitted, twin, cases):
    x = cases[0]
    want = twin.class_distances(x)
    for binarize in (True, False):
        ref = want if binarize else fitted._numpy_class_distances(x)
        got = np.concatenate(
            [fitted._jit.class_distances(x[s], binarize) for s in _chunks(len(x), 4)]
        )
        assert got.shape == ref.shape == (len(x), 10) and got.dtype == ref.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        np.testing.assert_array_equal(got.argmin(1), ref.argmin(1))


def test_batch_sizes_give_the_same_scores(fitted, cases):
    x, labels = cases[0][:40], cases[1][:40]
    ref = [fitted.score(Batch(x[i : i + 1], None, labels[i : i + 1])) for i in range(40)]
    ref_scores = np.concatenate([r.scores for r in ref])
    ref_corrected = np.concatenate([r.corrected for r in ref])
    for size in (2, CUTOFF, CUTOFF + 1):  # CUTOFF + 1: the numpy path
        got = [fitted.score(Batch(x[s], None, labels[s])) for s in _chunks(40, size)]
        np.testing.assert_allclose(np.concatenate([g.scores for g in got]), ref_scores, rtol=1e-5)
        np.testing.assert_array_equal(np.concatenate([g.corrected for g in got]), ref_corrected)


def test_read_only_inputs_and_labels_need_no_new_compilation(fitted, cases):
    x, labels = cases[0][:3].copy(), cases[1][:3].copy()
    want = fitted.score(Batch(x, None, labels))
    compiled = {f: len(f.signatures) for f in (kernel.copy_logits, kernel.hash_distances)}
    x.flags.writeable = labels.flags.writeable = False  # as decoded requests are
    got = fitted.score(Batch(x, None, labels))
    np.testing.assert_array_equal(got.scores, want.scores)
    assert {f: len(f.signatures) for f in compiled} == compiled


def test_labels_out_of_range(fitted, cases, caplog):
    x = cases[0][:2]
    scores = fitted.score(Batch(x, None, np.array([3, 10]))).scores
    assert scores[1] == desvig_detector._FAR and scores[0] < desvig_detector._FAR
    with caplog.at_level(logging.WARNING, LOGGER):
        # straight to distances: numpy's answer, the kernel kept (the input was at fault)
        with pytest.raises(IndexError):
            fitted.distances(x, np.array([3, 10]))
        np.testing.assert_allclose(  # a negative label wraps, as numpy indexing does
            fitted.distances(x, np.array([-1, 3]))[0],
            fitted._numpy_distances(x, np.array([-1, 3]))[0],
            rtol=1e-5,
        )
    assert fitted._jit is not None and not caplog.records


# -- when the compiled path is off or broken ---------------------------------------------------


def _fresh(fitted):
    det = DesvigDetector()
    det.cgan, det.scales, det.threshold = fitted.cgan, fitted.scales, fitted.threshold
    return det


def test_no_jit_env_forces_numpy(fitted, cases, monkeypatch, caplog):
    x, labels = cases[0][:5], cases[1][:5]

    def boom(*args):
        raise AssertionError("the compiled path ran")

    det = _fresh(fitted)
    with caplog.at_level(logging.WARNING, LOGGER), monkeypatch.context() as mp:
        mp.setenv(desvig_detector.NO_JIT_ENV, "1")
        mp.setattr(kernel.Kernel, "distances", boom)
        mp.setattr(kernel.Kernel, "class_distances", boom)
        det.warm()
        got = det.score(Batch(x, None, labels))
    assert det._jit is None and not caplog.records  # off on purpose: no warning
    np.testing.assert_allclose(got.scores, fitted.score(Batch(x, None, labels)).scores, rtol=1e-5)
    det.warm()  # the variable unset: compiled again
    assert det._kernel(1) is not None


@pytest.mark.parametrize("method", ["distances", "class_distances"])
def test_a_failing_kernel_falls_back_with_one_warning(fitted, cases, monkeypatch, caplog, method):
    x, labels = cases[0][:6], cases[1][:6]
    det = _fresh(fitted)
    det.threshold = None  # every item corrected: class_distances runs too
    want = det.score(Batch(x, None, labels))
    calls = []

    def broken(self, *args):
        calls.append(method)
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(kernel.Kernel, method, broken)
    with caplog.at_level(logging.WARNING, LOGGER):
        for i in range(3):
            got = det.score(Batch(x[i : i + 2], None, labels[i : i + 2]))
            np.testing.assert_allclose(got.scores, want.scores[i : i + 2], rtol=1e-5)
            np.testing.assert_array_equal(got.corrected, want.corrected[i : i + 2])
    assert calls == [method]  # tried once, then the numpy path only
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated kernel failure" in warnings[0].getMessage()
    assert det._jit is None


def test_a_failing_warm_and_a_missing_numba_warn_once(fitted, monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("simulated compile failure")

    det = _fresh(fitted)
    with caplog.at_level(logging.WARNING, LOGGER):
        with monkeypatch.context() as mp:
            mp.setattr(kernel.Kernel, "warm", broken)
            det.warm()
            det.score(Batch(np.zeros((1, 1, 28, 28), np.float32), None, np.array([1])))
        assert det._jit is None and len(caplog.records) == 1
        assert "simulated compile failure" in caplog.records[0].getMessage()
        caplog.clear()
        with monkeypatch.context() as mp:  # numba cannot be imported
            mp.setitem(sys.modules, "numba", None)
            mp.delitem(sys.modules, kernel.__name__)
            det = _fresh(fitted)
            det.warm()
            det.warm()  # warned once: not retried
    assert det._jit is None and len(caplog.records) == 1
    assert "numba" in caplog.records[0].getMessage()
