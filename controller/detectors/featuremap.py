"""Seed 004 (Tan, Gao & Li, "A Simple Structure For Building A Robust Model", 2022): a
small transformer that tells adversarial inputs from clean ones by the protected model's
intermediate feature maps.

The network (the seed's Fig. 2, its detection head alone):

- Embedding: each feature map [C_i, H_i, W_i] is normalised per channel (mean and std of
  clean training activations) and goes through its own strided 3x3 conv to ``dim``
  channels on the token grid of the smallest map (stride ceil(H_i / H); an adaptive
  average pool fixes an odd remainder). The maps' tokens are stitched into one sequence.
- A CLS token and learned positional embeddings, ``depth`` pre-norm transformer encoder
  layers (``heads`` heads, GELU MLP of 2 x dim), a layer norm on the CLS token, and a
  linear head with two classes (clean, adversarial).
- Trained with cross-entropy on the activations of clean training images and of their
  adversarial versions, made offline with IBM ART against the protected model (the
  mixture of controller/training/adversarial.py, one attack per image drawn with a
  probability per kind: FGSM and PGD at eps 0.1-0.3 by default, so DeepFool and C&W are
  unseen attacks). ``adv_ratio`` is the adversarial share of the training set (the
  seed's 0.25 / 0.5 / 0.75; README "The detector family" says which is kept).
- Score: the logit of "adversarial" minus that of "clean"; calibrated like every
  detector (``calibrate``: the clean quantile at the pipeline's FPR).

Activations come from PKG_IN when the agent sends them (``Batch.activations``, float16
allowed) and are otherwise computed from the controller's reference copy of the model
(controller/activations.py: forward hooks on a torch module, the module graphs of a
TorchScript one). ``layers`` are the model's module names (``features.2``); the example
CNN's two pooled conv blocks by default. ART and controller/training are imported inside
``_fit`` only; generated adversarials are kept in ``cache/featuremap/adv-DIGEST.npz``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from controller.activations import Taps, taps_for
from controller.detectors import nets
from controller.detectors.arrays import as_float
from controller.detectors.base import Batch, Detector, Scores

LAYERS = ("features.2", "features.5")
Shape = tuple[int, int, int]


class FeatureMapNet(nn.Module):
    """Feature maps [N, C_i, H_i, W_i] (one per layer) -> logits [N, 2]."""

    def __init__(self, shapes: Sequence[Shape], dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        gh, gw = min(s[1] for s in shapes), min(s[2] for s in shapes)
        self.grid = (gh, gw)
        self.embeds = nn.ModuleList(
            nn.Conv2d(c, dim, 3, stride=(math.ceil(h / gh), math.ceil(w / gw)), padding=1)
            for c, h, w in shapes
        )
        for i, (c, _, _) in enumerate(shapes):  # per-channel normalisation, set at fit
            self.register_buffer(f"mean{i}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"std{i}", torch.ones(1, c, 1, 1))
        tokens = len(shapes) * gh * gw
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        tokens = []
        for i, (m, embed) in enumerate(zip(maps, self.embeds, strict=True)):
            m = (m - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            t = embed(m)
            if t.shape[-2:] != self.grid:
                t = F.adaptive_avg_pool2d(t, self.grid)
            tokens.append(t.flatten(2).transpose(1, 2))
        h = torch.cat([self.cls.expand(len(tokens[0]), -1, -1), *tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h)[:, 0]))


class FeatureMapDetector(Detector):
    name = "featuremap"
    needs_model = True  # activations from the reference copy when the agent sends none
    fits_through_model = True  # ART's gradient attacks through the model's torch module
    needs_activations = True  # reads Batch.activations when PKG_IN carries them

    def __init__(
        self,
        layers: Sequence[str] = LAYERS,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        epochs: int = 8,
        batch_size: int = 64,
        lr: float = 1e-3,
        adv_ratio: float = 0.5,
        num_train: int | None = None,
        attacks: Sequence[Mapping[str, Any]] | None = None,
        seed: int = 0,
        *,
        cache: str | Path | None = None,
        progress: bool = True,
        threads: int = 1,
    ) -> None:
        """``layers``: the model's module names whose outputs the detector reads;
        ``adv_ratio``: the adversarial share of the training set; ``attacks``: the ART
        mixture as ``TrainingAttack`` fields (None: FGSM and PGD at eps 0.1-0.3);
        ``cache``, ``progress`` and ``threads`` (torch threads while fitting) are not
        saved in the artifact."""
        super().__init__()
        self.layers = [str(n) for n in layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct and non-empty: {self.layers}")
        self.dim, self.depth, self.heads = int(dim), int(depth), int(heads)
        if self.depth < 1 or self.heads < 1 or self.dim < 1 or self.dim % self.heads:
            raise ValueError("depth, heads >= 1 and dim a positive multiple of heads")
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size >= 1 and lr > 0")
        self.adv_ratio = float(adv_ratio)
        if not 0.0 < self.adv_ratio < 1.0:
            raise ValueError(f"adv_ratio must be in (0, 1), got {adv_ratio}")
        if num_train is not None and int(num_train) < 4:
            raise ValueError(f"num_train must be >= 4, got {num_train}")
        self.num_train = None if num_train is None else int(num_train)
        self.attacks = None if attacks is None else [_attack(a) for a in attacks]
        if self.attacks is not None and not self.attacks:
            raise ValueError("attacks: an empty mixture (None for the default one)")
        self.seed = int(seed)
        self.cache, self.progress, self.threads = cache, progress, max(1, int(threads))
        self.shapes: list[Shape] = []
        self.net: FeatureMapNet | None = None
        self._taps: tuple[object, Taps] | None = None  # (the model it was built for, taps)

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "dim": self.dim,
            "depth": self.depth,
            "heads": self.heads,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "adv_ratio": self.adv_ratio,
            "num_train": self.num_train,
            "attacks": self.attacks,
            "seed": self.seed,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        if self.net is None:
            raise RuntimeError("featuremap is not fitted")
        return {**nets.state_arrays(self.net), "shapes": np.asarray(self.shapes, np.int64)}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.shapes = [tuple(int(d) for d in s) for s in arrays["shapes"]]  # type: ignore[misc]
        self.net = FeatureMapNet(self.shapes, self.dim, self.depth, self.heads)
        nets.load_state(self.net, arrays)
        nets.frozen(self.net)

    # -- activations ------------------------------------------------------------------------
    def activations_read(self) -> dict[str, tuple[int, ...]]:
        """{layer: one item's shape} this detector reads: what the controller asks agents
        for (FEATURES_REQUEST). Shapes are known once fitted (``()`` before)."""
        if not self.shapes:
            return {n: () for n in self.layers}
        return {n: tuple(s) for n, s in zip(self.layers, self.shapes, strict=True)}

    def taps(self) -> Taps:
        """The taps on the reference model (built once per attached model)."""
        if self.model is None:
            raise ValueError(
                "featuremap needs activations in PKG_IN or a reference model to compute them"
            )
        if self._taps is None or self._taps[0] is not self.model:
            self._taps = (self.model, taps_for(self.model, self.layers))
        return self._taps[1]

    def feature_maps(self, batch: Batch) -> list[torch.Tensor]:
        """The layers' activations for ``batch``: those PKG_IN carries, else the
        reference model's (float32 tensors)."""
        if all(n in batch.activations for n in self.layers):
            maps = [nets.as_tensor(batch.activations[n]) for n in self.layers]
        else:
            got = self.taps()(nets.as_tensor(as_float(batch.inputs)))
            maps = [got[n] for n in self.layers]
        if self.shapes:
            for name, m, shape in zip(self.layers, maps, self.shapes, strict=True):
                if tuple(m.shape[1:]) != shape:
                    raise ValueError(
                        f"featuremap: activation {name!r} has shape {tuple(m.shape[1:])},"
                        f" trained for {shape}"
                    )
        return maps

    # -- learning ---------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.model is None:
            raise ValueError("featuremap needs the model: fit(..., model=...)")
        module = nets.module_of(self.model, "featuremap")
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._fit_on(module, as_float(x), y)
        finally:
            torch.set_num_threads(threads)

    def _fit_on(self, module: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
        if self.num_train is not None:
            x, y = x[: self.num_train], y[: self.num_train]
        start = time.perf_counter()
        adv, kind, meta = self._adversarials(module, x)
        rng = np.random.default_rng(self.seed)
        # the adversarial share: every clean image and a subset of the adversarials (or
        # the other way round above 0.5), each adversarial drawn from another image
        n = len(x)
        if self.adv_ratio <= 0.5:
            n_clean, n_adv = n, round(n * self.adv_ratio / (1 - self.adv_ratio))
        else:
            n_clean, n_adv = round(n * (1 - self.adv_ratio) / self.adv_ratio), n
        ci = np.sort(rng.permutation(n)[:n_clean])
        ai = np.sort(rng.permutation(n)[:n_adv])
        taps = self.taps()
        clean_maps = taps.numpy(x[ci])
        adv_maps = taps.numpy(adv[ai])
        self.shapes = [tuple(int(d) for d in clean_maps[n].shape[1:]) for n in self.layers]  # type: ignore[misc]
        for s in self.shapes:
            if len(s) != 3:
                raise ValueError(f"featuremap reads feature maps [C, H, W], got a layer of {s}")
        torch.manual_seed(self.seed)
        self.net = FeatureMapNet(self.shapes, self.dim, self.depth, self.heads)
        for i, name in enumerate(self.layers):  # clean per-channel statistics
            a = clean_maps[name]
            getattr(self.net, f"mean{i}").copy_(
                torch.from_numpy(a.mean((0, 2, 3))).view(1, -1, 1, 1)
            )
            std = torch.from_numpy(a.std((0, 2, 3))).clamp_min(1e-3)
            getattr(self.net, f"std{i}").copy_(std.view(1, -1, 1, 1))
        maps = [np.concatenate([clean_maps[n], adv_maps[n]]) for n in self.layers]
        target = np.r_[np.zeros(len(ci), np.int64), np.ones(len(ai), np.int64)]
        summary = self._train(maps, target, rng)
        self.meta["featuremap"] = {
            **meta,
            "adversarials_per_attack": np.bincount(
                kind[ai], minlength=len(meta["attacks"])
            ).tolist(),
            "num_clean": len(ci),
            "num_adversarial": len(ai),
            "shapes": [list(s) for s in self.shapes],
            **summary,
            "seconds": round(time.perf_counter() - start, 1),
        }

    def _train(self, maps: list[np.ndarray], target: np.ndarray, rng: np.random.Generator) -> dict:
        net = self.net
        assert net is not None
        tensors = [torch.from_numpy(np.ascontiguousarray(m)) for m in maps]
        labels = torch.from_numpy(target)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=1e-4)
        steps = self.epochs * math.ceil(len(target) / self.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=steps)
        net.train()
        t0 = time.perf_counter()
        loss_sum = acc = 0.0
        for epoch in range(self.epochs):
            loss_sum, right = 0.0, 0
            for idx in nets.minibatches(len(target), self.batch_size, rng):
                i = torch.from_numpy(idx)
                out = net([t[i] for t in tensors])
                loss = F.cross_entropy(out, labels[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(idx)
                right += int((out.argmax(1) == labels[i]).sum())
            acc = right / len(target)
            if self.progress:
                print(
                    f"    featuremap: epoch {epoch + 1}/{self.epochs} ce"
                    f" {loss_sum / len(target):.4f} acc {acc:.3f}"
                    f" ({time.perf_counter() - t0:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
        nets.frozen(net)
        return {
            "train_ce": round(loss_sum / len(target), 5),
            "train_accuracy": round(acc, 4),
            "train_seconds": round(time.perf_counter() - t0, 1),
        }

    def _adversarials(
        self, module: nn.Module, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One adversarial version of each training input (the cache's when it has them),
        the index of its attack, and what the manifest records about them."""
        import art

        from controller.training.adversarial import (
            DEFAULT_ATTACKS,
            TrainingAttack,
            mixed_adversarials,
        )

        specs = (
            list(DEFAULT_ATTACKS)
            if self.attacks is None
            else [
                TrainingAttack(a["art_class"], dict(a["params"]), a["weight"]) for a in self.attacks
            ]
        )
        mixture = [
            {"art_class": s.art_class, "params": s.params, "weight": s.weight} for s in specs
        ]
        settings = {"attacks": mixture, "seed": self.seed, "art": art.__version__}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        h.update(np.ascontiguousarray(x, np.float32).tobytes())
        for k, v in sorted(module.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        digest = h.hexdigest()[:20]
        meta: dict[str, Any] = {
            "attacks": [s.label for s in specs],
            "mixture": mixture,
            "adversarials_digest": digest,
        }
        path = None if self.cache is None else Path(self.cache) / "featuremap" / f"adv-{digest}.npz"
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                adv, kind = z["adv"], z["kind"]
            if adv.shape == x.shape and kind.shape == (len(x),):
                return adv, kind, {**meta, "cached": str(path)}
        if self.progress:
            print(f"    featuremap: {len(x)} adversarials with ART", file=sys.stderr, flush=True)
        classes = len(self.meta["classes"])
        state = np.random.get_state()  # ART's random starts draw from numpy's global state
        np.random.seed(self.seed % 2**32)
        try:
            adv, kind = mixed_adversarials(module, x, classes, attacks=specs, seed=self.seed)
        finally:
            np.random.set_state(state)
        adv, kind = np.asarray(adv, np.float32), np.asarray(kind, np.int64)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, adv=adv, kind=kind)
            os.replace(tmp, path)
        return adv, kind, meta

    # -- scoring ----------------------------------------------------------------------------
    def score(self, batch: Batch) -> Scores:
        if self.net is None:
            raise RuntimeError("featuremap is not fitted")
        if len(batch) == 0:
            return Scores(np.zeros(0), None)
        with torch.inference_mode():
            out = self.net(self.feature_maps(batch))
        s = (out[:, 1] - out[:, 0]).numpy().astype(np.float64)
        return Scores(s, None)


_ATTACK_KEYS = {"art_class", "params", "weight"}


def _attack(a: Mapping[str, Any]) -> dict[str, Any]:
    """One mixture component as JSON: art_class, params, weight."""
    if not isinstance(a, Mapping) or not isinstance(a.get("art_class"), str):
        raise ValueError(f"attacks: each item is {{'art_class': ..., 'params': ...}}, got {a!r}")
    if set(a) - _ATTACK_KEYS:
        raise ValueError(f"attacks: unknown keys {sorted(set(a) - _ATTACK_KEYS)}")
    weight = float(a.get("weight", 1.0))
    if not weight > 0:
        raise ValueError(f"attacks: weight must be > 0, got {weight}")
    return {"art_class": a["art_class"], "params": dict(a.get("params") or {}), "weight": weight}
