"""MagNet (Meng & Chen, CCS 2017), the MNIST configuration, as one detector.

MagNet's two prongs: *detectors* that reject inputs far from the manifold of clean data,
learned by autoencoders trained on clean images only, and a *reformer* that moves the
input onto that manifold, AE(x), before the classifier sees it. The paper's MNIST setup
(and its code, ``defensive_models.py`` / ``worker.py``), which this follows:

- Autoencoder I (detector I and the reformer): Conv.Sigmoid 3x3x3, AveragePooling 2x2,
  Conv.Sigmoid 3x3x3, Conv.Sigmoid 3x3x3, Upsampling 2x2, Conv.Sigmoid 3x3x3,
  Conv.Sigmoid 3x3xC (``structure_i = [3, "average", 3]``, mirrored; the code's notation).
- Autoencoder II (detector II): Conv.Sigmoid 3x3x3, Conv.Sigmoid 3x3x3, Conv.Sigmoid
  3x3xC (``structure_ii = [3]``).
- Both trained on clean training images only, with the mean squared error between
  AE(x + noise) (clipped to [0, 1]) and x, Gaussian noise of std 0.1, an L2 activity
  regulariser of 1e-9 on every layer and Adam, as in the paper's code. Two departures:
  a fresh noise draw for every batch (the code draws it once: a plain denoising
  autoencoder, at the same noise level), and the step schedule. The code runs 100
  epochs of batch 256 at Adam's default lr 1e-3 over MNIST's 55,000 images, ~21,000
  steps; on the 2,400 images of mnist5k (after the hold-out) that is ~1,000 steps, and
  a stack of sigmoid layers that short of steps still outputs about the mean image
  (MSE ~0.1). The defaults here, 50 epochs of batch 64 at lr 1e-2 (~1,900 steps;
  ~2.3 min for both on a 2-core machine under a load of ~8, most of it waiting for a
  core), reach a denoising MSE of ~0.003 (AE I) and ~0.0013 (AE II).

Sub-detectors (``detectors``; the defaults are the four below):

- ``recon_I_l2``: ||x - AE_I(x)||_2 (MagNet MNIST detector I, p=2).
- ``recon_II_l1``: ||x - AE_II(x)||_1 (MagNet MNIST detector II, p=1).
  (The code scores mean(|x - AE(x)|^p), a monotone function of these norms: with the
  rank normalisation below the two are the same detector. ``recon_I_l1`` and
  ``recon_II_l2`` are also accepted.)
- ``jsd_T10``, ``jsd_T40``: the probability-divergence detectors of the paper's CIFAR-10
  setup, JSD(softmax(f(x) / T) || softmax(f(AE_I(x)) / T)) with the natural log (what
  ``scipy.spatial.distance.jensenshannon(p, q) ** 2`` gives), T = 10 and 40 (any
  ``jsd_T<number>`` works). They see what the reformer does to the model's prediction.

Combining: MagNet flags an input when *any* of its detectors is over its own threshold,
each threshold set at the same drop rate (the (1 - r) quantile of that detector's scores
on clean validation data). The detector interface has one score and one threshold, so
each sub-score s_k is mapped to the clean *upper-tail probability* it is at,

    z_k(s) = -ln S_k(s),   S_k(s) = P(clean score of sub-detector k >= s),

with S_k estimated on a clean held-out part of the training split that the autoencoders
never saw (``holdout``; reconstruction errors of training images are optimistic). The
score is max_k z_k. Since every z_k is increasing, "max_k z_k >= t" is exactly "some
s_k >= its own clean (1 - e^-t) quantile": MagNet's rule with equal drop rates for all
sub-detectors, and ``calibrate`` picks the t that gives the pipeline's FPR for the union
(less than k times the drop rate, since the sub-detectors' false alarms overlap). A
z-score such as (s - median) / IQR would not do this: the same t would be a different
quantile for each sub-detector, depending on the shape of its tail.
S_k is the empirical survival function (plotting positions (n + 1 - i) / (n + 1) at the
i-th smallest of n held-out scores, z interpolated linearly between them) and, above the
largest held-out score, an exponential tail fitted to the top 10% (the mean excess): z
keeps rising past the clean sample (for a million tail scales), so inputs far out of it
still rank above nearer ones, and the calibrated threshold need not be a tie.

Corrected label (``can_purify``): the model's label on the reformed input, argmax
f(AE_I(x)) (MagNet's reformer). As in the paper, the reformer undoes small
perturbations and the detectors catch large ones: on mnist5k (``openexample-bench
detection --quick``) the corrected label was right for all flagged DeepFool inputs, for
40% of R+FGSM 0.3 and 4% of FGSM 0.3 ones. A denoiser trained at noise 0.1 does not
reliably remove an L-inf 0.3 perturbation: on FGSM 0.3 the reformer's label was right
for 6% (seed 0) or 44% (seed 1) of the inputs that fooled the model, and for 67% with
``noise=0.3`` (the first 300 test images; all three detected them all, AUC 1.0).

Cost of a batch: one forward pass of each autoencoder and ONE classifier call, on the
reformed inputs (the logits the agent sent stand for f(x); without them x and AE_I(x)
go through the classifier together, still one call), under ``torch.inference_mode`` on
torch tensors. The classifier is the reference model's TorchScript module (``.module``,
controller/reference_model.py ``model_fn``), or the plain numpy callable when it has none.
The autoencoders run as a list of functional steps (``forward_plan``), not through
nn.Sequential. Measured (``python -m bench.score_speed --detectors magnet``, one
thread, a 2-core machine under a load of ~8): ~0.45 ms at batch 1, ~0.4-0.5 ms per item
at batch 64, about half of which is the classifier call; feature squeezing, for
comparison, ~0.5 and ~0.6.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from controller.detectors import nets
from controller.detectors.arrays import as_float
from controller.detectors.base import Batch, Detector, Scores

DETECTORS = ("recon_I_l2", "recon_II_l1", "jsd_T10", "jsd_T40")
STRUCTURE_I: tuple[int | str, ...] = (3, "average", 3)
STRUCTURE_II: tuple[int | str, ...] = (3,)
_RECON = re.compile(r"^recon_(I|II)_l([12])$")
_JSD = re.compile(r"^jsd_T(\d+(?:\.\d+)?)$")
_TAIL = 0.1  # the top share of held-out clean scores the exponential tail is fitted to
_FAR = 1e6  # how many tail scales z keeps rising past the clean sample
_LN2 = math.log(2.0)


# -- the autoencoders ---------------------------------------------------------------------


class _Crop(nn.Module):
    """Crop [N, C, H', W'] to [N, C, H, W] (after upsampling an odd size back up)."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : self.h, : self.w]


