"""Training Defed's denoisers (seed 001), one per Gaussian noise level, and their cache.

Each denoiser sees clean training images with Gaussian noise of its level added (sigma on
the 0-255 scale, as the authors', the result clipped to [0, 1]) and learns

    loss = alpha * CE(f(D(noisy)), true label) + MSE(D(noisy), clean)

through the frozen protected model f (the authors' 4-Defed-Train.py; alpha = 1). No
adversarial example is ever seen. ``ensure_denoisers`` keeps trained weights in
``<cache>/defed/`` keyed by the training data, the model's weights and every setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from controller.detectors.defed.net import DefedNet
from controller.detectors.nets import frozen, load_state, minibatches, state_arrays

__all__ = ["TrainConfig", "ensure_denoisers", "train_denoisers"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trained weights depend on besides the data and the model."""

    sigmas: tuple[float, ...] = (30.0, 75.0, 120.0)  # noise levels, 0-255 scale
    widths: tuple[int, ...] = (8, 16, 32)  # channels at H, H/2, H/4
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    alpha: float = 1.0  # weight of the classification loss
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def prefix(k: int) -> str:
    """The artifact's array prefix of denoiser k."""
    return f"denoiser{k}."


def train_denoisers(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    progress: bool = True,
) -> tuple[list[DefedNet], dict[str, Any]]:
    """One ``DefedNet`` per noise level on clean ``x`` [N, C, H, W] in [0, 1], labels
    ``y``, through the classifier ``module`` (frozen here). Returns the nets (eval mode)
    and a summary (seconds, final epoch losses per level)."""
    classifier = frozen(module)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    nets, levels = [], []
    start = time.perf_counter()
    for k, sigma in enumerate(cfg.sigmas):
        torch.manual_seed(cfg.seed + k)
        gen = torch.Generator().manual_seed(cfg.seed + k)
        rng = np.random.default_rng(cfg.seed + k)
        net = DefedNet(xt.shape[1], cfg.widths)
        opt = torch.optim.Adam(net.parameters(), cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.epochs, 1))
        net.train()
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        for epoch in range(cfg.epochs):
            sums = {"ce": 0.0, "mse": 0.0, "acc": 0.0}
            for idx in minibatches(len(xt), cfg.batch_size, rng):
                clean, labels = xt[idx], yt[idx]
                noise = torch.randn(clean.shape, generator=gen) * (sigma / 255.0)
                denoised = net((clean + noise).clamp(0.0, 1.0))
                logits = classifier(denoised)
                ce = F.cross_entropy(logits, labels)
                mse = F.mse_loss(denoised, clean)
                loss = cfg.alpha * ce + mse
                opt.zero_grad()
                loss.backward()
                opt.step()
                n = len(idx)
                sums["ce"] += ce.item() * n
                sums["mse"] += mse.item() * n
                sums["acc"] += float((logits.argmax(1) == labels).sum())
            sched.step()
            stats = {k_: v / len(xt) for k_, v in sums.items()}
            if progress:
                print(
                    f"  defed sigma={sigma:g} epoch {epoch + 1}/{cfg.epochs}:"
                    f" ce {stats['ce']:.4f} mse {stats['mse']:.5f}"
                    f" acc {stats['acc']:.3f} ({time.perf_counter() - t0:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
        net.eval()
        nets.append(net)
        levels.append({"sigma": sigma, **{k_: round(v, 5) for k_, v in stats.items()}})
    summary = {
        "seconds": round(time.perf_counter() - start, 2),
        "final": levels,
        "num_train": len(xt),
    }
    return nets, summary


def model_fingerprint(module: torch.nn.Module) -> str:
    """Short digest of a model's weights: the cache key's model part."""
    h = hashlib.sha1()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha1(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.ascontiguousarray(y, np.int64).tobytes())
    return h.hexdigest()[:12]


def ensure_denoisers(
    cache: str | Path,
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    progress: bool = True,
) -> tuple[list[DefedNet], dict[str, Any]]:
    """``train_denoisers`` cached as ``<cache>/defed/<data>-<model>-<settings>.npz``."""
    key = f"{data_fingerprint(x, y)}-{model_fingerprint(module)}-{cfg.key()}"
    path = Path(cache) / "defed" / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "summary"}
            summary = json.loads(str(z["summary"]))
        nets = []
        for k in range(len(cfg.sigmas)):
            net = DefedNet(x.shape[1], cfg.widths)
            load_state(net, arrays, prefix(k))
            nets.append(net)
        return nets, {**summary, "cached": str(path)}
    nets, summary = train_denoisers(module, x, y, cfg, progress=progress)
    arrays = {}
    for k, net in enumerate(nets):
        arrays.update(state_arrays(net, prefix(k)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, summary=np.array(json.dumps(summary)), **arrays)
    os.replace(tmp, path)
    return nets, summary
