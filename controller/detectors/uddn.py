"""UDDN (Li & Wang, Symmetry 2019; seed 003): a logits-guided U-Net denoiser as a detector.

The denoiser D (``UNet``) predicts the adversarial perturbation dx of its input and
subtracts it: D(x) = x - dx (the paper's Equation 4, clipped to the [0, 1] image range).
It is trained, through the frozen protected model f, with the paper's logits-guided loss
(Equation 5 with l = -1)

    L = || f(D(x_adv)) - f(x) ||_1        (``logits_guided_loss``)

on pairs of adversarial and clean *training* images, the adversarials made with IBM ART
against f (controller/training/adversarial.py ``mixed_adversarials``; by default its
FGSM + PGD mixture at L-inf 0.1 / 0.2 / 0.3). The seed's W-GAN noise reconstruction
(GNR), which only multiplies the adversarial pairs, is left out: ART makes as many
pairs as the training split has images, which is what the GAN stood in for.

Clean pairs: every minibatch also denoises the clean images themselves against their own
logits, L = || f(D(x)) - f(x) ||_1 (weight ``clean_weight``, 1 by default), so that clean
inputs go through D with their prediction unchanged; the paper trains on adversarials only
and would leave that to luck, while a detector lives on clean inputs not moving.

The network (``UNet``; the paper's Figure 3, scaled to 28x28 digits):

- ``C``: 3x3 conv, batch norm, ReLU.
- ``C2`` (residual): a = C(x); out = a + C(a).
- ``C3`` (dense): a = C(x) (stride 2 in the encoder), b = C(a), c = C([a, b]) (channel
  concatenation): the third unit sees every earlier one, as in a DenseNet block.
- Encoder: one C2 at full resolution, then ``depth`` C3 blocks, each downsampling with its
  strided first conv and doubling the channels (``width``, 2 ``width``, ...); the paper's
  four would take 28x28 down to 2x2, two (the default) stop at 7x7.
- Decoder (the ``F`` fusion units): at each level, upsample (nearest) the deeper output to
  the lateral encoder output's size, concatenate the two, then C3 (C2 at the top level).
- A 1x1 conv gives dx; D(x) = clip(x - dx, 0, 1).

Detection. The interface has one score per detector, so the two signals (the label moves
after denoising; the logits move) are combined as

    score = || f(x) - f(D(x)) ||_1  +  LABEL_CHANGED * [argmax f(D(x)) != label]

with ``LABEL_CHANGED`` = 1e6, far above any L1 distance of logits: every input whose label
changes ranks above every input whose label stays, and within each group the inputs rank
by the logit change. ``calibrate`` puts the threshold at the pipeline's FPR on clean
calibration data, as the base class does. When more clean calibration inputs than that FPR allows
change label under D, the threshold lands *inside* the "changed" band (1e6 + an L1
distance): only label changes with large logit changes are flagged, and the detection
figures show it; ``meta["calibration"]["label_changed"]`` records the clean share that
changed, so it can be seen whether that happened. (A normalised max of the two signals
was the alternative; the offset keeps the paper's rule, "flag when the label changes",
exactly whenever the clean label-change rate is within the FPR, and needs no statistics.)

Corrected label (``can_purify``): argmax f(D(x)), the model's label on the denoised input.

Cost of a batch: one U-Net forward (``inference_copy``: batch norm folded into the
convolutions, channels-last, traced and frozen) and ONE call of the model's TorchScript
module on D(x), under ``torch.inference_mode``; the logits the agent sent stand for f(x)
(without them, x and D(x) go through the model together, still one call). Measured with
``python -m bench.score_speed --detectors uddn`` on a busy 2-core machine, one thread:
~0.9-1.0 ms at batch 1, ~45 ms at batch 64 (~0.7 ms an item); the U-Net is ~8 M
multiply-adds an image at width 8, eight times the example classifier.

Training (defaults: width 8, depth 2, 8 epochs of batch 32, Adam 1e-3 then 1e-4 for the
last quarter, all ~3,000 mnist5k training images and the FGSM + PGD mixture): ~3 min on
that machine, ~25 s of it ART (cached in ``cache``/uddn, as is the trained denoiser).

The paper's knowledge-distillation step retrains the protected model, which a runtime
controller must not do: it is the offline command controller/training/distill.py, which
writes a student model the user may choose to deploy.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from controller.detectors import nets
from controller.detectors.arrays import as_float
from controller.detectors.base import Batch, Detector, Scores

LABEL_CHANGED = 1e6
"""Added to the score of an input whose label changes after denoising (see the module
docstring): above any L1 distance between two logit vectors of a sane model."""

ATTACK_MIXTURES = ("default", "fgsm")
"""Named training mixtures: ``default`` is adversarial.py's DEFAULT_ATTACKS (FGSM and PGD
at eps 0.1, 0.2, 0.3); ``fgsm`` its three FGSM components only (fast, for tests)."""

_NO_MODEL = (
    "uddn needs the model: fit(..., model=...), or a reference_model in the controller config"
)
_CACHE_VERSION = 1  # bump when what is cached (or how it is made) changes meaning


# -- the network -----------------------------------------------------------------------------


class C(nn.Module):
    """The paper's basic unit: 3x3 conv (``stride``), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))

    def fuse(self) -> None:
        """Fold the (eval-mode) batch norm into the conv: one op less at inference."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
            self.bn = nn.Identity()


class C2(nn.Module):
    """Two units with a residual connection at the second: a = C(x); a + C(a)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = C(cin, cout)
        self.c2 = C(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        return a + self.c2(a)


class C3(nn.Module):
    """Three units, densely connected: a = C(x) (``stride``), b = C(a), C([a, b])."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = C(cin, cout, stride)
        self.c2 = C(cout, cout)
        self.c3 = C(2 * cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(a)
        return self.c3(torch.cat([a, b], 1))


class UNet(nn.Module):
    """The UDDN denoiser for [N, C, H, W] images (see the module docstring): D(x) = clip(x -
    dx, 0, 1), dx from a 1x1 conv over the decoder's output."""

    def __init__(self, channels: int = 1, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"UNet: width and depth must be >= 1, got {width}, {depth}")
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [C2(channels, widths[0])]
            + [C3(widths[i], widths[i + 1], stride=2) for i in range(depth)]
        )
        # decoder[j] fuses level depth-1-j: the deeper output (upsampled) with the lateral
        self.decoder = nn.ModuleList()
        deeper = widths[depth]
        for level in reversed(range(depth)):
            block = C2 if level == 0 else C3
            self.decoder.append(block(deeper + widths[level], widths[level]))
            deeper = widths[level]
        self.out = nn.Conv2d(widths[0], channels, 1)

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """dx: the perturbation the network sees in ``x``."""
        lateral = []
        h = x
        for block in self.encoder:
            h = block(h)
            lateral.append(h)
        for j, block in enumerate(self.decoder):
            skip = lateral[-2 - j]
            up = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([up, skip], 1))
        return self.out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.perturbation(x)).clamp(0.0, 1.0)

    def fused(self) -> UNet:
        """An inference copy with every batch norm folded into its conv (eval mode)."""
        net = copy.deepcopy(self).eval()
        for m in net.modules():
            if isinstance(m, C):
                m.fuse()
        for p in net.parameters():
            p.requires_grad_(False)
        return net


