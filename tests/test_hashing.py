"""The batched hashes against imagehash itself, bit for bit."""

import time

import imagehash
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from controller.detectors import hashing
from controller.training import datasets

REFERENCE = {"average": imagehash.average_hash, "dhash": imagehash.dhash, "phash": imagehash.phash}


def _pil(img: np.ndarray) -> Image.Image:
    # the reference side sees exactly the pixels the batched side sees
    return Image.fromarray(hashing.to_uint8(np.asarray(img).reshape(img.shape[-2:])))


def _reference_bits(kind: str, images: np.ndarray) -> np.ndarray:
    return np.array([REFERENCE[kind](_pil(im)).hash.flatten() for im in images])


@pytest.fixture(scope="module")
def mnist_images():
    x = datasets.load("mnist5k").x
    return x[np.random.default_rng(0).choice(len(x), 300, replace=False)]


@pytest.fixture(scope="module")
def random_images():
    return np.random.default_rng(1).random((300, 1, 28, 28), dtype=np.float32)


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_bit_exact_on_mnist(kind, mnist_images):
    assert np.array_equal(hashing.HASHES[kind](mnist_images), _reference_bits(kind, mnist_images))


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_bit_exact_on_random_images(kind, random_images):
    bits = hashing.HASHES[kind](random_images)
    assert bits.shape == (300, 64) and bits.dtype == bool
    assert np.array_equal(bits, _reference_bits(kind, random_images))


@pytest.mark.parametrize("kind", sorted(REFERENCE))
@pytest.mark.parametrize(
    "shape",
    [(20, 8, 8), (20, 9, 8), (10, 13, 37), (6, 100, 80), (5, 3, 2), (4, 32, 32)],
    ids=str,
)
def test_bit_exact_on_other_sizes(kind, shape):
    # 8x8 / 9x8 / 32x32 hit PIL's "same size: copy" path, 3x2 upsamples on both axes
    x = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    assert np.array_equal(hashing.HASHES[kind](x), _reference_bits(kind, x))


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_bit_exact_on_flat_and_saturated_images(kind):
    # ties everywhere: the DCT of a flat image is rounding noise, which must match too
    x = np.stack([np.zeros((28, 28)), np.ones((28, 28)), np.full((28, 28), 0.5)])
    x = np.concatenate([x, np.tile([0.0, 1.0], (3, 28, 14))]).astype(np.float32)
    assert np.array_equal(hashing.HASHES[kind](x), _reference_bits(kind, x))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(1, 40)),
        elements=st.integers(0, 255),
    ),
    st.sampled_from(sorted(REFERENCE)),
)
def test_bit_exact_property(images, kind):
    assert np.array_equal(hashing.HASHES[kind](images), _reference_bits(kind, images))


@pytest.mark.parametrize("size", [(8, 8), (9, 8), (32, 32), (5, 11), (40, 3)])
def test_resize_matches_pil_lanczos(size, random_images):
    ours = hashing.resize(random_images[:50], *size)
    theirs = np.array(
        [np.asarray(_pil(im).resize(size, Image.Resampling.LANCZOS)) for im in random_images[:50]]
    )
    assert ours.dtype == np.uint8 and np.array_equal(ours, theirs)


def test_input_layouts_agree(mnist_images):
    a = hashing.average_hash(mnist_images[:10])  # [N,1,H,W] float
    assert np.array_equal(a, hashing.average_hash(mnist_images[:10, 0]))  # [N,H,W]
    assert np.array_equal(a, hashing.average_hash(hashing.to_uint8(mnist_images[:10])))  # uint8
    assert np.array_equal(a[:1], hashing.average_hash(mnist_images[0, 0]))  # one [H,W]
    with pytest.raises(ValueError):
        hashing.average_hash(np.zeros((2, 3, 28, 28), np.float32))


def test_to_uint8_rounds_and_clips():
    x = np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 2.0], dtype=np.float32)
    assert hashing.to_uint8(x).tolist() == [0, 0, 0, 2, 128, 255, 255]


def test_non_finite_pixels_are_clipped_and_nan_is_zero():
    x = np.array([[np.nan, np.inf, -np.inf, 0.5]], np.float32)
    with np.errstate(invalid="raise"):  # no cast of NaN to uint8 anywhere
        assert hashing.to_uint8(x).tolist() == [[0, 255, 0, 128]]
        bits = hashing.average_hash(np.tile(x, (1, 4, 7)))
    assert np.array_equal(bits, hashing.average_hash(hashing.to_uint8(np.tile(x, (1, 4, 7)))))


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_hex_and_hamming_match_imagehash(kind, mnist_images):
    packed = hashing.pack(hashing.HASHES[kind](mnist_images[:40]))
    ref = [REFERENCE[kind](_pil(im)) for im in mnist_images[:40]]
    assert hashing.to_hex(packed) == [str(h) for h in ref]
    dist = hashing.pairwise_hamming(packed, packed)
    expected = np.array([[a - b for b in ref] for a in ref])
    assert np.array_equal(dist, expected)
    assert np.array_equal(hashing.hamming(packed[:-1], packed[1:]), np.diag(expected, 1))


def test_pack_unpack_round_trip():
    bits = np.random.default_rng(2).random((50, 64)) < 0.5
    packed = hashing.pack(bits)
    assert packed.dtype == np.uint64 and packed.shape == (50,)
    assert np.array_equal(hashing.unpack(packed), bits)
    first_bit = np.zeros((1, 64), bool)
    first_bit[0, 0] = True
    assert int(hashing.pack(first_bit)[0]) == 1 << 63  # row-major, most significant first


def test_speed_against_imagehash(capsys, random_images):
    """Measured and printed, not asserted: timing on shared CI cores is noise."""
    x = random_images[:64]
    lines = []
    for kind, ref in sorted(REFERENCE.items()):
        f = hashing.HASHES[kind]
        f(x)
        t1 = _best(lambda f=f: f(x[:1]), 50)
        t64 = _best(lambda f=f: f(x), 5) / 64
        pil = [_pil(im) for im in x]
        tref = _best(lambda ref=ref, pil=pil: [ref(im) for im in pil], 1) / 64
        lines.append(
            f"{kind:8s} batch 1: {t1 * 1e6:6.1f} us/img  batch 64: {t64 * 1e6:6.2f} us/img  "
            f"imagehash: {tref * 1e6:6.1f} us/img"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def _best(fn, number: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best