def autoencoder(shape: Sequence[int], structure: Sequence[int | str]) -> nn.Sequential:
    """MagNet's ``DenoisingAutoEncoder`` for [C, H, W] inputs: ``structure`` lists conv
    layers (their channel count; 3x3, sigmoid, same padding) and pooling (``"average"``,
    ``"max"``: 2x2), mirrored for the decoder (pooling -> 2x upsampling), then a 3x3
    sigmoid conv back to C channels."""
    c, h, w = (int(s) for s in shape)
    layers: list[nn.Module] = []
    ch, pools = c, 0
    for layer in structure:
        if isinstance(layer, int) and not isinstance(layer, bool) and layer > 0:
            layers += [nn.Conv2d(ch, layer, 3, padding=1), nn.Sigmoid()]
            ch = layer
        elif layer in ("average", "max"):
            pool = nn.AvgPool2d if layer == "average" else nn.MaxPool2d
            layers.append(pool(2, ceil_mode=True))
            pools += 1
        else:
            raise ValueError(f"autoencoder layer {layer!r}: a channel count or 'average'/'max'")
    for layer in reversed(structure):
        if isinstance(layer, int):
            layers += [nn.Conv2d(ch, layer, 3, padding=1), nn.Sigmoid()]
            ch = layer
        else:
            layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
    layers += [nn.Conv2d(ch, c, 3, padding=1), nn.Sigmoid()]
    if pools and (h % 2**pools or w % 2**pools):
        layers.append(_Crop(h, w))
    return nn.Sequential(*layers)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Autoencoder training settings (see the module docstring for the departures from
    the paper's code: 100 epochs of batch 256 at Adam's default lr 1e-3)."""

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-2
    noise: float = 0.1  # std of the Gaussian noise added to the training inputs
    reg: float = 1e-9  # L2 activity regulariser on every layer's output
    num_train: int | None = None  # use only the first this many training images
    holdout: float = 0.2  # share of the training images kept out to measure clean scores
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.num_train is not None and self.num_train < 2:
            raise ValueError(f"num_train must be >= 2, got {self.num_train}")


def train_autoencoder(
    net: nn.Sequential,
    x: np.ndarray,
    cfg: TrainConfig,
    *,
    seed: int,
    label: str = "ae",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``net`` in place to map x + noise back to x; returns a summary.

    On one torch thread (restored after): for convolutions of three channels a second
    intra-op thread buys nothing (measured on 2 cores: 20 vs 25 ms a batch-64 step) and,
    on a busy machine, costs several times that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(net, x, cfg, seed=seed, label=label, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    net: nn.Sequential, x: np.ndarray, cfg: TrainConfig, *, seed: int, label: str, progress: bool
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    xt = nets.as_tensor(x)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    net.train()
    start = time.perf_counter()
    loss_sum = 0.0
    for epoch in range(cfg.epochs):
        loss_sum = 0.0
        for idx in nets.minibatches(len(xt), cfg.batch_size, rng):
            clean = xt[torch.from_numpy(idx)]
            h = (clean + cfg.noise * torch.randn(clean.shape, generator=gen)).clamp_(0, 1)
            reg = clean.new_zeros(())
            for layer in net:
                h = layer(h)
                if cfg.reg and isinstance(layer, nn.Sigmoid):
                    reg = reg + h.square().sum() / len(idx)
            mse = torch.nn.functional.mse_loss(h, clean)
            loss = mse + cfg.reg * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += mse.item() * len(idx)
        if progress and (epoch + 1 == cfg.epochs or (epoch + 1) % max(1, cfg.epochs // 10) == 0):
            print(
                f"    magnet {label}: epoch {epoch + 1}/{cfg.epochs}"
                f" mse {loss_sum / len(xt):.5f} ({time.perf_counter() - start:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    net.eval()
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "train_mse": round(loss_sum / len(xt), 6),
        "num_train": len(x),
    }


def _fingerprint(x: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()[:12]


# -- the normalisation ---------------------------------------------------------------------


def tail_knots(clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The knots (scores, z = -ln survival) of ``normalised`` from held-out clean scores:
    the sample's, and one far out on the exponential tail (the score at a million tail
    scales above the largest: z is linear in the score up to it, flat past it)."""
    ranked = np.sort(np.asarray(clean, np.float64))
    n = ranked.size
    if n < 2 or not np.isfinite(ranked).all():
        raise ValueError("magnet: the clean statistics need >= 2 finite held-out scores")
    z = -np.log((n - np.arange(n)) / (n + 1.0))  # the i-th smallest: (n + 1 - i) / (n + 1)
    # ties: keep the highest z of a run, so that the knots strictly increase
    last = np.r_[ranked[1:] != ranked[:-1], True]
    c, z = ranked[last], z[last]
    top = ranked[-max(2, math.ceil(_TAIL * n)) :]
    scale = float(np.mean(top - top[0]))  # the exponential tail's mean excess
    if not scale > 0.0:  # a flat top: any small positive scale keeps z rising
        scale = float(max(np.ptp(c), abs(c[-1]), 1.0) * 1e-3)
    return np.r_[c, c[-1] + _FAR * scale], np.r_[z, z[-1] + _FAR]