def inference_copy(net: UNet, shape: Sequence[int]) -> nn.Module:
    """``net`` for scoring: batch norm folded into the convs (``UNet.fused``), channels-last
    memory, traced and frozen as TorchScript for inputs of ``shape`` [C, H, W] (any batch
    size). Measured on a busy 2-core machine, one thread, the default UDDN (width 8): batch
    1 ~0.5 ms instead of ~0.8 ms eager, batch 64 ~30 ms instead of ~65 ms. Outputs agree
    with the eager network to ~1e-6. Where tracing fails: the eager fused copy."""
    fast = net.fused().to(memory_format=torch.channels_last)
    example = torch.zeros(1, *(int(s) for s in shape))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
            return torch.jit.freeze(torch.jit.trace(fast, example).eval())
    except Exception:  # an exotic build without TorchScript: eager is only slower
        return fast


def logits_guided_loss(
    denoised_logits: torch.Tensor, clean_logits: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's loss (Equation 5, l = -1): || f(D(x*)) - f(x) ||_1 per input (summed
    over the classes), averaged over the batch (``weight``: a weighted average)."""
    per_item = (denoised_logits - clean_logits).abs().sum(dim=1)
    if weight is None:
        return per_item.mean()
    return (per_item * weight).sum() / weight.sum()


# -- training --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Denoiser training settings (the paper: Adam at 1e-3, then 1e-4 once the loss stops
    falling, batch 32, 30-40 epochs of 120k images; here ``epochs`` over the ~3,000
    mnist5k training images and their adversarials, the last ``decay`` share at lr / 10)."""

    width: int = 8
    depth: int = 2
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    decay: float = 0.25
    clean_weight: float = 1.0
    num_train: int | None = None  # a seeded random subset of this many training images
    attacks: str | tuple[Mapping[str, Any], ...] = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.width < 1 or self.depth < 1:
            raise ValueError("width and depth must be >= 1")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.clean_weight < 0:
            raise ValueError(f"clean_weight must be >= 0, got {self.clean_weight}")
        if self.num_train is not None and self.num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {self.num_train}")
        if isinstance(self.attacks, str) and self.attacks not in ATTACK_MIXTURES:
            raise ValueError(
                f"attacks must be one of {ATTACK_MIXTURES} or a list of"
                f" {{art_class, params, weight}}, got {self.attacks!r}"
            )

    def attack_specs(self) -> list[dict[str, Any]]:
        """The mixture as JSON values: [{art_class, params, weight}, ...]."""
        if not isinstance(self.attacks, str):
            out = []
            for a in self.attacks:
                if not isinstance(a, Mapping) or not isinstance(a.get("art_class"), str):
                    raise ValueError(f"attack {a!r}: a mapping with an 'art_class' string")
                extra = set(a) - {"art_class", "params", "weight"}
                if extra:
                    raise ValueError(f"attack {a!r}: unknown keys {sorted(extra)}")
                out.append(
                    {
                        "art_class": a["art_class"],
                        "params": dict(a.get("params", {})),
                        "weight": float(a.get("weight", 1.0)),
                    }
                )
            if not out:
                raise ValueError("attacks: an empty mixture")
            return out
        from controller.training.adversarial import DEFAULT_ATTACKS  # offline room: fit only

        specs = [
            {"art_class": a.art_class, "params": dict(a.params), "weight": a.weight}
            for a in DEFAULT_ATTACKS
        ]
        if self.attacks == "fgsm":
            specs = [s for s in specs if s["art_class"] == "FastGradientMethod"]
        return specs


