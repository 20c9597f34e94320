"""ISMN (seed 002): an image-space mapping network and a perturbation classifier.

The seed's defence has two learned parts, settled as follows (issue 13):

- The *mapping network* M ("instance sparsity mapping network", an improved MagNet
  autoencoder; the seed's Table 2): a strided conv encoder, Conv(c1, 7x7, /2),
  LeakyReLU(0.2), Conv(c2, 3x3, /2), LeakyReLU, Conv(c3, 3x3, /2), LeakyReLU,
  Conv(c4, 5x5, /2), LeakyReLU, then Fully Connected(``latent`` = 128), and the mirrored
  decoder: a fully connected layer back to the c4 maps, then transposed convolutions
  (5x5, 3x3, 3x3, 7x7, stride 2, LeakyReLU between them) and a sigmoid. Table 2's widths
  are (c1..c4) = (64, 128, 256, 256): ``mapper_channels``. M is trained on clean AND
  adversarial training images to map both to the clean image (seed Eq. 3): the loss is
  MSE(M(x), x) + ``adv_weight`` * MSE(M(x'), x), x' the adversarial version of x (weight
  1 by default: the two halves of each batch count the same). Adam, ``lr`` 2e-3.
- The *perturbation classifier* C (Table 1): Conv(k1, 3x3), ReLU, Conv(k2, 3x3), ReLU,
  MaxPool(2x2), BatchNorm, Conv(k3, 3x3), ReLU, Conv(k4, 3x3), ReLU, Dense(d), ReLU and
  one output, the logit of "perturbed" (a 2-way softmax is a sigmoid of one logit);
  trained afterwards ("individually") with binary cross-entropy on the difference
  ``x - M(x)`` of clean (0) and adversarial (1) training images, as many of each, M
  frozen. Table 1's widths are (128, 256, 128, 64) and d = 1024: ``classifier_channels``
  and ``dense``.

Score: C's logit for "perturbed" on ``x - M(x)``; ``calibrate`` sets the threshold for
the pipeline's FPR, as for every detector. Corrected label (``can_purify``, the seed's
conclusion: "the sample is cleaned by the mapping network and then analysed by the
targeted network"): the reference model's label on M(x). It is computed for the flagged
items only once calibrated (for every item before). Cost of a batch: one call of M and
C together (``inference_copy``: batch norm folded, traced and frozen), under
``torch.inference_mode``, plus one model call on the flagged items; batches of up to
``_SMALL`` items run torch's own convolutions instead of oneDNN (``_native_convs``).
Measured through bench/score_speed.py (one thread, a busy 2-core machine): ~0.3-0.4 ms
at batch 1, ~7.6 ms at batch 64 (~120 us an item).

Adversarial training data: IBM ART against the protected model (the reference copy's
TorchScript module), on the TRAINING inputs only, one attack per input drawn from a
mixture (controller/training/adversarial.py ``mixed_adversarials``; by default its
``DEFAULT_ATTACKS``: FGSM at eps 0.1, 0.2, 0.3 and PGD at eps 0.1, 0.2, 0.3 (step eps /
10, 20 iterations), equal weights; ``attacks`` sets another mixture). The manifest's
``ismn.attacks`` / ``ismn.mixture`` list the attacks the detector was trained on: the
others are unseen attacks. ART and controller/training are imported inside ``_fit``
only: the daemon never loads them. PGD is the slow part of the data (~13 s for the
3,000 mnist5k images on one thread, minutes on two threads of a busy machine), so the
adversarials are kept in the ``cache`` folder (``ismn/adv-DIGEST.npz``, no pickle),
DIGEST covering the training inputs, the model's parameters, the mixture, the seed and
the ART version: retraining on the same data and model does not run ART again.

Departures and choices, for speed on a CPU and MNIST-sized inputs:

- Widths: the defaults are an eighth of Table 2's for M (8, 16, 32, 32; latent 128 as in
  the table) and of Table 1's for C (8, 16, 8, 8; dense 32). Table 1 and 2's full widths
  are a constructor argument away; measured (one thread, eager) they cost ~10x more at
  batch 1 and ~25x more at batch 64 (~22 and ~710 ms for M and C). Twice the default
  widths did as well on the seen attacks (AUC 1.0, purified labels within a point) and
  better on DeepFool, which ISMN is not trained on (AUC 0.94 instead of 0.88), at ~2x
  the scoring cost.
- Batch norm after M's inner layers (DCGAN style; Table 2 lists none): without it M sat
  on an all-black output (MSE ~0.11) for epochs, or for good (lr 1e-3 to 3e-3); with it
  the MSE was ~0.02 after 8 epochs of 1,000 images. Scoring folds it into the layers.
- C's convolutions are unpadded (Keras' default, which Table 1's notation suggests)
  when the image is at least 12 pixels wide, padded otherwise (8x8 ``digits``).
- Fitting runs on ``threads`` torch threads (1 by default, restored after).
- The seed's iterative regeneration ("until the generated sample completely matches
  the source") and defensive distillation of the target model are left out: the model
  is the user's, and one pass of M is the purification.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from controller.detectors import nets
from controller.detectors.arrays import as_float
from controller.detectors.base import Batch, Detector, Scores

MAPPER_CHANNELS = (8, 16, 32, 32)  # Table 2: (64, 128, 256, 256)
CLASSIFIER_CHANNELS = (8, 16, 8, 8)  # Table 1: (128, 256, 128, 64)
_KERNELS = (7, 3, 3, 5)  # Table 2's encoder kernels, each with stride 2
_ATTACK_KEYS = {"art_class", "params", "weight"}
_SMALL = 4  # batches up to this size are scored with torch's own convolutions


# -- the networks ------------------------------------------------------------------------


def _encoded_sizes(size: int) -> list[int]:
    """Spatial sizes through the four stride-2 convs (padding k // 2): ceil(s / 2)."""
    sizes = [size]
    for _ in _KERNELS:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class Mapper(nn.Module):
    """M: Table 2's encoder, a ``latent``-wide fully connected code, mirrored decoder."""

    def __init__(self, shape: Sequence[int], channels: Sequence[int], latent: int) -> None:
        super().__init__()
        c, h, w = (int(s) for s in shape)
        chans = [c, *(int(k) for k in channels)]
        hs, ws = _encoded_sizes(h), _encoded_sizes(w)
        enc: list[nn.Module] = []
        for i, k in enumerate(_KERNELS):
            enc.append(nn.Conv2d(chans[i], chans[i + 1], k, stride=2, padding=k // 2))
            if i:
                enc.append(nn.BatchNorm2d(chans[i + 1]))
            enc.append(nn.LeakyReLU(0.2))
        self.encoder = nn.Sequential(
            *enc, nn.Flatten(), nn.Linear(chans[-1] * hs[-1] * ws[-1], latent)
        )
        dec: list[nn.Module] = [
            nn.Linear(latent, chans[-1] * hs[-1] * ws[-1]),
            nn.BatchNorm1d(chans[-1] * hs[-1] * ws[-1]),
            nn.LeakyReLU(0.2),
            nn.Unflatten(1, (chans[-1], hs[-1], ws[-1])),
        ]
        for i in reversed(range(len(_KERNELS))):
            k = _KERNELS[i]
            # out = 2 * in - 1 + output_padding: back to the encoder's size at this depth
            pad = (hs[i] - (2 * hs[i + 1] - 1), ws[i] - (2 * ws[i + 1] - 1))
            dec.append(
                nn.ConvTranspose2d(
                    chans[i + 1], chans[i], k, stride=2, padding=k // 2, output_padding=pad
                )
            )
            if i:
                dec += [nn.BatchNorm2d(chans[i]), nn.LeakyReLU(0.2)]
            else:
                dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def fused(self) -> nn.Sequential:
        """The same function for inference (eval mode): batch norm folded into the
        convolution or linear layer before it."""
        return nn.Sequential(*_fold_batch_norm(self.encoder), *_fold_batch_norm(self.decoder))


def _fold_batch_norm(layers: nn.Sequential) -> list[nn.Module]:
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    out: list[nn.Module] = []
    for layer in layers:
        prev = out[-1] if out else None
        if isinstance(layer, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d):
            out[-1] = fuse_conv_bn_eval(prev, layer)
        elif isinstance(layer, nn.BatchNorm2d) and isinstance(prev, nn.ConvTranspose2d):
            out[-1] = fuse_conv_bn_eval(prev, layer, transpose=True)
        elif isinstance(layer, nn.BatchNorm1d) and isinstance(prev, nn.Linear):
            out[-1] = fuse_linear_bn_eval(prev, layer)
        else:
            out.append(layer)
    return out


def classifier(shape: Sequence[int], channels: Sequence[int], dense: int) -> nn.Sequential:
    """C: Table 1's perturbation classifier with one output, the logit of "perturbed"."""
    c, h, w = (int(s) for s in shape)
    k1, k2, k3, k4 = (int(k) for k in channels)
    pad = 0 if min(h, w) >= 12 else 1
    size_h, size_w = h, w
    for step in ("conv", "conv", "pool", "conv", "conv"):
        if step == "pool":
            size_h, size_w = size_h // 2, size_w // 2
        else:
            size_h, size_w = size_h - 2 + 2 * pad, size_w - 2 + 2 * pad
    if size_h < 1 or size_w < 1:
        raise ValueError(f"ismn: inputs of shape {tuple(shape)} are too small for the classifier")
    return nn.Sequential(
        nn.Conv2d(c, k1, 3, padding=pad),
        nn.ReLU(),
        nn.Conv2d(k1, k2, 3, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(k2),
        nn.Conv2d(k2, k3, 3, padding=pad),
        nn.ReLU(),
        nn.Conv2d(k3, k4, 3, padding=pad),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(k4 * size_h * size_w, dense),
        nn.ReLU(),
        nn.Linear(dense, 1),
    )


class _Scoring(nn.Module):
    """M and C in one call: (C's logit [N], M(x) [N, C, H, W])."""

    def __init__(self, mapper: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.mapper, self.classifier = mapper, classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        purified = self.mapper(x)
        return self.classifier(x - purified).flatten(), purified


def inference_copy(mapper: Mapper, clf: nn.Module, shape: Sequence[int]) -> nn.Module:
    """M and C for scoring (``_Scoring``): batch norm folded into M's layers, channels-last
    memory, traced and frozen as TorchScript for inputs of ``shape`` (any batch size).
    Where tracing fails: the eager copy (only slower). Outputs agree with the eager
    networks to ~1e-6."""
    fast = _Scoring(mapper.eval().fused(), copy.deepcopy(clf).eval()).eval()
    fast = fast.to(memory_format=torch.channels_last)
    example = torch.zeros(1, *(int(s) for s in shape))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
            return torch.jit.freeze(torch.jit.trace(fast, example).eval())
    except Exception:  # a build without TorchScript
        return fast


_GET_ONEDNN = getattr(torch._C, "_get_mkldnn_enabled", None)
_SET_ONEDNN = getattr(torch._C, "_set_mkldnn_enabled", None)


@contextlib.contextmanager
def _native_convs() -> Iterator[None]:
    """oneDNN off inside the block: for a few small images torch's own convolutions are
    ~2x faster (measured, one thread: batch 1 0.25 vs 0.42 ms for M and C), from batch
    ~8 on oneDNN is (batch 64: 7 vs 15 ms). torch's ``mkldnn.flags`` would also reset
    the deterministic and TF32 switches; this touches that one flag only."""
    if _GET_ONEDNN is None or _SET_ONEDNN is None or not _GET_ONEDNN():
        yield
        return
    _SET_ONEDNN(False)
    try:
        yield
    finally:
        _SET_ONEDNN(True)


# -- the detector --------------------------------------------------------------------------


class IsmnDetector(Detector):
    name = "ismn"
    needs_model = True  # adversarial training data, and the label of the purified input
    fits_through_model = True  # PGD through the model's torch module; scores call it
    can_purify = True  # corrected: the model's label on M(x)

    def __init__(
        self,
        mapper_channels: Sequence[int] = MAPPER_CHANNELS,
        latent: int = 128,
        classifier_channels: Sequence[int] = CLASSIFIER_CHANNELS,
        dense: int = 32,
        epochs: int = 20,
        classifier_epochs: int = 6,
        batch_size: int = 64,
        lr: float = 2e-3,
        adv_weight: float = 1.0,
        num_train: int | None = None,
        attacks: Sequence[Mapping[str, Any]] | None = None,
        seed: int = 0,
        *,
        cache: str | Path | None = None,
        progress: bool = True,
        threads: int = 1,
    ) -> None:
        """``attacks``: the training mixture, as ``TrainingAttack`` fields
        (``{"art_class": "FastGradientMethod", "params": {"eps": 0.3}, "weight": 1}``;
        None: ``DEFAULT_ATTACKS`` of controller/training/adversarial.py, FGSM and PGD at
        eps 0.1, 0.2, 0.3); ``num_train``: use the first this many training images;
        ``cache``: a folder where the generated adversarials are kept; ``threads``: torch
        threads while fitting (restored after). Neither is saved in the artifact.

        One thread by default: measured on a busy 2-core machine, the test's tiny fit
        took 2-4 s on one thread and 27-54 s on two (OpenMP workers spinning on cores
        that other processes hold)."""
        super().__init__()
        self.mapper_channels = _ints(mapper_channels, 4, "mapper_channels")
        self.classifier_channels = _ints(classifier_channels, 4, "classifier_channels")
        self.latent, self.dense = int(latent), int(dense)
        if self.latent < 1 or self.dense < 1:
            raise ValueError("latent and dense must be >= 1")
        self.epochs, self.classifier_epochs = int(epochs), int(classifier_epochs)
        self.batch_size = int(batch_size)
        if self.epochs < 1 or self.classifier_epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs, classifier_epochs and batch_size must be >= 1")
        self.lr, self.adv_weight = float(lr), float(adv_weight)
        if not self.lr > 0 or self.adv_weight < 0:
            raise ValueError("lr must be > 0 and adv_weight >= 0")
        if num_train is not None and int(num_train) < 2:
            raise ValueError(f"num_train must be >= 2, got {num_train}")
        self.num_train = None if num_train is None else int(num_train)
        self.attacks = None if attacks is None else [_attack(a) for a in attacks]
        if self.attacks is not None and not self.attacks:
            raise ValueError("attacks: an empty mixture (None for the default one)")
        self.seed = int(seed)
        self.cache = cache
        self.progress = progress
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self._shape: tuple[int, ...] | None = None
        self.mapper: Mapper | None = None
        self.classifier: nn.Sequential | None = None
        self._fast: nn.Module | None = None  # M and C for scoring (``inference_copy``)

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "mapper_channels": self.mapper_channels,
            "latent": self.latent,
            "classifier_channels": self.classifier_channels,
            "dense": self.dense,
            "epochs": self.epochs,
            "classifier_epochs": self.classifier_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "adv_weight": self.adv_weight,
            "num_train": self.num_train,
            "attacks": self.attacks,
            "seed": self.seed,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        if self.mapper is None or self.classifier is None or self._shape is None:
            raise RuntimeError("ismn is not fitted")
        return {
            **nets.state_arrays(self.mapper, "mapper."),
            **nets.state_arrays(self.classifier, "classifier."),
            "input_shape": np.asarray(self._shape, np.int64),
        }

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._build(tuple(int(s) for s in arrays["input_shape"]))
        assert self.mapper is not None and self.classifier is not None
        nets.load_state(self.mapper, arrays, "mapper.")
        nets.load_state(self.classifier, arrays, "classifier.")
        self._set_fast()

    def _set_fast(self) -> None:
        assert self.mapper is not None and self.classifier is not None and self._shape
        nets.frozen(self.mapper)
        nets.frozen(self.classifier)
        self._fast = inference_copy(self.mapper, self.classifier, self._shape)

    def _build(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3:
            raise ValueError(f"ismn takes [N, C, H, W] images, got items of shape {shape}")
        self._shape, self._fast = shape, None
        self.mapper = Mapper(shape, self.mapper_channels, self.latent)
        self.classifier = classifier(shape, self.classifier_channels, self.dense)

    # -- learning ---------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.model is None:
            raise ValueError(_NO_MODEL)
        module = nets.module_of(self.model, "ismn")
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._fit_on(module, x, y)
        finally:
            torch.set_num_threads(threads)

    def _fit_on(self, module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
        x = as_float(x)
        if self.num_train is not None:
            x, y = x[: self.num_train], y[: self.num_train]
        if x.ndim != 4:
            raise ValueError(f"ismn takes [N, C, H, W] images, got shape {x.shape}")
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        self._build(tuple(int(s) for s in x.shape[1:]))
        assert self.mapper is not None and self.classifier is not None
        adv, kind, adv_meta = self._adversarials(module, x)
        mapper = self._train_mapper(x, adv)
        m = nets.frozen(self.mapper)
        clf = self._train_classifier(
            _chunked(lambda t: t - m(t), x), _chunked(lambda t: t - m(t), adv)
        )
        self._set_fast()
        # how the parts do on the training data (the test split is the bench's)
        labels = _chunked(module, adv).argmax(1)
        purified = _chunked(lambda t: module(m(t)), adv).argmax(1)
        adv_meta["fooled"] = {
            a: round(float(np.mean(labels[kind == i] != y[kind == i])), 4)
            for i, a in enumerate(adv_meta["attacks"])
            if np.any(kind == i)
        }
        self.meta["ismn"] = {
            **adv_meta,
            "num_train": len(x),
            "mapper": mapper,
            "classifier": clf,
            "train_purified_accuracy_adv": round(float(np.mean(purified == y)), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }

    def _adversarials(
        self, module: torch.nn.Module, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One adversarial version of each training input (from the cache when it has
        them), the index of its attack, and what the manifest records about them."""
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
        classes = len(self.meta["classes"])
        settings = {
            "attacks": [
                {"art_class": s.art_class, "params": s.params, "weight": s.weight} for s in specs
            ],
            "seed": self.seed,
            "classes": classes,
            "art": art.__version__,
        }
        inputs = inputs_digest(x)
        digest = _sha256(
            inputs.encode(),
            model_digest(module).encode(),
            json.dumps(settings, sort_keys=True).encode(),
        )[:20]
        meta: dict[str, Any] = {
            "attacks": [s.label for s in specs],
            "mixture": settings["attacks"],
            "adversarials_digest": digest,
            "inputs_digest": inputs,
        }
        path = None
        if self.cache is not None:
            path = Path(self.cache) / "ismn" / f"adv-{digest}.npz"
            if path.is_file():
                with np.load(path, allow_pickle=False) as z:
                    adv, kind = z["adv"], z["kind"]
                if adv.shape == x.shape and kind.shape == (len(x),):
                    self._say(f"adversarials from {path}")
                    return adv, kind, {**meta, "cached": str(path)}
        self._say(f"generating {len(x)} adversarials ({', '.join(meta['attacks'])})")
        t0 = time.perf_counter()
        with _numpy_seeded(self.seed):  # ART's random starts draw from numpy's global state
            adv, kind = mixed_adversarials(module, x, classes, attacks=specs, seed=self.seed)
        meta["generate_seconds"] = round(time.perf_counter() - t0, 1)
        adv, kind = np.asarray(adv, np.float32), np.asarray(kind, np.int64)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, adv=adv, kind=kind)
            os.replace(tmp, path)
        return adv, kind, meta

    def _train_mapper(self, x: np.ndarray, adv: np.ndarray) -> dict[str, Any]:
        """M maps clean and adversarial images to the clean one (seed Eq. 3)."""
        net = self.mapper
        assert net is not None
        rng = np.random.default_rng(self.seed)
        xc, xa = nets.as_tensor(x), nets.as_tensor(adv)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        net.train()
        t0 = time.perf_counter()
        sums = np.zeros(2)
        for epoch in range(self.epochs):
            sums[:] = 0.0
            for idx in nets.minibatches(len(xc), self.batch_size, rng):
                t = torch.from_numpy(idx)
                clean = xc[t]
                out = net(torch.cat([clean, xa[t]]))
                mse_clean = nn.functional.mse_loss(out[: len(idx)], clean)
                mse_adv = nn.functional.mse_loss(out[len(idx) :], clean)
                loss = mse_clean + self.adv_weight * mse_adv
                opt.zero_grad()
                loss.backward()
                opt.step()
                sums += (mse_clean.item() * len(idx), mse_adv.item() * len(idx))
            self._epoch(
                "mapper",
                epoch,
                self.epochs,
                t0,
                f"mse clean {sums[0] / len(xc):.5f} adv {sums[1] / len(xc):.5f}",
            )
        return {
            "seconds": round(time.perf_counter() - t0, 1),
            "train_mse_clean": round(float(sums[0] / len(xc)), 6),
            "train_mse_adv": round(float(sums[1] / len(xc)), 6),
        }

    def _train_classifier(self, d_clean: np.ndarray, d_adv: np.ndarray) -> dict[str, Any]:
        """C tells x - M(x) of adversarial inputs (1) from that of clean ones (0)."""
        net = self.classifier
        assert net is not None
        rng = np.random.default_rng(self.seed + 1)
        d = nets.as_tensor(np.concatenate([d_clean, d_adv]))
        target = torch.cat([torch.zeros(len(d_clean)), torch.ones(len(d_adv))])
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        net.train()
        t0 = time.perf_counter()
        loss_sum = correct = 0.0
        for epoch in range(self.classifier_epochs):
            loss_sum = correct = 0.0
            for idx in nets.minibatches(len(d), self.batch_size, rng):
                t = torch.from_numpy(idx)
                logit = net(d[t]).reshape(-1)
                loss = nn.functional.binary_cross_entropy_with_logits(logit, target[t])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)
                correct += float(((logit > 0).float() == target[t]).sum())
            self._epoch(
                "classifier",
                epoch,
                self.classifier_epochs,
                t0,
                f"bce {loss_sum / len(d):.4f} acc {correct / len(d):.4f}",
            )
        return {
            "seconds": round(time.perf_counter() - t0, 1),
            "train_bce": round(loss_sum / len(d), 6),
            "train_accuracy": round(correct / len(d), 4),
        }

    def _say(self, what: str) -> None:
        if self.progress:
            print(f"    ismn: {what}", file=sys.stderr, flush=True)

    def _epoch(self, part: str, epoch: int, epochs: int, t0: float, figures: str) -> None:
        if epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 5) == 0:
            took = time.perf_counter() - t0
            self._say(f"{part} epoch {epoch + 1}/{epochs} {figures} ({took:.0f}s)")

    # -- scoring ----------------------------------------------------------------------------
    def purify(self, inputs: np.ndarray) -> np.ndarray:
        """M(x): the inputs mapped onto the clean manifold."""
        if self.mapper is None:
            raise RuntimeError("ismn is not fitted")
        return nets.forward(self.mapper, as_float(inputs))

    def score(self, batch: Batch) -> Scores:
        if self.model is None:
            raise ValueError(_NO_MODEL)
        if self._fast is None:
            raise RuntimeError("ismn is not fitted")
        x = nets.as_tensor(as_float(batch.inputs))
        labels = np.asarray(batch.labels, np.int64)
        n = len(x)
        if n == 0:
            return Scores(np.zeros(0), np.zeros(0, np.int64))
        if tuple(x.shape[1:]) != self._shape:
            raise ValueError(
                f"ismn was fitted on items of shape {self._shape}, got {tuple(x.shape[1:])}"
            )
        with torch.inference_mode(), _native_convs() if n <= _SMALL else contextlib.nullcontext():
            logit, purified = self._fast(x)
            scores = logit.numpy().astype(np.float64)
            if self.threshold is None:  # not calibrated: every item's purified label
                return Scores(scores, nets.classify(self.model, purified.contiguous()).argmax(1))
            corrected = labels.copy()
            todo = scores >= self.threshold
            if todo.any():
                picked = purified if todo.all() else purified[torch.from_numpy(todo)]
                corrected[todo] = nets.classify(self.model, picked.contiguous()).argmax(1)
        return Scores(scores, corrected)


_NO_MODEL = (
    "ismn needs the model: fit(..., model=...), or a reference_model in the controller config"
)


# -- helpers -------------------------------------------------------------------------------


def inputs_digest(x: np.ndarray) -> str:
    """sha256 of the training inputs (float32, C order, with their shape)."""
    a = np.ascontiguousarray(as_float(x), np.float32)
    return _sha256(json.dumps(list(a.shape)).encode(), a.tobytes())


def model_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers, by name."""
    parts = []
    for k, v in sorted(module.state_dict().items()):
        parts += [k.encode(), v.detach().cpu().contiguous().numpy().tobytes()]
    return _sha256(*parts)


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _chunked(
    fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, size: int = 512
) -> np.ndarray:
    """``fn`` over ``x`` in chunks under ``torch.inference_mode``; float32 numpy out."""
    t = nets.as_tensor(x)
    with torch.inference_mode():
        return torch.cat([fn(t[i : i + size]) for i in range(0, len(t), size)]).numpy()


@contextlib.contextmanager
def _numpy_seeded(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def _ints(values: Sequence[int], n: int, what: str) -> list[int]:
    out = [int(v) for v in values]
    if len(out) != n or min(out) < 1:
        raise ValueError(f"{what} must be {n} positive integers, got {list(values)}")
    return out


def _attack(a: Mapping[str, Any]) -> dict[str, Any]:
    """One mixture component as JSON: art_class, params, weight."""
    if not isinstance(a, Mapping) or not isinstance(a.get("art_class"), str):
        raise ValueError(f"attacks: each item is {{'art_class': ..., 'params': ...}}, got {a!r}")
    unknown = set(a) - _ATTACK_KEYS
    if unknown:
        raise ValueError(
            f"attacks: unknown keys {sorted(unknown)} (allowed: {sorted(_ATTACK_KEYS)})"
        )
    params = dict(a.get("params") or {})
    weight = float(a.get("weight", 1.0))
    if not weight > 0:
        raise ValueError(f"attacks: weight must be > 0, got {weight}")
    return {"art_class": a["art_class"], "params": params, "weight": weight}
