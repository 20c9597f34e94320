"""The input copy in numpy: DeSVig's encoder E(x, y) -> z, generator G(z | y), inversion.

Weights come from gan.py beside this file (trained in torch); here they are float32 arrays, so
scoring a batch is a few matrix products with no torch, and the iterative inversion (the
paper's "iteratively optimize", Table III step 6) has its gradient written out.
"""

from __future__ import annotations

import numpy as np

from controller.detectors.arrays import pool, sigmoid_

_SPARSE_MAX_INPUTS = 16  # up to this many inputs, the encoder may skip zero pixels
_WEIGHTS = ("e_w1", "e_b1", "e_w2", "e_b2", "g_w1", "g_b1", "g_w2", "g_b2")


def squash_halved(v: np.ndarray) -> np.ndarray:
    """The output layer's sigmoid from halved logits, in place: tanh(v) * 0.5 + 0.5 (see
    ``CGAN.__init__``); one definition for the numpy path and the compiled one (kernel.py)."""
    np.tanh(v, out=v)
    v *= np.float32(0.5)
    v += np.float32(0.5)
    return v


class CGAN:
    """Encoder + generator weights (float32 numpy) and the copy operations on batches.

    Layout (rows = inputs of a layer, so a forward pass is ``x @ w + b``):
    ``e_w1`` [pixels + classes, hidden], ``e_w2`` [hidden, latent] (the posterior mean),
    ``g_w1`` [latent + classes, hidden], ``g_w2`` [hidden, pixels]. The label's one-hot
    rows are gathered instead of multiplied.
    """

    def __init__(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
        self.w = {k: np.ascontiguousarray(arrays[k], dtype=np.float32) for k in _WEIGHTS}
        self.shape = tuple(int(s) for s in shape)  # one image: (C, H, W)
        self.pixels = int(np.prod(self.shape))
        self.latent = int(self.w["e_w2"].shape[1])
        self.classes = int(self.w["g_w1"].shape[0] - self.latent)
        seen = self.w["e_w1"].shape[0] - self.classes  # pixels the encoder sees
        self.pool = round((self.pixels / seen) ** 0.5)
        # split the first layers: the image / latent part, and the label rows
        self._e_x, self._e_y = self.w["e_w1"][:seen], self.w["e_w1"][seen:]
        self._g_z, self._g_y = self.w["g_w1"][: self.latent], self.w["g_w1"][self.latent :]
        self._e_y = self._e_y + self.w["e_b1"]  # fold the biases into the label rows
        self._g_y = self._g_y + self.w["g_b1"]
        # the output layer halved: sigmoid(v) = 0.5 * tanh(v / 2) + 0.5, and halving is
        # exact in floating point, so (h @ w2 + b2) / 2 comes out of the product bit for bit
        self._g_w2_half = self.w["g_w2"] * np.float32(0.5)
        self._g_b2_half = self.w["g_b2"] * np.float32(0.5)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.w)

    def _image_product(self, x: np.ndarray) -> np.ndarray:
        """The encoder's first layer on the image, [N, hidden], without the label rows.

        For a few inputs the product reads every weight row once per call, and those
        rows (~0.8 MB for MNIST) are mostly not in cache by then: it then skips the rows
        of pixels that are 0 in every input, when they are at least half of them (MNIST:
        ~80% at batch 1). The sum is the same, in another order (float32 rounding).
        """
        n = len(x)
        x = np.asarray(x, dtype=np.float32)
        if self.pool == 1:
            flat = x.reshape(n, self.pixels)
        else:
            flat = pool(x.reshape(n, *self.shape), self.pool)
        if n <= _SPARSE_MAX_INPUTS:
            (cols,) = (flat[0] if n == 1 else np.logical_or.reduce(flat != 0)).nonzero()
            if 2 * len(cols) <= flat.shape[1]:
                return flat[:, cols] @ self._e_x.take(cols, axis=0)
        return flat @ self._e_x

    def encode(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """E(x, label): [N, *shape] images -> [N, latent] (posterior mean)."""
        h = self._image_product(x)
        h += self._e_y[labels]
        np.maximum(h, 0, out=h)
        z = h @ self.w["e_w2"]
        z += self.w["e_b2"]
        return z

    def _hidden(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        pre = np.asarray(z, dtype=np.float32) @ self._g_z
        pre += self._g_y[labels]
        return pre

    def generate(
        self, z: np.ndarray, labels: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """G(z | label): [N, latent] -> [N, *shape] images in [0, 1]; ``out``, when given,
        is a float32 [N, pixels] C-contiguous array the images are written to."""
        h = self._hidden(z, labels)
        np.maximum(h, 0, out=h)
        # sigmoid_ with its first halving folded into the weights (see __init__)
        out = np.matmul(h, self._g_w2_half, out=out)
        out += self._g_b2_half
        return squash_halved(out).reshape(len(labels), *self.shape)

    def copy(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        refine_steps: int = 0,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The input copy of ``x`` for ``labels``: G(E(x, y), y), refined if asked
        (``out``: see ``generate``)."""
        labels = np.asarray(labels, dtype=np.int64)
        z = self.encode(x, labels)
        if refine_steps > 0:
            z = self.invert(x, labels, z, steps=refine_steps)
        return self.generate(z, labels, out)

    def copies_all(self, x: np.ndarray, refine_steps: int = 0) -> np.ndarray:
        """Copies of every input for every class: [N, classes, *shape]. The encoder's
        image product is shared by all classes: only the label rows differ."""
        n, k = len(x), self.classes
        x = np.asarray(x, dtype=np.float32).reshape(n, *self.shape)
        h = self._image_product(x)[:, None, :] + self._e_y[None]  # [N, k, hidden]
        np.maximum(h, 0, out=h)
        z = h.reshape(n * k, -1) @ self.w["e_w2"] + self.w["e_b2"]
        labels = np.tile(np.arange(k), n)
        if refine_steps > 0:
            z = self.invert(np.repeat(x, k, axis=0), labels, z, steps=refine_steps)
        return self.generate(z, labels).reshape(n, k, *self.shape)

    def invert(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        z0: np.ndarray | None = None,
        *,
        steps: int = 50,
        lr: float = 0.05,
        prior: float = 1e-3,
    ) -> np.ndarray:
        """Iterative inversion: Adam on z to minimise ||G(z, y) - x||^2 + prior ||z||^2.

        The paper's "iteratively optimize" (Table III step 6). Starts from ``z0`` (the
        encoder's guess when given, else 0); the gradient of the one-hidden-layer
        generator is written out, so this needs no autograd either.
        """
        labels = np.asarray(labels, dtype=np.int64)
        target = np.asarray(x, dtype=np.float32).reshape(len(labels), self.pixels)
        z = np.zeros((len(labels), self.latent), np.float32) if z0 is None else z0.copy()
        m, v = np.zeros_like(z), np.zeros_like(z)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for t in range(1, steps + 1):
            pre = self._hidden(z, labels)
            h = np.maximum(pre, 0)
            g = sigmoid_(h @ self.w["g_w2"] + self.w["g_b2"])
            d_out = 2.0 * (g - target) * g * (1.0 - g)  # d loss / d logits
            d_h = (d_out @ self.w["g_w2"].T) * (pre > 0)
            grad = d_h @ self._g_z.T + 2.0 * prior * z
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad * grad
            z = z - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        return z.astype(np.float32)

    def sample(self, labels: np.ndarray, seed: int = 0) -> np.ndarray:
        """G(z, y) for z drawn from the prior: what the CGAN believes each class looks like."""
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((len(labels), self.latent)).astype(np.float32)
        return self.generate(z, np.asarray(labels, dtype=np.int64))