def _digest(*parts: Any) -> str:
    """sha256 over arrays (dtype, shape and bytes) and JSON values, hex (the first 16)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def model_digest(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes and values)."""
    state = module.state_dict()
    return _digest(
        [(k, list(v.shape)) for k, v in state.items()],
        *(v.detach().cpu().numpy() for v in state.values()),
    )


def training_subset(x: np.ndarray, num_train: int | None, seed: int) -> np.ndarray:
    """The training images used: all, or a seeded random subset of ``num_train`` (in their
    original order; a random one, since a training split may be sorted by class)."""
    if num_train is None or num_train >= len(x):
        return x
    pick = np.random.default_rng(seed).choice(len(x), num_train, replace=False)
    return x[np.sort(pick)]


def attack_label(spec: Mapping[str, Any]) -> str:
    """``FastGradientMethod@0.3`` for a spec, as adversarial.py's ``TrainingAttack.label``."""
    eps = dict(spec.get("params", {})).get("eps")
    return spec["art_class"] if eps is None else f"{spec['art_class']}@{eps:g}"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def training_adversarials(
    module: nn.Module,
    x: np.ndarray,
    classes: int,
    specs: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    cache: str | Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(adversarials, the mixture component of each, summary): ART's ``mixed_adversarials``
    on ``x`` against ``module``, read from ``cache``/uddn when made before. The key is a
    digest of the inputs, the model's parameters, the attack settings and the seed; the
    files are plain ``.npy`` (``np.save``, no pickle)."""
    key = _digest(x, model_digest(module), list(specs), seed, classes, _CACHE_VERSION)
    adv_path = kind_path = None
    if cache is not None:
        folder = Path(cache) / "uddn"
        adv_path, kind_path = folder / f"adv-{key}.npy", folder / f"adv-{key}.kind.npy"
        if adv_path.is_file() and kind_path.is_file():
            adv = np.load(adv_path, allow_pickle=False)
            kind = np.load(kind_path, allow_pickle=False)
            if adv.shape == x.shape and kind.shape == (len(x),):
                if progress:
                    print(f"    uddn: adversarials from {adv_path}", file=sys.stderr, flush=True)
                return adv, kind, {"key": key, "cached": str(adv_path), "seconds": 0.0}
    # the offline room, imported here only: the daemon never loads ART (tests/test_layout.py)
    from controller.training.adversarial import TrainingAttack, mixed_adversarials

    attacks = [
        TrainingAttack(s["art_class"], dict(s.get("params", {})), float(s.get("weight", 1.0)))
        for s in specs
    ]
    if progress:
        names = ", ".join(a.label for a in attacks)
        print(f"    uddn: ART on {len(x)} training images ({names})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # ART's random starts draw from numpy's and torch's global generators: seed them for
    # this call only, so the adversarials (and the cache key) are reproducible
    np_state = np.random.get_state()
    try:
        np.random.seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adv, kind = mixed_adversarials(module, x, classes, attacks=attacks, seed=seed)
    finally:
        np.random.set_state(np_state)
    seconds = round(time.perf_counter() - t0, 2)
    if adv_path is not None and kind_path is not None:
        _atomic_save(kind_path, np.asarray(kind, np.int64))
        _atomic_save(adv_path, adv)  # last: the adversarials' file marks a complete entry
    return adv, np.asarray(kind, np.int64), {"key": key, "seconds": seconds}


def train_denoiser(
    net: UNet,
    module: nn.Module,
    x: np.ndarray,
    adv: np.ndarray,
    cfg: TrainConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``net`` in place with the logits-guided loss through the frozen ``module``:
    each minibatch holds the adversarial images (target: the model's logits on their clean
    originals) and the clean images themselves (same target, weight ``clean_weight``)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    module = nets.frozen(module)
    xt, at = nets.as_tensor(x), nets.as_tensor(adv)
    with torch.inference_mode():
        target = torch.cat([module(xt[i : i + 512]) for i in range(0, len(xt), 512)])
    target = target.clone()  # a normal tensor (inference tensors cannot enter autograd)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    decay_at = cfg.epochs - round(cfg.decay * cfg.epochs)
    start = time.perf_counter()
    net.train()
    adv_loss = clean_loss = 0.0
    for epoch in range(cfg.epochs):
        if epoch == decay_at and epoch > 0:
            for group in opt.param_groups:
                group["lr"] = cfg.lr / 10
        adv_sum = clean_sum = 0.0
        for idx in nets.minibatches(len(xt), cfg.batch_size, rng):
            i = torch.from_numpy(idx)
            n = len(idx)
            inputs = torch.cat([at[i], xt[i]]) if cfg.clean_weight > 0 else at[i]
            out = module(net(inputs))
            per_item = (out - target[i].repeat(len(inputs) // n, 1)).abs().sum(1)
            loss = per_item[:n].mean()
            if cfg.clean_weight > 0:
                loss = loss + cfg.clean_weight * per_item[n:].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums = per_item.detach()
            adv_sum += sums[:n].sum().item()
            clean_sum += sums[n:].sum().item()
        adv_loss, clean_loss = adv_sum / len(xt), clean_sum / len(xt)
        if progress:
            print(
                f"    uddn: epoch {epoch + 1}/{cfg.epochs} logit L1 adversarial {adv_loss:.3f}"
                f" clean {clean_loss:.3f} ({time.perf_counter() - start:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    net.eval()
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "train_l1_adversarial": round(adv_loss, 5),
        "train_l1_clean": round(clean_loss, 5),
        "num_train": len(x),
    }


# -- the detector ----------------------------------------------------------------------------


class UddnDetector(Detector):
    name = "uddn"
    needs_model = True  # trained through the model; scores run it on D(x)
    fits_through_model = True  # its torch module's gradients; scores only call it
    can_purify = True  # corrected: the model's label on the denoised input

    def __init__(
        self,
        width: int = 8,
        depth: int = 2,
        epochs: int = 8,
        batch_size: int = 32,
        lr: float = 1e-3,
        decay: float = 0.25,
        clean_weight: float = 1.0,
        num_train: int | None = None,
        attacks: str | Sequence[Mapping[str, Any]] = "default",
        seed: int = 0,
        *,
        cache: str | Path | None = None,
        progress: bool = True,
        threads: int = 1,
    ) -> None:
        """The training settings as ``TrainConfig`` (``attacks``: ``"default"``, ``"fgsm"``
        or a list of {art_class, params, weight}); ``cache``: a folder where the training
        adversarials and trained denoisers are kept and reused (keyed by a digest of the
        data, the model and the settings; not saved in the artifact); ``threads``: torch
        threads while fitting (restored after; not saved). One by default: on a busy
        2-core machine a second intra-op thread made a batch-64 training step of these
        8- to 32-channel convolutions ~8x *slower* (1.6 s vs 0.21 s, measured), and on an
        idle one it buys little."""
        super().__init__()
        self.train_config = TrainConfig(
            width=int(width),
            depth=int(depth),
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            decay=float(decay),
            clean_weight=float(clean_weight),
            num_train=None if num_train is None else int(num_train),
            attacks=attacks if isinstance(attacks, str) else tuple(dict(a) for a in attacks),
            seed=int(seed),
        )
        self.cache = cache
        self.progress = progress
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.net: UNet | None = None
        self._fast: nn.Module | None = None  # for scoring: see ``inference_copy``
        self._shape: tuple[int, ...] | None = None

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.train_config)
        if not isinstance(cfg["attacks"], str):
            cfg["attacks"] = [dict(a) for a in cfg["attacks"]]
        return cfg

    def arrays(self) -> dict[str, np.ndarray]:
        if self.net is None or self._shape is None:
            raise RuntimeError("uddn is not fitted")
        return {**nets.state_arrays(self.net), "input_shape": np.asarray(self._shape, np.int64)}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._shape = tuple(int(s) for s in arrays["input_shape"])
        net = self._make_net()
        nets.load_state(net, arrays)
        self._set_net(net)

    def _make_net(self) -> UNet:
        assert self._shape is not None
        cfg = self.train_config
        return UNet(self._shape[0], cfg.width, cfg.depth)

    def _set_net(self, net: UNet) -> None:
        self.net = nets.frozen(net)
        self._fast = inference_copy(net, self._shape or (1, 28, 28))

    # -- learning ---------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.model is None:
            raise ValueError(_NO_MODEL)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._fit_on(x)
        finally:
            torch.set_num_threads(threads)

    def _fit_on(self, x: np.ndarray) -> None:
        assert self.model is not None
        module = nets.frozen(nets.module_of(self.model, "uddn"))
        cfg = self.train_config
        x = as_float(x)
        if x.ndim != 4:
            raise ValueError(f"uddn takes [N, C, H, W] images, got shape {x.shape}")
        x = training_subset(x, cfg.num_train, cfg.seed)
        self._shape = tuple(int(s) for s in x.shape[1:])
        specs = cfg.attack_specs()
        classes = len(self.meta.get("classes") or []) or int(np.asarray(self.model(x[:1])).shape[1])
        adv, kind, adv_summary = training_adversarials(
            module, x, classes, specs, seed=cfg.seed, cache=self.cache, progress=self.progress
        )
        net, summary = self._ensure_net(module, x, adv, adv_summary["key"])
        self._set_net(net)
        labels = [attack_label(s) for s in specs]
        self.meta["uddn"] = {
            **summary,
            "attacks": labels,
            "attack_counts": {lab: int((kind == i).sum()) for i, lab in enumerate(labels)},
            "adversarials": adv_summary,
            **self._train_accuracy(x, adv),
        }

    def _ensure_net(
        self, module: nn.Module, x: np.ndarray, adv: np.ndarray, adv_key: str
    ) -> tuple[UNet, dict[str, Any]]:
        """The denoiser trained on (x, adv), from the cache folder when it has it."""
        cfg = self.train_config
        net = self._make_net()
        settings = {**self.config(), "torch": torch.__version__, "v": _CACHE_VERSION}
        path = None
        if self.cache is not None:
            key = _digest(adv_key, settings)
            path = Path(self.cache) / "uddn" / f"net-{key}.npz"
            if path.is_file():
                with np.load(path, allow_pickle=False) as z:
                    nets.load_state(net, {k: z[k] for k in z.files if k != "summary"})
                    summary = json.loads(str(z["summary"]))
                if self.progress:
                    print(f"    uddn: denoiser from {path}", file=sys.stderr, flush=True)
                return net, {**summary, "cached": str(path)}
        torch.manual_seed(cfg.seed)
        net = self._make_net()  # the initial weights drawn from the seed
        summary = train_denoiser(net, module, x, adv, cfg, progress=self.progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, summary=np.array(json.dumps(summary)), **nets.state_arrays(net))
            os.replace(tmp, path)
        return net, summary

    def _train_accuracy(self, x: np.ndarray, adv: np.ndarray) -> dict[str, float]:
        """How often D keeps the model's clean label, on the clean and adversarial
        training images (a training-split figure: optimistic)."""
        assert self.model is not None and self._fast is not None
        clean = np.asarray(self.model(x)).argmax(1)
        out = {}
        for what, inputs in (("clean", x), ("adversarial", adv)):
            denoised = nets.forward(self._fast, inputs)
            agree = np.asarray(self.model(denoised)).argmax(1) == clean
            out[f"train_{what}_label_kept"] = round(float(agree.mean()), 4)
        return out

    # -- scoring ----------------------------------------------------------------------------
    def denoise(self, x: np.ndarray) -> np.ndarray:
        """D(x) for a batch of inputs (numpy in, numpy out)."""
        if self._fast is None:
            raise RuntimeError("uddn is not fitted")
        return nets.forward(self._fast, as_float(x))

    def parts(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(L1 logit change [N], label changed [N] bool, the label of D(x) [N])."""
        if self.model is None:
            raise ValueError(_NO_MODEL)
        if self._fast is None:
            raise RuntimeError("uddn is not fitted")
        x = nets.as_tensor(as_float(batch.inputs))
        n = len(x)
        if n == 0:
            return np.zeros(0), np.zeros(0, bool), np.zeros(0, np.int64)
        with torch.inference_mode():
            d = self._fast(x)
            if batch.logits is not None:
                fx = np.asarray(batch.logits, np.float32)
                fd = nets.classify(self.model, d)
            else:  # f(x) and f(D(x)) in one call
                both = nets.classify(self.model, torch.cat([x, d]))
                fx, fd = both[:n], both[n:]
        l1 = np.abs(fd - fx).sum(axis=1, dtype=np.float64)
        denoised_label = fd.argmax(axis=1).astype(np.int64)
        return l1, denoised_label != np.asarray(batch.labels), denoised_label

    def score(self, batch: Batch) -> Scores:
        l1, changed, corrected = self.parts(batch)
        return Scores(l1 + LABEL_CHANGED * changed, corrected)

    def calibrate(self, clean: Batch, fpr: float) -> float:
        """The base class's threshold, and the clean share whose label D changes: above
        ``fpr``, the threshold sits inside the label-changed band (module docstring).
        The batch is scored once: the base class's ``calibrate`` gets those scores."""
        l1, changed, corrected = self.parts(clean)
        scored = Scores(l1 + LABEL_CHANGED * changed, corrected)
        self.score = lambda batch: scored  # type: ignore[method-assign]  # for the base only
        try:
            threshold = super().calibrate(clean, fpr)
        finally:
            del self.score
        self.meta["calibration"]["label_changed"] = float(np.mean(changed)) if len(l1) else 0.0
        self.meta["calibration"]["threshold_in_changed_band"] = bool(threshold > LABEL_CHANGED)
        return threshold
