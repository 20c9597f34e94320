"""Defed (seed 001): an ensemble of edge-feature-enhanced denoisers, one per noise level.

Xiao et al., IEEE IoT Journal 2022. Each denoiser D_k was trained on clean images with
Gaussian noise of level sigma_k (denoisers.py, net.py). An input x with the label L the
model gave it gets, per denoiser (the authors' 5-multi-processors-defender.py),

    s_k(x) = CE(f(D_k(x)), L) + MSE(x, D_k(x))

A clean input comes out of a denoiser nearly unchanged and still classified L; an
adversarial perturbation is (partly) taken out, so the model moves off L and the pixels
move. The paper flags x when any s_k exceeds the "confidence interval" mean_k + k std_k of
clean scores. Here the detector's one score is

    score(x) = max_k (s_k(x) - mean_k) / std_k

with mean_k, std_k measured during ``fit`` on a clean held-out part of the training split
(never trained on), so one threshold stands for "any denoiser above its own level":
``calibrate`` sets it for the pipeline's FPR, and records the paper's rule (threshold k,
k = ``ci_k``) and the false-positive rate it would have on the calibration data, so both
can be reported (``meta["confidence_interval"]``).

Corrected label (``can_purify``): argmax of the softmax summed over the K denoised
versions (the authors sum over the denoisers that flag; here over all, so the label does
not depend on the threshold).

Scoring runs the K denoisers as one network (net.py ``FusedEnsemble``: batch norms
folded, the K nets as conv groups), then ONE call of the model on the K * N denoised
images, in ``torch.inference_mode``. It needs the model itself (``needs_model``): the
controller's reference copy, whose ``.module`` is the TorchScript module.

Defaults: three levels, sigma 30, 75 and 120 of 255 (the authors' MNIST grid ran 0 to
160): 75 is about the L-inf budget of the usual MNIST attacks (0.3 = 76/255) and its
denoiser caught most FGSM / PGD inputs; 120 takes larger perturbations out (it gave the
best corrected labels on FGSM); 30 keeps clean images nearly intact, so its clean scores
are tight and small perturbations still stand out. Sigma 0 would learn the identity and
see nothing. On mnist5k (2,400 training images, 4 epochs, one thread) fitting takes
~1.5 min; scoring is ~3.4 ms at batch 1 and ~2.4 ms an item at batch 64 on the shared
2-core machine (bench/score_speed.py): ~20x the model's own arithmetic, by design.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controller.detectors.arrays import as_float
from controller.detectors.base import Batch, Detector, Scores
from controller.detectors.defed.denoisers import (
    TrainConfig,
    ensure_denoisers,
    prefix,
    train_denoisers,
)
from controller.detectors.defed.net import DefedNet, FusedEnsemble
from controller.detectors.nets import as_tensor, load_state, module_of, state_arrays

_FAR = 1e6  # the score of an item whose label is not a class: above any normalised score
_STD_FLOOR = 1e-6


class DefedDetector(Detector):
    name = "defed"
    needs_model = True  # scores run the model on the denoised inputs
    fits_through_model = scores_through_model = True  # its torch module (module_of)
    can_purify = True  # corrected: argmax of the summed softmax over the denoised inputs

    def __init__(
        self,
        sigmas: Sequence[float] = TrainConfig.sigmas,
        widths: Sequence[int] = TrainConfig.widths,
        epochs: int = TrainConfig.epochs,
        batch_size: int = TrainConfig.batch_size,
        lr: float = TrainConfig.lr,
        alpha: float = TrainConfig.alpha,
        train_images: int | None = None,
        holdout: float = 0.2,
        ci_k: float = 3.0,
        seed: int = 0,
        *,
        cache: str | Path | None = None,
        progress: bool = True,
        threads: int | None = 1,
    ) -> None:
        """``sigmas``: the denoisers' noise levels (0-255 scale); ``widths``: channels at
        full, half and quarter size; ``train_images``: at most this many training images
        (None: all but the held-out part); ``holdout``: the fraction of the training split
        kept out of training for the clean score statistics; ``ci_k``: k of the paper's
        mean + k std rule (reported); ``cache``: a folder where trained denoisers are kept
        and reused (not saved); ``threads``: torch's intra-op threads while fitting
        (restored after; None: as set). One by default: these small convolutions gain
        little from a second thread, and on the shared 2-core machine the threads'
        spin-waiting made training 10-15x slower (3 vs 48 CPU ms an image and step);
        calibrate scores on them too. Scoring in the controller runs on its setting."""
        super().__init__()
        sigmas = [float(s) for s in sigmas]
        widths = [int(w) for w in widths]
        if not sigmas or any(s < 0 for s in sigmas):
            raise ValueError(f"sigmas must be a non-empty list of levels >= 0, got {sigmas}")
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be three positive channel counts, got {widths}")
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {holdout}")
        if epochs < 1 or batch_size < 1 or (train_images is not None and train_images < 1):
            raise ValueError("epochs, batch_size and train_images must be >= 1")
        self.train_config = TrainConfig(
            sigmas=tuple(sigmas),
            widths=tuple(widths),
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            alpha=float(alpha),
            seed=int(seed),
        )
        self.train_images = None if train_images is None else int(train_images)
        self.holdout = float(holdout)
        self.ci_k = float(ci_k)
        self.cache = cache
        self.progress = progress
        self.threads = threads
        self.nets: list[DefedNet] = []
        self.shape: tuple[int, ...] | None = None  # [C, H, W] the denoisers take
        self.clean_mean = np.zeros(len(sigmas))
        self.clean_std = np.ones(len(sigmas))
        self._fused: FusedEnsemble | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._memo: tuple[Batch, Scores] | None = None  # calibrate's scores of its batch

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.train_config)
        cfg["sigmas"], cfg["widths"] = list(cfg["sigmas"]), list(cfg["widths"])
        return {
            **cfg,
            "train_images": self.train_images,
            "holdout": self.holdout,
            "ci_k": self.ci_k,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.nets or self.shape is None:
            raise RuntimeError("defed is not fitted")
        out = {
            "shape": np.asarray(self.shape, np.int64),
            "clean_mean": np.asarray(self.clean_mean, np.float64),
            "clean_std": np.asarray(self.clean_std, np.float64),
        }
        for k, net in enumerate(self.nets):
            out.update(state_arrays(net, prefix(k)))
        return out

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        shape = tuple(int(s) for s in arrays["shape"])
        nets = []
        for k in range(len(self.train_config.sigmas)):
            net = DefedNet(shape[0], self.train_config.widths)
            load_state(net, arrays, prefix(k))
            nets.append(net)
        self._set_nets(nets, shape)
        self._set_stats(arrays["clean_mean"], arrays["clean_std"])

    def _set_nets(self, nets: list[DefedNet], shape: tuple[int, ...]) -> None:
        self.nets = nets
        self.shape = shape
        self._fused = FusedEnsemble(nets)

    def _set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.clean_mean = np.asarray(mean, np.float64)
        self.clean_std = np.maximum(np.asarray(std, np.float64), _STD_FLOOR)
        self._stats = (
            torch.from_numpy(self.clean_mean.astype(np.float32))[:, None],
            torch.from_numpy(self.clean_std.astype(np.float32))[:, None],
        )

    # -- learning ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _offline_threads(self) -> Iterator[None]:
        """torch on ``self.threads`` intra-op threads inside the block (fit, calibrate)."""
        saved = torch.get_num_threads()
        if self.threads is not None and self.threads != saved:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != saved:
                torch.set_num_threads(saved)

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        with self._offline_threads():
            self._fit_denoisers(as_float(x), y)

    def _fit_denoisers(self, x: np.ndarray, y: np.ndarray) -> None:
        if x.ndim != 4 or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(
                f"defed needs images [N, C, H, W] with H and W divisible by 4, got {x.shape}"
            )
        if len(x) < 2:
            raise ValueError("defed needs at least 2 training images")
        module = module_of(self.model, "defed")
        order = np.random.default_rng(self.train_config.seed).permutation(len(x))
        n_hold = min(max(1, round(self.holdout * len(x))), len(x) - 1)
        hold, train = order[:n_hold], order[n_hold:]
        if self.train_images is not None:
            train = train[: self.train_images]
        train = np.sort(train)  # the cache key does not depend on the draw's order
        cfg = self.train_config
        if self.cache is not None:
            nets, summary = ensure_denoisers(
                self.cache, module, x[train], y[train], cfg, progress=self.progress
            )
        else:
            nets, summary = train_denoisers(module, x[train], y[train], cfg, progress=self.progress)
        self._set_nets(nets, tuple(int(s) for s in x.shape[1:]))
        # clean statistics on the held-out images, labelled as at scoring time: by the model
        xh = x[np.sort(hold)]
        labels = np.asarray(self.model(xh)).argmax(1).astype(np.int64)
        raw = self.raw_scores(xh, labels)
        self._set_stats(raw.mean(axis=1), raw.std(axis=1))
        self.meta["defed"] = {
            **summary,
            "num_holdout": len(hold),
            "clean": [
                {"sigma": s, "mean": float(m), "std": float(d)}
                for s, m, d in zip(cfg.sigmas, self.clean_mean, self.clean_std, strict=True)
            ],
        }

    def calibrate(self, clean: Batch, fpr: float) -> float:
        """Set the threshold for ``fpr``, and record the paper's rule (flag when a
        denoiser's score is above mean + ci_k std of its clean scores) and its FPR on
        ``clean``, overall and per denoiser."""
        x, labels = as_float(clean.inputs), np.asarray(clean.labels, np.int64)
        self._check(x, labels)
        with self._offline_threads():
            z, corrected = self._normalised(x, labels)
        self._memo = (clean, Scores(z.max(axis=0).astype(np.float64), corrected))
        try:  # the base class scores the batch again: it gets these scores
            threshold = super().calibrate(clean, fpr)
        finally:
            self._memo = None
        flagged = z > self.ci_k
        self.meta["confidence_interval"] = {
            "k": self.ci_k,
            "rule": "any denoiser's score > mean + k * std of its clean held-out scores",
            "clean_fpr": float(flagged.any(axis=0).mean()),
            "per_denoiser_fpr": [float(f) for f in flagged.mean(axis=1)],
            "calibrated_threshold_in_std": threshold,
        }
        return threshold

    # -- scoring ----------------------------------------------------------------------------
    def _check(self, x: np.ndarray, labels: np.ndarray) -> None:
        if self.model is None:
            raise ValueError(
                "defed needs the model: fit(..., model=...), or a reference_model in the"
                " controller config"
            )
        if self._fused is None or self.shape is None:
            raise RuntimeError("defed is not fitted")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"defed was trained on inputs of shape [N, {', '.join(map(str, self.shape))}],"
                f" got {list(x.shape)}"
            )
        if labels.shape != (len(x),):
            raise ValueError(f"defed: {len(x)} inputs but labels of shape {labels.shape}")

    def _forward(
        self, x: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw scores [K, N], log-softmax of the denoised inputs [K, N, C], valid [N]),
        under inference mode: the K denoisers in one pass, the model in one call."""
        module = module_of(self.model, "defed")
        fused = self._fused
        assert fused is not None
        k, n = fused.k, len(x)
        with torch.inference_mode():
            xt = as_tensor(x)
            denoised = fused(xt)  # [K, N, C, H, W]
            logits = module(denoised.reshape(k * n, *x.shape[1:]))
            logp = torch.log_softmax(logits.view(k, n, -1), dim=2)
            lab = torch.from_numpy(labels)
            valid = (lab >= 0) & (lab < logp.shape[2])
            lab = torch.where(valid, lab, 0)
            ce = -logp.gather(2, lab.view(1, n, 1).expand(k, n, 1)).squeeze(2)
            mse = (denoised - xt).square_().flatten(2).mean(dim=2)
            raw = ce.mul_(self.train_config.alpha).add_(mse)
        return raw, logp, valid

    def raw_scores(self, x: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """[K, N] the paper's per-denoiser scores CE(f(D_k(x)), label) + MSE(x, D_k(x))."""
        x, labels = as_float(x), np.asarray(labels, np.int64)
        self._check(x, labels)
        parts = [
            self._forward(x[i : i + batch_size], labels[i : i + batch_size])[0].numpy()
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(parts, axis=1).astype(np.float64)

    def _normalised(
        self, x: np.ndarray, labels: np.ndarray, batch_size: int = 128
    ) -> tuple[np.ndarray, np.ndarray]:
        """([K, N] per-denoiser scores in clean std above the clean mean, [N] corrected),
        in chunks of ``batch_size`` inputs (the activations of K denoisers add up)."""
        if self._stats is None:
            raise RuntimeError("defed is not fitted")
        mean, std = self._stats
        zs, corrected = [], []
        for i in range(0, len(x), batch_size):
            raw, logp, valid = self._forward(x[i : i + batch_size], labels[i : i + batch_size])
            with torch.inference_mode():
                zs.append(torch.where(valid, (raw - mean) / std, _FAR).numpy())
                corrected.append(logp.exp().sum(dim=0).argmax(dim=1).numpy())
        if len(zs) == 1:
            return zs[0], corrected[0]
        return np.concatenate(zs, axis=1), np.concatenate(corrected)

    def score(self, batch: Batch) -> Scores:
        memo = self._memo
        if memo is not None and memo[0] is batch:
            return memo[1]
        x = as_float(batch.inputs)
        labels = np.asarray(batch.labels, dtype=np.int64)
        self._check(x, labels)
        if len(x) == 0:
            return Scores(np.zeros(0), np.zeros(0, np.int64))
        z, corrected = self._normalised(x, labels)
        return Scores(z.max(axis=0).astype(np.float64), corrected.astype(np.int64))