def normalised(s: np.ndarray, knots: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """z(s) = -ln S(s): interpolated on the clean sample, exponential tail above it."""
    return np.interp(s, *knots)


def jsd(logits_p: np.ndarray, logits_q: np.ndarray, t: float | Sequence[float]) -> np.ndarray:
    """Jensen-Shannon divergence (natural log) between softmax(p / t) and softmax(q / t),
    row by row: [N] for one temperature, [K, N] for K of them. Computed from
    log-probabilities, so that small divergences stay exact."""
    ts = np.asarray(t, np.float64)
    k = ts.reshape(-1, 1, 1)
    lp = np.asarray(logits_p, np.float64)[None] / k
    lq = np.asarray(logits_q, np.float64)[None] / k
    lp -= np.logaddexp.reduce(lp, axis=2, keepdims=True)
    lq -= np.logaddexp.reduce(lq, axis=2, keepdims=True)
    d = lq - lp
    a = np.logaddexp(0.0, d)
    a -= _LN2  # ln M - ln P, with M = (P + Q) / 2
    b = a - d  # ln M - ln Q
    out = np.add.reduce(np.exp(lp) * a + np.exp(lq) * b, axis=2)
    out *= -0.5
    out = np.maximum(out, 0.0, out=out)
    return out[0] if ts.ndim == 0 else out


def forward_plan(net: nn.Module) -> list[tuple[str, Any, Any]] | None:
    """An ``autoencoder`` as a list of functional steps (what ``run_plan`` runs), or None
    for any other module. At batch 1 it halves the cost of going through nn.Sequential
    (~30 of ~65 us for autoencoder I): the module calls were most of it."""
    if not isinstance(net, nn.Sequential):
        return None
    plan: list[tuple[str, Any, Any]] = []
    for layer in net:
        if isinstance(layer, nn.Conv2d):
            plan.append(("conv", layer.weight.detach(), layer.bias.detach()))
        elif isinstance(layer, nn.Sigmoid):
            plan.append(("sigmoid", None, None))
        elif isinstance(layer, nn.AvgPool2d | nn.MaxPool2d):
            plan.append(("avg" if isinstance(layer, nn.AvgPool2d) else "max", None, None))
        elif isinstance(layer, nn.Upsample):
            plan.append(("up", None, None))
        elif isinstance(layer, _Crop):
            plan.append(("crop", layer.h, layer.w))
        else:
            return None
    return plan


def run_plan(plan: list[tuple[str, Any, Any]], h: torch.Tensor) -> torch.Tensor:
    """The autoencoder's forward pass, step by step (the same ops as the module's)."""
    for kind, a, b in plan:
        if kind == "conv":
            h = F.conv2d(h, a, b, padding=1)
        elif kind == "sigmoid":
            h = torch.sigmoid(h)  # not in place: slower on the convolution's output
        elif kind == "avg":
            h = F.avg_pool2d(h, 2, ceil_mode=True)
        elif kind == "max":
            h = F.max_pool2d(h, 2, ceil_mode=True)
        elif kind == "up":
            n, c, rows, cols = h.shape
            h = h[:, :, :, None, :, None].expand(n, c, rows, 2, cols, 2)
            h = h.reshape(n, c, 2 * rows, 2 * cols)
        else:
            h = h[:, :, :a, :b]
    return h


# -- the detector --------------------------------------------------------------------------


class MagnetDetector(Detector):
    name = "magnet"
    needs_model = True  # the JSD detectors and the reformer's label run the classifier
    can_purify = True  # corrected: the model's label on AE_I(x)

    def __init__(
        self,
        detectors: Sequence[str] = DETECTORS,
        structure_i: Sequence[int | str] = STRUCTURE_I,
        structure_ii: Sequence[int | str] = STRUCTURE_II,
        epochs: int = 50,
        batch_size: int = 64,
        lr: float = 1e-2,
        noise: float = 0.1,
        reg: float = 1e-9,
        num_train: int | None = None,
        holdout: float = 0.2,
        seed: int = 0,
        *,
        cache: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        """``detectors``: the sub-detectors (see the module docstring); the training
        settings as ``TrainConfig``; ``cache``: a folder where trained autoencoders are
        kept and reused (keyed by the data and settings; not saved in the artifact)."""
        super().__init__()
        self.detectors = list(detectors)
        if not self.detectors or len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"detectors must be distinct and non-empty: {self.detectors}")
        for d in self.detectors:
            if not (_RECON.match(d) or _JSD.match(d)) or (_JSD.match(d) and self._t(d) <= 0):
                raise ValueError(
                    f"unknown MagNet sub-detector {d!r}: recon_I_l1, recon_I_l2, recon_II_l1,"
                    " recon_II_l2 or jsd_T<temperature>"
                )
        self.structures = {
            "I": _structure(structure_i, "structure_i"),
            "II": _structure(structure_ii, "structure_ii"),
        }
        self.train_config = TrainConfig(
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            noise=float(noise),
            reg=float(reg),
            num_train=None if num_train is None else int(num_train),
            holdout=float(holdout),
            seed=int(seed),
        )
        self.cache = cache
        self.progress = progress
        self._shape: tuple[int, ...] | None = None
        self.aes: dict[str, nn.Module] = {}  # "I" (also the reformer), "II"
        self.clean: dict[str, np.ndarray] = {}  # held-out clean scores per sub-detector
        self._knots: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._spec = self._specs()
        self._plans: dict[str, tuple[nn.Module, list | None]] = {}  # see _reconstruct

    @staticmethod
    def _t(name: str) -> float:
        m = _JSD.match(name)
        assert m is not None
        return float(m.group(1))

    def _needed(self) -> list[str]:
        """The autoencoders the sub-detectors use: I always (the reformer)."""
        return ["I"] + (["II"] if any(d.startswith("recon_II_") for d in self.detectors) else [])

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.train_config)
        return {
            "detectors": self.detectors,
            "structure_i": self.structures["I"],
            "structure_ii": self.structures["II"],
            **cfg,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.aes or not self.clean:
            raise RuntimeError("magnet is not fitted")
        out: dict[str, np.ndarray] = {}
        for key, net in self.aes.items():
            out.update(nets.state_arrays(net, f"ae_{key}."))
        for d, s in self.clean.items():
            out[f"clean.{d}"] = s
        out["input_shape"] = np.asarray(self._shape, np.int64)
        return out

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._shape = tuple(int(s) for s in arrays["input_shape"])
        self.aes = {}
        for key in self._needed():
            net = autoencoder(self._shape, self.structures[key])
            nets.load_state(net, arrays, f"ae_{key}.")
            self.aes[key] = nets.frozen(net)
        self._set_clean({d: np.asarray(arrays[f"clean.{d}"], np.float64) for d in self.detectors})

    def _set_clean(self, clean: Mapping[str, np.ndarray]) -> None:
        self.clean = {d: np.sort(np.asarray(clean[d], np.float64)) for d in self.detectors}
        self._knots = {d: tail_knots(s) for d, s in self.clean.items()}

    # -- learning ---------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.model is None:
            raise ValueError(_NO_MODEL)
        cfg = self.train_config
        x = as_float(x)
        if cfg.num_train is not None:
            x = x[: cfg.num_train]
        if x.ndim != 4:
            raise ValueError(f"magnet takes [N, C, H, W] images, got shape {x.shape}")
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(x))
        n_hold = min(len(x) - 1, max(1, round(cfg.holdout * len(x))))
        held, train = x[np.sort(order[:n_hold])], x[np.sort(order[n_hold:])]
        self._shape = tuple(int(s) for s in x.shape[1:])
        self.aes, summaries = {}, {}
        for i, key in enumerate(self._needed()):
            net, summaries[key] = self._ensure_ae(key, train, cfg.seed + i)
            self.aes[key] = nets.frozen(net)
        raw = self.sub_scores(Batch(held, None, np.zeros(len(held), np.int64)))[0]
        self._set_clean(raw)
        self.meta["magnet"] = {
            "autoencoders": summaries,
            "num_train": len(train),
            "num_holdout": len(held),
        }

    def _ensure_ae(self, key: str, x: np.ndarray, seed: int) -> tuple[nn.Sequential, dict]:
        """Autoencoder ``key`` trained on ``x``, from the cache folder when it has it."""
        with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG untouched
            torch.manual_seed(seed)
            net = autoencoder(x.shape[1:], self.structures[key])
        settings = {
            **dataclasses.asdict(self.train_config),
            "structure": self.structures[key],
            "seed": seed,
            "torch": torch.__version__,
        }
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = None
        if self.cache is not None:
            path = Path(self.cache) / "magnet" / f"{_fingerprint(x)}-{key}-{digest}.npz"
            if path.is_file():
                with np.load(path, allow_pickle=False) as z:
                    nets.load_state(net, {k: z[k] for k in z.files if k != "summary"})
                    summary = json.loads(str(z["summary"]))
                return net, {**summary, "cached": str(path)}
        summary = train_autoencoder(
            net, x, self.train_config, seed=seed, label=f"AE {key}", progress=self.progress
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, summary=np.array(json.dumps(summary)), **nets.state_arrays(net))
            os.replace(tmp, path)
        return net, summary

    # -- scoring ----------------------------------------------------------------------------
    def _specs(self) -> tuple[list[tuple[str, str, int]], list[str], list[float]]:
        """(reconstruction sub-detectors as (name, autoencoder, p), JSD names, their Ts)."""
        recon, names, temps = [], [], []
        for d in self.detectors:
            m = _RECON.match(d)
            if m is not None:
                recon.append((d, m.group(1), int(m.group(2))))
            else:
                names.append(d)
                temps.append(self._t(d))
        return recon, names, temps

    def _reconstruct(self, key: str, x: torch.Tensor) -> torch.Tensor:
        net = self.aes[key]
        cached = self._plans.get(key)
        if cached is None or cached[0] is not net:  # an autoencoder set by hand: look again
            cached = self._plans[key] = (net, forward_plan(net))
        plan = cached[1]
        return net(x) if plan is None else run_plan(plan, x)

    def sub_scores(self, batch: Batch) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({sub-detector: raw score [N]}, the reformer's label [N])."""
        if self.model is None:
            raise ValueError(_NO_MODEL)
        if not self.aes:
            raise RuntimeError("magnet is not fitted")
        xa = np.require(as_float(batch.inputs), np.float32, ("C", "W"))
        n = len(xa)
        if n == 0:
            return {d: np.zeros(0) for d in self.detectors}, np.zeros(0, np.int64)
        x = torch.from_numpy(xa)
        with torch.inference_mode():
            rec = {key: self._reconstruct(key, x) for key in self.aes}
            if batch.logits is not None:
                logits = np.asarray(batch.logits, np.float32)
                reformed = nets.classify(self.model, rec["I"])
            else:  # f(x) and f(AE_I(x)) in one call
                both = nets.classify(self.model, torch.cat([x, rec["I"]]))
                logits, reformed = both[:n], both[n:]
        recon, names, temps = self._spec
        out: dict[str, np.ndarray] = {}
        flat = xa.reshape(n, -1)
        diffs: dict[str, np.ndarray] = {}
        for d, key, p in recon:
            diff = diffs.get(key)
            if diff is None:
                diff = diffs[key] = flat - rec[key].numpy().reshape(n, -1)
            norm = np.abs(diff).sum(1) if p == 1 else np.sqrt(np.square(diff).sum(1))
            out[d] = norm.astype(np.float64)
        if names:
            for d, v in zip(names, jsd(logits, reformed, temps), strict=True):
                out[d] = v
        return out, reformed.argmax(axis=1).astype(np.int64)

    def normalise(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """[K, N]: each sub-score as -ln of its clean upper-tail probability."""
        if not self._knots:
            raise RuntimeError("magnet is not fitted")
        out = np.empty((len(self.detectors), len(raw[self.detectors[0]])))
        for i, d in enumerate(self.detectors):
            out[i] = np.interp(raw[d], *self._knots[d])
        return out

    def score(self, batch: Batch) -> Scores:
        raw, corrected = self.sub_scores(batch)
        if len(corrected) == 0:
            return Scores(np.zeros(0), corrected)
        return Scores(self.normalise(raw).max(axis=0), corrected)


_NO_MODEL = (
    "magnet needs the model: fit(..., model=...), or a reference_model in the controller config"
)


def _structure(structure: Sequence[int | str], what: str) -> list[int | str]:
    """``structure`` as a JSON list, checked by building it once."""
    out = list(structure)
    try:
        autoencoder((1, 8, 8), out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from None
    return out
