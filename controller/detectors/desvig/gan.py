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
matrix products per input. Training runs here in torch (about 25 s on 2 idle cores, with
a progress bar); the weights are then plain numpy arrays, and ``CGAN``
(inversion.py beside this file) runs E and G, and the iterative inversion, in numpy: the
detector artifact is an ``.npz`` and scoring runs no torch and no autograd.
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

from controller.detectors.arrays import pool
from controller.detectors.desvig.inversion import CGAN

__all__ = ["CGAN", "CGANConfig", "ensure_cgan", "fingerprint", "train_cgan"]


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
