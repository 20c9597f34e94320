"""The compiled near-copy kernel (openexample/_nearkernel.c) against the numpy path it
replaces on the agent's fast path: the same keys bit for bit, thumbnails equal to
rounding, and the same matches from a populated index; shapes and dtypes it does not
take go to numpy; short buffers are refused with a ValueError, never read past."""

from __future__ import annotations

import numpy as np
import pytest

from openexample import perceptual as P
from openexample.perceptual import NearIndex, perceptual

# `make test` installs the package with `pip install -e .`, which builds the kernel (a C
# compiler is part of the set-up): a missing kernel fails the first test below (a build
# problem to see), and the comparisons with numpy are skipped then.
needs_kernel = pytest.mark.skipif(
    P._nearkernel is None, reason="the compiled kernel was not built (no C compiler?)"
)


def test_the_suite_runs_with_the_kernel_built():
    assert P.KERNEL == "compiled", "pip install -e . did not build openexample/_nearkernel.c"


def _numpy_key(x: np.ndarray) -> tuple[int, np.ndarray]:
    key, thumb = P._key_and_thumb(x)
    return int(key), thumb.ravel()


def _inputs(mnist) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    xs = list(mnist.test.x[:300])
    xs += [rng.random((1, 28, 28), dtype=np.float32) for _ in range(50)]
    xs += [rng.normal(0, 1, (17, 33)).astype(np.float32) for _ in range(50)]  # signed
    xs += [rng.random((1, 64, 48), dtype=np.float32) * 255 for _ in range(20)]
    xs += [np.zeros((28, 28), np.float32), np.full((28, 28), 0.7, np.float32)]
    xs += [np.tile(np.arange(28, dtype=np.float32), (28, 1))]
    xs += [np.ones((1, 2), np.float32), rng.random((3, 2), dtype=np.float32)]
    return xs


@needs_kernel
def test_keys_and_thumbnails_agree_with_numpy(mnist):
    for x in _inputs(mnist):
        assert P._kernel_ready(x) is not None
        thumb = np.empty(72, np.float32)
        key = P._nearkernel.key_thumb(x, *P._kernel_ready(x), thumb)
        want_key, want_thumb = _numpy_key(x)
        assert key == want_key, x.shape
        np.testing.assert_allclose(thumb, want_thumb, rtol=0, atol=2e-6)
        assert perceptual(x)[0] == want_key  # the public function takes the kernel


@needs_kernel
def test_other_layouts_take_the_numpy_path_with_the_same_key(mnist):
    x = mnist.test.x[0]
    for other in (x.astype(np.float64), (x * 255).astype(np.uint8), x[:, :, ::2],
                  np.repeat(x, 3, axis=0), x.tolist()):  # fmt: skip
        arr = np.asarray(other)
        if arr.dtype != np.uint8 and arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[2] == 28:
            assert P._kernel_ready(other) is None  # float64: not the kernel's dtype
        assert perceptual(other)[0] == _numpy_key(np.asarray(other, np.float32))[0]


def _index(mnist, radius: int = 4) -> tuple[NearIndex, list[np.ndarray]]:
    """300 known attacks (FGSM-like sign steps of 0.3, all under one label) and 600
    queries: the attacks re-sent with light noise, then 300 other clean images."""
    x = mnist.test.x
    rng = np.random.default_rng(1)
    idx = NearIndex(radius)
    known = np.clip(x[:300] + 0.3 * rng.choice([-1.0, 1.0], x[:300].shape), 0, 1)
    known = known.astype(np.float32)
    for i, a in enumerate(known):
        idx.add("m", 3, *perceptual(a), value=i)
    noisy = np.clip(known + rng.normal(0, 0.01, known.shape), 0, 1).astype(np.float32)
    return idx, [*noisy, *x[300:600]]


@needs_kernel
def test_lookups_find_what_the_numpy_scan_finds(mnist, monkeypatch):
    idx, queries = _index(mnist)
    compiled = [idx.find_input("m", 3, q) for q in queries]
    monkeypatch.setattr(P, "_nearkernel", None)
    assert all(P._kernel_ready(q) is None for q in queries[:3])
    plain = [idx.find_input("m", 3, q) for q in queries]
    assert compiled == plain
    assert sum(f is not None for f in compiled[:300]) >= 270  # re-sent attacks: refused
    assert sum(f is not None for f in compiled[300:]) <= 6  # clean images: hardly ever
    assert idx.find_input("m", 4, queries[0]) is None and idx.find_input("n", 3, queries[0]) is None


