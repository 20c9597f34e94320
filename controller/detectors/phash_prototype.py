"""Perceptual-hash prototypes per class: the DeSVig discriminator without the CGAN yet.

DeSVig (seed 000, Table III steps 11-16) hashes the input and a copy the CGAN draws for
the claimed label and compares the two by Hamming distance. Until the CGAN exists, the
"copy" is the closest of K stored exemplars of the claimed class: fit keeps, per class,
the average hashes of up to K representatives of the clean training images (k-medoids
on Hamming distance, seeded by farthest-point from the medoid: deterministic).

score = dist(claimed class) - dist(all other classes): an input that looks more like some
other class than the one the model named scores high. corrected = the nearest class.
With ``temperature=0``, dist is the minimum Hamming distance to a set's prototypes. By
default it is a soft minimum, -T log sum exp(-d / T) with T = 1: it tends to the minimum
as T -> 0, and it breaks the many ties of integer distances (which made the calibrated
FPR overshoot ~2x at 5%) and counts how many prototypes agree, which on mnist5k raised
the ROC-AUC against FGSM 0.3 from 0.81 to 0.88.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from controller.detectors import hashing
from controller.detectors.base import Batch, Detector, Scores

_FAR = 65  # more than any Hamming distance between 64-bit hashes
_MAX_CANDIDATES = 4096  # per class: bounds fit memory (a 4096^2 uint8 distance matrix)


def _medoid(d: np.ndarray) -> int:
    return int(d.sum(axis=1, dtype=np.int64).argmin())


def choose_prototypes(hashes: np.ndarray, k: int, iterations: int = 5) -> np.ndarray:
    """Indices of up to ``k`` representatives of packed ``hashes`` (k <= 0: all distinct)."""
    unique, first = np.unique(hashes, return_index=True)
    if k <= 0 or len(unique) <= k:
        return np.sort(first)
    if len(unique) > _MAX_CANDIDATES:
        keep = np.sort(np.random.default_rng(0).choice(len(unique), _MAX_CANDIDATES, False))
        unique, first = unique[keep], first[keep]
    d = hashing.pairwise_hamming(unique, unique)
    # farthest-point seeding from the medoid spreads the K seeds over the class's modes
    chosen = [_medoid(d)]
    nearest = d[chosen[0]].copy()
    while len(chosen) < k:
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        np.minimum(nearest, d[nxt], out=nearest)
    # a few k-medoids rounds: move each seed to the medoid of the hashes nearest to it
    for _ in range(iterations):
        assign = d[:, chosen].argmin(axis=1)
        moved = []
        for j, c in enumerate(chosen):
            members = np.flatnonzero(assign == j)
            moved.append(int(members[_medoid(d[np.ix_(members, members)])]) if members.size else c)
        if moved == chosen:
            break
        chosen = moved
    return np.sort(first[np.unique(chosen)])


class PhashPrototypeDetector(Detector):
    name = "phash_prototype"
    can_purify = True  # corrected: the class with the nearest prototypes

    def __init__(self, k: int = 256, hash: str = "average", temperature: float = 1.0) -> None:
        super().__init__()
        if hash not in hashing.HASHES:
            raise ValueError(f"hash must be one of {sorted(hashing.HASHES)}, got {hash!r}")
        if temperature != 0 and temperature < 0.1:  # below ~0.1, exp(-64 / T) underflows
            raise ValueError(f"temperature must be 0 (hard min) or >= 0.1, got {temperature}")
        self.k = int(k)
        self.hash = hash
        self.temperature = float(temperature)
        # exp(-d / T) for every possible distance: a gather instead of an exp per pair
        self._weights = np.exp(-np.arange(_FAR + 1) / temperature) if temperature else None
        self._set_prototypes(np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "hash": self.hash, "temperature": self.temperature}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"prototypes": self.prototypes, "proto_labels": self.proto_labels}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._set_prototypes(arrays["prototypes"], arrays["proto_labels"])

    def _set_prototypes(self, prototypes: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(labels, kind="stable")  # grouped by label: one reduceat per score
        self.prototypes = np.asarray(prototypes, np.uint64)[order]
        self.proto_labels = np.asarray(labels, np.int64)[order]
        self._present, self._starts = np.unique(self.proto_labels, return_index=True)

    def hashes(self, inputs: np.ndarray) -> np.ndarray:
        """Packed hashes [N] uint64 of images [N,1,H,W] / [N,H,W]."""
        return hashing.pack(hashing.HASHES[self.hash](inputs))

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        h = self.hashes(x)
        picks = [np.flatnonzero(y == c) for c in range(len(self.meta["classes"]))]
        picks = [idx[choose_prototypes(h[idx], self.k)] for idx in picks]
        chosen = np.concatenate(picks)
        self._set_prototypes(h[chosen], y[chosen])

    def class_distances(self, inputs: np.ndarray) -> np.ndarray:
        """[N, C] (soft-)min Hamming distance from each input to each class's prototypes."""
        if self.prototypes.size == 0:
            raise RuntimeError("phash_prototype is not fitted")
        d = hashing.pairwise_hamming(self.hashes(inputs), self.prototypes)
        classes = len(self.meta.get("classes", [])) or int(self._present[-1]) + 1
        out = np.full((d.shape[0], classes), float(_FAR))
        if self._weights is None:
            out[:, self._present] = np.minimum.reduceat(d, self._starts, axis=1)
        else:
            w = np.add.reduceat(self._weights[d], self._starts, axis=1)
            out[:, self._present] = -self.temperature * np.log(w)
        return out

    def score(self, batch: Batch) -> Scores:
        dist = self.class_distances(batch.inputs)
        n, c = dist.shape
        labels = np.asarray(batch.labels, dtype=np.int64)
        rows = np.arange(n)[(labels >= 0) & (labels < c)]
        claimed = np.full(n, float(_FAR))  # a label with no prototypes is as far as it gets
        claimed[rows] = dist[rows, labels[rows]]
        others = dist.copy()
        others[rows, labels[rows]] = np.inf
        if self._weights is None:
            other = others.min(axis=1)
        else:  # soft-min over the union of the other classes' prototypes
            t = self.temperature
            other = -t * np.log(np.exp(-others / t).sum(axis=1))
        return Scores(claimed - other, dist.argmin(axis=1).astype(np.int64))
