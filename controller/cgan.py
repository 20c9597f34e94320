"""DeSVig's conditional GAN: G(z | label), D(x | label), and an encoder E(x, label) -> z.

DeSVig (seed 000, Table III step 6) draws a *copy* of each input for the label the model
claimed and compares copy and input by perceptual hash. A copy for label y is G(z*, y)
with z* the latent that makes G match the input: the paper finds it by "iteratively
optimizing"; here an amortised encoder E gets there in one forward pass (the latency
budget is 0.35 ms), and ``CGAN.invert`` refines it by gradient steps when asked.

The label must really condition the copy, or a copy for a wrong label would still look
like the input and nothing would be detected. Three things see to that:

- a small latent (8 numbers) with a KL prior (the encoder is a conditional VAE's): the
  class is given for free by the label, so carrying it through z only costs;
- a label-swap penalty: the copy of x for a wrong label y', G(E(x, y), y'), must pass the
  conditional discriminator as a real y' and be classified y' by its auxiliary head;
- a matching-aware discriminator (Reed et al. 2016): a real image with a wrong label is
  "fake", so D(x | y) really checks the label.

Networks are small MLPs (one hidden layer each for E and G), so that a copy costs two
matrix products per input. Training runs in torch (a few minutes on 2 cores, with
progress bars); the weights are then plain numpy arrays, and ``CGAN`` runs E and G in
numpy: the detector artifact is an ``.npz`` and scoring needs no autograd.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CGANConfig:
    """Training settings; every field is part of the cache key."""

    latent: int = 8
    hidden: int = 256  # E and G hidden width
    encoder_pool: int = 1  # the encoder sees the image average-pooled by this factor
    d_hidden: int = 256  # discriminator trunk width
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    beta: float = 1.0  # weight of the KL term (per image, against a sum-of-pixels recon loss)
    adv: float = 2.0  # weight of the adversarial loss on generated / swapped images
    swap: float = 8.0  # weight of the label-swap classification penalty
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


# -- numpy inference --------------------------------------------------------------------------
def pool(x: np.ndarray, k: int) -> np.ndarray:
    """[N, C, H, W] -> [N, C * H/k * W/k]: k x k average pooling, flattened."""
    n, c, h, w = x.shape
    if k == 1:
        return x.reshape(n, c * h * w)
    return x.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5)).reshape(n, -1)


_WEIGHTS = ("e_w1", "e_b1", "e_w2", "e_b2", "g_w1", "g_b1", "g_w2", "g_b2")


def _sigmoid(v: np.ndarray) -> np.ndarray:
    # 0.5 * tanh(v / 2) + 0.5: one transcendental, and no overflow warning for large |v|
    np.multiply(v, 0.5, out=v)
    np.tanh(v, out=v)
    np.multiply(v, 0.5, out=v)
    return np.add(v, 0.5, out=v)


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

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.w)

    def encode(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """E(x, label): [N, *shape] images -> [N, latent] (posterior mean)."""
        flat = pool(np.asarray(x, dtype=np.float32).reshape(len(labels), *self.shape), self.pool)
        h = flat @ self._e_x
        h += self._e_y[labels]
        np.maximum(h, 0, out=h)
        return h @ self.w["e_w2"] + self.w["e_b2"]

    def _hidden(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        pre = np.asarray(z, dtype=np.float32) @ self._g_z
        pre += self._g_y[labels]
        return pre

    def generate(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """G(z | label): [N, latent] -> [N, *shape] images in [0, 1]."""
        h = self._hidden(z, labels)
        np.maximum(h, 0, out=h)
        out = h @ self.w["g_w2"]
        out += self.w["g_b2"]
        return _sigmoid(out).reshape(len(labels), *self.shape)

    def copy(self, x: np.ndarray, labels: np.ndarray, refine_steps: int = 0) -> np.ndarray:
        """The input copy of ``x`` for ``labels``: G(E(x, y), y), refined if asked."""
        labels = np.asarray(labels, dtype=np.int64)
        z = self.encode(x, labels)
        if refine_steps > 0:
            z = self.invert(x, labels, z, steps=refine_steps)
        return self.generate(z, labels)

    def copies_all(self, x: np.ndarray, refine_steps: int = 0) -> np.ndarray:
        """Copies of every input for every class: [N, classes, *shape]. The encoder's
        image product is shared by all classes: only the label rows differ."""
        n, k = len(x), self.classes
        x = np.asarray(x, dtype=np.float32).reshape(n, *self.shape)
        h = (pool(x, self.pool) @ self._e_x)[:, None, :] + self._e_y[None]  # [N, k, hidden]
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
            g = _sigmoid(h @ self.w["g_w2"] + self.w["g_b2"])
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


# -- torch training ---------------------------------------------------------------------------
class Encoder(nn.Module):
    """E(x, y) -> (mean, log-variance) of the latent: one hidden layer."""

    def __init__(self, pixels: int, classes: int, cfg: CGANConfig) -> None:
        super().__init__()
        self.l1 = nn.Linear(pixels // cfg.encoder_pool**2 + classes, cfg.hidden)
        self.l2 = nn.Linear(cfg.hidden, 2 * cfg.latent)

    def forward(self, x: torch.Tensor, y1h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.l2(torch.relu(self.l1(torch.cat([x, y1h], 1)))).chunk(2, dim=1)


class Generator(nn.Module):
    """G(z | y) -> image in [0, 1]: one hidden layer."""

    def __init__(self, pixels: int, classes: int, cfg: CGANConfig) -> None:
        super().__init__()
        self.l1 = nn.Linear(cfg.latent + classes, cfg.hidden)
        self.l2 = nn.Linear(cfg.hidden, pixels)

    def forward(self, z: torch.Tensor, y1h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.l2(torch.relu(self.l1(torch.cat([z, y1h], 1)))))


class Discriminator(nn.Module):
    """D(x | y): projection discriminator (Miyato & Koyama 2018) + auxiliary class head."""

    def __init__(self, pixels: int, classes: int, cfg: CGANConfig) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(pixels, cfg.d_hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.d_hidden, cfg.d_hidden),
            nn.LeakyReLU(0.2),
        )
        self.real = nn.Linear(cfg.d_hidden, 1)
        self.embed = nn.Linear(classes, cfg.d_hidden, bias=False)
        self.cls = nn.Linear(cfg.d_hidden, classes)

    def forward(self, x: torch.Tensor, y1h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.real(h)[:, 0] + (self.embed(y1h) * h).sum(1), self.cls(h)


def train_cgan(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cfg: CGANConfig | None = None,
    *,
    progress: bool = True,
) -> tuple[CGAN, dict[str, Any]]:
    """Train E, G and D on clean ``x`` [N, C, H, W] in [0, 1] with labels ``y``.

    Returns the numpy CGAN and a summary (seconds, final losses, settings).
    """
    from tqdm.auto import tqdm

    cfg = cfg or CGANConfig()
    torch.manual_seed(cfg.seed)
    shape = tuple(int(s) for s in x.shape[1:])
    pixels = int(np.prod(shape))
    x = np.ascontiguousarray(x, np.float32)
    if cfg.encoder_pool > 1 and (shape[1] % cfg.encoder_pool or shape[2] % cfg.encoder_pool):
        raise ValueError(f"encoder_pool {cfg.encoder_pool} does not divide the image {shape}")
    xt = torch.from_numpy(x.reshape(len(x), pixels))
    xe = torch.from_numpy(pool(x, cfg.encoder_pool))  # what the encoder sees
    yt = torch.from_numpy(np.asarray(y, np.int64))
    enc = Encoder(pixels, num_classes, cfg)
    gen = Generator(pixels, num_classes, cfg)
    disc = Discriminator(pixels, num_classes, cfg)
    opt_g = torch.optim.Adam([*enc.parameters(), *gen.parameters()], cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), cfg.lr, betas=(0.5, 0.999))
    gen_rng = torch.Generator().manual_seed(cfg.seed)
    eye = torch.eye(num_classes)
    bce = F.binary_cross_entropy_with_logits
    start = time.perf_counter()
    stats: dict[str, float] = {}
    bar = tqdm(range(cfg.epochs), desc="cgan", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(xt), generator=gen_rng)
        sums = dict.fromkeys(("recon", "kl", "d", "adv", "swap_acc"), 0.0)
        for i in range(0, len(xt), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb, yb = xt[idx], yt[idx]
            n = len(idx)
            y1h = eye[yb]
            shift = torch.randint(1, num_classes, (n,), generator=gen_rng)
            ys = (yb + shift) % num_classes  # a wrong label for every image
            ys1h = eye[ys]
            yp = torch.randint(0, num_classes, (n,), generator=gen_rng)
            yp1h = eye[yp]
            mu, logvar = enc(xe[idx], y1h)
            z = mu + torch.randn(mu.shape, generator=gen_rng) * (0.5 * logvar).exp()
            rec = gen(z, y1h)
            swapped = gen(mu, ys1h)  # the copy of x for the wrong label
            prior = gen(torch.randn(mu.shape, generator=gen_rng), yp1h)
            ones, zeros = torch.ones(n), torch.zeros(n)

            # discriminator: real pairs real; generated, swapped and mismatched pairs fake
            d_real, c_real = disc(xb, y1h)
            d_mis, _ = disc(xb, ys1h)
            d_fake, _ = disc(prior.detach(), yp1h)
            d_swap, _ = disc(swapped.detach(), ys1h)
            loss_d = (
                bce(d_real, ones)
                + 0.5 * bce(d_mis, zeros)
                + 0.5 * bce(d_fake, zeros)
                + 0.5 * bce(d_swap, zeros)
                + F.cross_entropy(c_real, yb)
            )
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()

            # encoder + generator: reconstruct, stay near the prior, fool D, obey the label
            recon = F.binary_cross_entropy(rec, xb, reduction="sum") / n
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
            a_fake, c_fake = disc(prior, yp1h)
            a_swap, c_swap = disc(swapped, ys1h)
            adv = bce(a_fake, ones) + bce(a_swap, ones)
            cls = F.cross_entropy(c_fake, yp) + F.cross_entropy(c_swap, ys)
            loss_g = recon + cfg.beta * kl + cfg.adv * adv + cfg.swap * cls
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()

            sums["recon"] += recon.item() * n
            sums["kl"] += kl.item() * n
            sums["d"] += loss_d.item() * n
            sums["adv"] += adv.item() * n
            sums["swap_acc"] += float((c_swap.argmax(1) == ys).float().sum())
        stats = {k: v / len(xt) for k, v in sums.items()}
        bar.set_postfix(recon=f"{stats['recon']:.1f}", kl=f"{stats['kl']:.1f}")
    bar.close()
    w = {
        "e_w1": enc.l1.weight.T,
        "e_b1": enc.l1.bias,
        "e_w2": enc.l2.weight[: cfg.latent].T,  # the mean half
        "e_b2": enc.l2.bias[: cfg.latent],
        "g_w1": gen.l1.weight.T,
        "g_b1": gen.l1.bias,
        "g_w2": gen.l2.weight.T,
        "g_b2": gen.l2.bias,
    }
    arrays = {k: v.detach().numpy().copy() for k, v in w.items()}
    summary = {
        "seconds": round(time.perf_counter() - start, 2),
        "final": {k: round(v, 4) for k, v in stats.items()},
        "settings": dataclasses.asdict(cfg),
        "num_train": len(x),
    }
    return CGAN(arrays, shape), summary


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """Short digest of a training set: the cache key's data part."""
    h = hashlib.sha1(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.ascontiguousarray(y, np.int64).tobytes())
    return h.hexdigest()[:12]


def ensure_cgan(
    cache: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cfg: CGANConfig | None = None,
    *,
    progress: bool = True,
) -> tuple[CGAN, dict[str, Any]]:
    """``train_cgan`` cached as ``<cache>/cgan/<data digest>-<settings digest>.npz``.

    The key covers the training data and every setting, so a cached CGAN is reused only
    for exactly the training it stands for (once per machine for the demo and the tests).
    """
    cfg = cfg or CGANConfig()
    path = Path(cache) / "cgan" / f"{fingerprint(x, y)}-{cfg.key()}.npz"
    shape = tuple(int(s) for s in x.shape[1:])
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "summary"}
            summary = json.loads(str(z["summary"]))
        return CGAN(arrays, shape), {**summary, "cached": str(path)}
    model, summary = train_cgan(x, y, num_classes, cfg, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, summary=np.array(json.dumps(summary)), **model.arrays())
    os.replace(tmp, path)
    return model, summary