@needs_kernel
def test_the_closest_match_wins_and_ties_go_to_the_oldest(mnist):
    x = mnist.test.x[0]
    idx = NearIndex(8)
    key, sketch = perceptual(x)
    idx.add("m", 0, key ^ 0b11, sketch, "two bits off")
    idx.add("m", 0, key ^ 0b1, sketch, "one bit off")
    idx.add("m", 0, key ^ 0b10, sketch, "one bit off too")
    assert idx.find_input("m", 0, x) == ("one bit off", 1)
    idx.remove("one bit off")
    assert idx.find_input("m", 0, x) == ("one bit off too", 1)


@needs_kernel
def test_short_buffers_are_refused():
    rows, cols = P._operators(28, 28)
    out = np.empty(72, np.float32)
    with pytest.raises(ValueError, match="img"):
        P._nearkernel.key_thumb(np.zeros((27, 28), np.float32), 28, 28, rows, cols, out)
    with pytest.raises(ValueError, match="thumb_out"):
        P._nearkernel.key_thumb(np.zeros((28, 28), np.float32), 28, 28, rows, cols, out[:10])
    with pytest.raises(ValueError, match="keys"):
        P._nearkernel.lookup(
            np.zeros((28, 28), np.float32), 28, 28, rows, cols, np.zeros(2, np.uint64), 3,
            np.zeros((3, 8, 9), np.float32), 4, 0.1, 8, 56,
        )  # fmt: skip
    with pytest.raises(ValueError, match="image"):
        P._nearkernel.key_thumb(np.zeros(4, np.float32), 1, 1, rows, cols, out)


def _kernel_in_child(call: str) -> tuple[int, str]:
    """Run one kernel call in a child process (a wild read kills it, not pytest)."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from openexample import _nearkernel as k, perceptual as P\n"
        "rows, cols = P._operators(28, 28)\n"
        "img = np.random.default_rng(0).random((28, 28), dtype=np.float32)\n"
        "keys, thumbs = np.zeros(4, np.uint64), np.zeros((4, 8, 9), np.float32)\n"
        "out = np.empty(72, np.float32)\n"
        "try:\n"
        f"    {call}\n"
        "except (ValueError, TypeError) as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


@needs_kernel
@pytest.mark.parametrize(
    "call",
    [
        # n * 8 wraps to 0 in 64 bits: the scan then read far past the 4 keys (SIGSEGV)
        "k.lookup(img, 28, 28, rows, cols, keys, 2**62, thumbs, 64, 1e9, 0, 64)",
        "k.lookup(img, 28, 28, rows, cols, keys, 2**61 + 1, thumbs, 64, 1e9, 0, 64)",
        "k.lookup(img, 28, 28, rows, cols, keys, 5, thumbs, 64, 1e9, 0, 64)",
        "k.lookup(img, 28, 28, rows, cols, keys, -1, thumbs, 4, 0.1, 8, 56)",  # SystemError
        "k.key_thumb(img, 2**40, 28, rows, cols, out)",  # OverflowError
        "k.lookup(img, 28, 28, rows, cols, keys, 2**70, thumbs, 4, 0.1, 8, 56)",
        # the right byte length at an odd address: unaligned float loads
        "k.key_thumb(np.frombuffer(bytearray(28 * 28 * 4 + 1), np.uint8)[1:], 28, 28,"
        " rows, cols, out)",
        "k.key_thumb(img[:, ::2], 28, 14, rows, cols, out)",  # not contiguous
        "k.key_thumb(img.astype(np.float64), 28, 28, rows, cols, out)",  # wrong dtype: bytes
        "k.key_thumb(img, 28, 28, rows, cols, b'x' * 288)",  # read-only output
    ],
)
def test_any_python_arguments_get_a_value_or_type_error(call):
    rc, text = _kernel_in_child(call)
    assert rc == 0, text
    if "float64" not in call:  # float64: twice the bytes needed, read within the buffer
        assert text.split(" ", 1)[0] in ("ValueError", "TypeError"), text


@needs_kernel
def test_misaligned_inputs_take_the_numpy_path(mnist):
    x = mnist.test.x[0].reshape(28, 28)
    raw = np.frombuffer(bytearray(x.nbytes + 1), np.uint8)[1:]
    odd = raw.view(np.float32).reshape(28, 28)  # same bytes, at an odd address
    odd[...] = x
    assert not odd.flags.aligned and P._kernel_ready(odd) is None
    assert perceptual(odd) == perceptual(x)
