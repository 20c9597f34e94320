"""Differentiable surrogates of detector scores, for the adaptive attacks (bench/adaptive.py).

The bench's alone: the product scores with the detectors themselves. Each surrogate's
forward value is the detector's score (up to float32 rounding), so a hinge under the
threshold means what it says; only the gradient is approximated where the score is not
differentiable (BPDA, Athalye et al. 2018):

- ``margin``: exact (softmax top-1 minus top-2, negated).
- ``robust``: exact (the robust reference model's top log-probability minus the claimed
  label's).
- ``magnet``: exact (its autoencoders, the model on the reformed input, JSD, the clean
  knots' piecewise-linear normalisation).
- ``desvig``: the encoder and generator in torch from the artifact's weights (exact); the
  L1 distance (exact); the average hash through PIL's LANCZOS resize as the same matrices
  hashing.py uses, with every uint8 rounding passed straight through and each bit
  ``px > mean(px)`` given the gradient of a sigmoid of temperature ``TEMPERATURE`` grey
  levels. The iterative refinement (``refine_steps``) is not in the surrogate: a
  detector that uses it is attacked through the encoder's guess alone.

:func:`surrogate` returns None for a detector without one; the attack then ignores it,
and the report says so.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from controller.detectors import hashing
from controller.detectors.base import Detector

TEMPERATURE = 2.0  # grey levels: the soft hash bits' width around the mean


class Surrogate(Protocol):
    name: str
    threshold: float
    scale: float  # the threshold's unit for the slack (|threshold|, or 1)

    def score(self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """[N] differentiable scores of inputs ``x`` claimed as ``label``."""
        ...

    def hinge(
        self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor, slack: float
    ) -> torch.Tensor:
        """[N] how far each score is above ``threshold - slack * scale``, in ``scale``s."""
        ...


class _Base:
    name = ""

    def __init__(self, det: Detector) -> None:
        assert det.threshold is not None
        self.threshold = float(det.threshold)
        self.scale = abs(self.threshold) or 1.0

    def score(self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hinge(
        self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor, slack: float
    ) -> torch.Tensor:
        aim = self.threshold - slack * self.scale
        return torch.relu(self.score(x, logits, label) - aim) / self.scale


class MarginSurrogate(_Base):
    name = "margin"

    def score(self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        top2 = torch.softmax(logits.double(), dim=1).topk(2, dim=1).values
        return -(top2[:, 0] - top2[:, 1])


def _ste_round(v: torch.Tensor) -> torch.Tensor:
    """round half to even forward (numpy's rint), identity backward."""
    return v + (torch.round(v) - v).detach()


class DesvigSurrogate(_Base):
    name = "desvig"

    def __init__(self, det: Any) -> None:
        super().__init__(det)
        cgan = det.cgan
        w = {k: torch.from_numpy(v.copy()) for k, v in cgan.w.items()}
        self.shape, self.pool, seen = cgan.shape, cgan.pool, cgan._e_x.shape[0]
        self.e_x, self.e_y, self.e_w2, self.e_b2 = (
            w["e_w1"][:seen],
            w["e_w1"][seen:],
            w["e_w2"],
            w["e_b2"],
        )
        self.e_b1 = w["e_b1"]
        self.g_z, self.g_y = w["g_w1"][: cgan.latent], w["g_w1"][cgan.latent :]
        self.g_b1, self.g_w2, self.g_b2 = w["g_b1"], w["g_w2"], w["g_b2"]
        self.hamming_only = det.distance == "hash"
        self.tie_break = det.tie_break
        self.scales = torch.from_numpy(det.scales.astype("float64"))
        _, h, wd = self.shape
        self.passes = [
            (kind, torch.from_numpy(m.copy()))
            for kind, m in hashing._passes(h, wd, hashing.HASH_SIZE, hashing.HASH_SIZE)
        ]

    def copy(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """G(E(x, y), y), [N, pixels] in [0, 1] (float32, as the detector's)."""
        n = len(x)
        flat = x.reshape(n, *self.shape)
        if self.pool > 1:
            flat = torch.nn.functional.avg_pool2d(flat, self.pool)
        flat = flat.reshape(n, -1)
        h = torch.relu(flat @ self.e_x + self.e_y[label] + self.e_b1)
        z = h @ self.e_w2 + self.e_b2
        g = torch.relu(z @ self.g_z + self.g_y[label] + self.g_b1)
        return torch.sigmoid(g @ self.g_w2 + self.g_b2)

    def bits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 64] average-hash bits: exact forward, sigmoid gradient backward."""
        n = len(images)
        _, rows, cols = self.shape
        out = _ste_round(images.double() * 255.0).clamp(0, 255).reshape(n, rows * cols)
        for kind, m in self.passes:
            if kind == "h":
                out = (out.reshape(n * rows, cols) @ m).reshape(n, -1)
                cols = m.shape[1]
            else:
                out = (m @ out.reshape(n, rows, cols)).reshape(n, -1)
                rows = m.shape[0]
            out = _ste_round(out).clamp(0, 255)  # PIL rounds to uint8 after each pass
        diff = out - out.mean(dim=1, keepdim=True)
        hard = (diff > 0).double()
        soft = torch.sigmoid(diff / TEMPERATURE)
        return hard + (soft - soft.detach())

    def score(self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        n = len(x)
        flat = x.reshape(n, -1)
        g = self.copy(x, label)
        ham = (self.bits(flat) - self.bits(g)).abs().sum(dim=1)
        diff = (flat - g).double()
        if self.tie_break:
            mse = (diff * diff).mean(dim=1)
            ham = ham + mse / (1.0 + mse)
        if self.hamming_only:
            return ham
        l1 = diff.abs().sum(dim=1)
        return torch.maximum(ham / self.scales[0], l1 / self.scales[1])


def _interp(v: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp in torch (flat outside the knots), differentiable in ``v``."""
    i = torch.searchsorted(xp, v.detach()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = ((v - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + t * (f1 - f0)


def _jsd(p: torch.Tensor, q: torch.Tensor, t: float) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) of softmax(p / t) and softmax(q / t)."""
    lp = torch.log_softmax(p.double() / t, dim=1)
    lq = torch.log_softmax(q.double() / t, dim=1)
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    out = 0.5 * ((lp.exp() * (lp - lm)).sum(1) + (lq.exp() * (lq - lm)).sum(1))
    return out.clamp_min(0.0)


class MagnetSurrogate(_Base):
    """MagNet exact: its autoencoders and the model in torch, the reconstruction errors,
    the JSD of the model on x and on the reformed x, each normalised through its clean
    knots, the largest of them."""

    name = "magnet"

    def __init__(self, det: Any) -> None:
        super().__init__(det)
        self.det = det
        self.module = det.model.module  # the reference model's TorchScript module
        self.knots = {
            d: (torch.from_numpy(xp.astype("float64")), torch.from_numpy(fp.astype("float64")))
            for d, (xp, fp) in det._knots.items()
        }

    def score(self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        det, n = self.det, len(x)
        rec = {key: det.aes[key](x) for key in det.aes}
        raw: dict[str, torch.Tensor] = {}
        recon, names, temps = det._spec
        for d, key, p in recon:
            diff = (x.reshape(n, -1) - rec[key].reshape(n, -1)).double()
            raw[d] = diff.abs().sum(1) if p == 1 else diff.square().sum(1).sqrt()
        if names:
            reformed = self.module(rec["I"])
            for d, t in zip(names, temps, strict=True):
                raw[d] = _jsd(logits, reformed, float(t))
        z = torch.stack([_interp(raw[d], *self.knots[d]) for d in det.detectors])
        return z.max(dim=0).values


class RobustSurrogate(_Base):
    """The robust reference model's disagreement, exact: its network in torch, the top
    log-probability minus the claimed label's."""

    name = "robust"

    def __init__(self, det: Any) -> None:
        super().__init__(det)
        self.net = det.net

    def score(self, x: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(self.net(x).double(), dim=1)
        return lp.max(dim=1).values - lp.gather(1, label[:, None].long())[:, 0]


def surrogate(det: Detector) -> Surrogate | None:
    """The surrogate of ``det``'s score, or None when there is none (yet)."""
    if det.name == "robust" and getattr(det, "net", None) is not None:
        return RobustSurrogate(det)
    if det.name == "margin":
        return MarginSurrogate(det)
    if det.name == "desvig" and getattr(det, "hash", None) == "average":
        return DesvigSurrogate(det)
    if det.name == "magnet" and hasattr(getattr(det, "model", None), "module"):
        return MagnetSurrogate(det)
    return None
