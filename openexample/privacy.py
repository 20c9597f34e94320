"""Local differential privacy of what an agent sends about one input (DeSVig Table II,
R_Noise). Shared by both planes: the agent noises (``PrivacyNoise.apply``), the controller
checks that what an agent declares in FEATURES is what its detectors were calibrated for
(``PrivacyNoise.from_pb``, ``matches``), and training calibrates on inputs noised the same
way. Pure code: numpy and math, no clock, no I/O.

The mechanism, for one input x with every element in ``input_range`` = [lo, hi]:

1. v = x - centre, with a public constant centre (default: the middle of the range);
2. v is scaled down to norm ``clip`` when it is longer (L2 for Gaussian, L1 for Laplace;
   default clip: the radius of the input box around the centre, so nothing is scaled);
3. noise is added to every element: N(0, sigma^2) (Gaussian) or Laplace(b);
4. centre is added back and the result clipped into [lo, hi] (rounded for integer dtypes):
   post-processing, which keeps the guarantee.

In local DP any two inputs are neighbours, so the sensitivity is the diameter of the set
step 2 maps inputs into: 2 x clip under the mechanism's norm, for the whole input (not
per element: the old per-element noise composed to d x epsilon over d elements).
Gaussian: sigma of the analytic Gaussian mechanism (Balle & Wang, ICML 2018, Theorem 8),
the smallest sigma with Phi(D/2s - e s/D) - exp(e) Phi(-D/2s - e s/D) <= delta (D the
sensitivity, e epsilon, s sigma), exact for every epsilon > 0; the classic
D sqrt(2 ln(1.25/delta)) / epsilon is only proven for epsilon < 1 and is larger there.
Laplace: b = D / epsilon per element, epsilon-DP under L1.

What PKG_IN carries of the model's output (``logits``): ``raw``, the logits as they are
(then no finite epsilon covers the item: ``total_epsilon`` is infinite); ``label``, none
(confidence 0: detectors that read logits compute them from the controller's reference
model on the noised input); ``noised``, each row centred (softmax does not change), its
norm clipped to ``logits_clip`` and noised by the same mechanism at ``logits_epsilon`` and
the same delta, so an item reveals (epsilon + logits_epsilon, 2 delta) by basic
composition. The label the model gave goes up as is in every mode (detectors check the
input against it, RT entries are keyed by it): the guarantee holds between any two inputs
the model labels alike. Which inputs are sent at all follows the vigilance rules (a rule
on a confidence range says the confidence was in it). Sampling uses numpy's generator in
floating point: no defence against floating-point side channels (Mironov, CCS 2012).

Spec strings (agent ``privacy``, ``openexample-controller train --privacy``)::

    none[,logits=label]
    gaussian:EPS[:DELTA][,clip=C][,centre=V][,logits=raw|label|noised:EPS_L][,logits_clip=C]
    laplace:EPS[,clip=C][,centre=V][,logits=...]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from openexample.v1 import openexample_pb2 as pb

MECHANISMS = ("none", "gaussian", "laplace")
LOGITS_MODES = ("raw", "label", "noised")
DEFAULT_DELTA = 1e-5
DEFAULT_LOGITS_CLIP = 10.0
SPEC_HELP = (
    "none, gaussian:EPS[:DELTA] or laplace:EPS, then ,clip=C ,centre=V"
    " ,logits=raw|label|noised:EPS ,logits_clip=C"
)

_MECH_PB = {
    "none": pb.NOISE_MECHANISM_NONE,
    "gaussian": pb.NOISE_MECHANISM_GAUSSIAN,
    "laplace": pb.NOISE_MECHANISM_LAPLACE,
}
_MECH_NAME = {v: k for k, v in _MECH_PB.items()} | {pb.NOISE_MECHANISM_UNSPECIFIED: "none"}
_LOGITS_PB = {
    "raw": pb.LOGITS_MODE_RAW,
    "label": pb.LOGITS_MODE_LABEL,
    "noised": pb.LOGITS_MODE_NOISED,
}
_LOGITS_NAME = {v: k for k, v in _LOGITS_PB.items()} | {pb.LOGITS_MODE_UNSPECIFIED: "raw"}
_NORM_PB = {"": pb.NOISE_NORM_UNSPECIFIED, "l1": pb.NOISE_NORM_L1, "l2": pb.NOISE_NORM_L2}
_SQRT2 = math.sqrt(2.0)


# ---- the Gaussian mechanism's calibration ------------------------------------------------


def _log_ndtr(t: float) -> float:
    """log Phi(t), also far in the lower tail (where Phi underflows)."""
    if t > -20.0:
        return math.log(0.5 * math.erfc(-t / _SQRT2))
    t2 = t * t  # asymptotic series of Mills' ratio; relative error < 1e-9 here
    series = 1.0 - 1.0 / t2 + 3.0 / t2**2 - 15.0 / t2**3
    return -0.5 * t2 - math.log(-t) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The smallest delta for which N(0, sigma^2) noise on a query of L2 sensitivity
    ``sensitivity`` is (epsilon, delta)-DP (Balle & Wang 2018, Theorem 8)."""
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    first = 0.5 * math.erfc(-(a - b) / _SQRT2)
    # e^eps Phi(-a - b) <= e^eps Phi(-sqrt(2 eps)) < 1: in log space, it cannot overflow
    return first - math.exp(min(epsilon + _log_ndtr(-a - b), 0.0))


@functools.lru_cache(maxsize=256)  # a bisection: once per setting, not per PKG_IN
def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest sigma (to ~1e-12 relative) for which Gaussian noise is (epsilon,
    delta)-DP at this L2 sensitivity: the analytic Gaussian mechanism."""
    if not (math.isfinite(epsilon) and epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError(f"gaussian_sigma({epsilon}, {delta}, {sensitivity})")
    hi = sensitivity
    while gaussian_delta(hi, epsilon, sensitivity) > delta:
        hi *= 2.0
    lo = hi / 2.0
    while gaussian_delta(lo, epsilon, sensitivity) <= delta:
        lo /= 2.0
    for _ in range(200):  # bisection on log sigma; hi always satisfies the bound
        mid = math.sqrt(lo * hi)
        if gaussian_delta(mid, epsilon, sensitivity) <= delta:
            hi = mid
        else:
            lo = mid
        if hi / lo - 1.0 < 1e-13:
            break
    return hi


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Dwork & Roth's sigma (Theorem A.1): a valid bound only for epsilon < 1."""
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


# ---- the spec ---------------------------------------------------------------------------


def _num(x: float) -> str:
    """Shortest text that reads back as the same float (``4`` for 4.0)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _positive(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return x


@dataclass(frozen=True, slots=True)
class PrivacyNoise:
    """One model's privacy noise; see the module docstring. ``clip`` and ``centre`` None:
    the defaults, fixed for an input shape by :meth:`resolved`. ``logits`` None: ``label``
    with noise, ``raw`` without."""

    mechanism: str = "gaussian"
    epsilon: float = 1.0
    delta: float = DEFAULT_DELTA
    clip: float | None = None
    centre: float | None = None
    input_range: tuple[float, float] = (0.0, 1.0)
    logits: str | None = None
    logits_epsilon: float = 0.0
    logits_clip: float = DEFAULT_LOGITS_CLIP

    def __post_init__(self) -> None:
        def put(key: str, value: Any) -> None:
            object.__setattr__(self, key, value)

        if self.mechanism not in MECHANISMS:
            raise ValueError(f"noise mechanism {self.mechanism!r}: none, gaussian or laplace")
        noised = self.mechanism != "none"
        try:
            lo, hi = (float(v) for v in self.input_range)
        except (TypeError, ValueError):
            raise ValueError(f"input_range must be (lo, hi), got {self.input_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"input_range must be finite lo < hi, got {self.input_range!r}")
        put("input_range", (lo, hi))
        logits = self.logits if self.logits is not None else ("label" if noised else "raw")
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be raw, label or noised, got {logits!r}")
        put("logits", logits)
        if not noised:  # nothing else means anything: one canonical form
            if logits == "noised":
                raise ValueError(
                    "logits=noised needs noise on the input too (gaussian or laplace):"
                    " raw inputs give the logits away"
                )
            for key, value in (("epsilon", math.inf), ("delta", 0.0), ("clip", None)):
                put(key, value)
            put("centre", None)
            put("logits_epsilon", 0.0)
            put("logits_clip", DEFAULT_LOGITS_CLIP)
            return
        put("epsilon", _positive(self.epsilon, "epsilon"))
        if self.mechanism == "gaussian":
            delta = float(self.delta)
            if not 0.0 < delta < 1.0:
                raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
            put("delta", delta)
        else:
            put("delta", 0.0)  # Laplace is pure epsilon-DP
        if self.clip is not None:
            put("clip", _positive(self.clip, "clip"))
        if self.centre is not None:
            c = float(self.centre)
            if not math.isfinite(c):
                raise ValueError(f"centre must be finite, got {self.centre!r}")
            put("centre", c)
        put("logits_clip", _positive(self.logits_clip, "logits_clip"))
        if logits == "noised":
            put("logits_epsilon", _positive(self.logits_epsilon, "logits epsilon"))
        else:
            put("logits_epsilon", 0.0)

    # -- parsing and printing ----------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str, input_range: tuple[float, float] = (0.0, 1.0)) -> PrivacyNoise:
        """A spec string (module docstring); ValueError naming what is wrong."""
        if not isinstance(spec, str):
            raise ValueError(f"privacy spec must be a string, got {spec!r}")
        head, *opts = (p.strip() for p in spec.strip().lower().split(","))
        name, *params = head.split(":")
        kw: dict[str, Any] = {"input_range": input_range}
        bad = ValueError(f"bad privacy spec {spec!r} (want {SPEC_HELP})")
        if name not in MECHANISMS:
            raise bad
        if name == "none" and params:
            raise bad
        if name != "none":
            if not params or len(params) > (2 if name == "gaussian" else 1):
                raise bad
            kw["epsilon"] = _positive(params[0], "epsilon")
            if len(params) > 1:
                kw["delta"] = _positive(params[1], "delta")
        keys = {"clip": "clip", "centre": "centre", "center": "centre"}
        for opt in opts:
            key, sep, value = opt.partition("=")
            key = key.strip()
            if not sep:
                raise bad
            if key in keys:
                kw[keys[key]] = _positive(value, key) if key == "clip" else _finite(value, key)
            elif key == "logits_clip":
                kw["logits_clip"] = _positive(value, key)
            elif key == "logits":
                mode, _, budget = value.strip().partition(":")
                kw["logits"] = mode
                if mode == "noised":
                    if not budget:
                        raise ValueError("logits=noised needs its own budget: logits=noised:EPS")
                    kw["logits_epsilon"] = _positive(budget, "logits epsilon")
                elif budget:
                    raise ValueError(f"logits={value.strip()}: only noised takes a budget")
            else:
                raise ValueError(
                    f"privacy option {key!r}: clip, centre, logits or logits_clip ({SPEC_HELP})"
                )
        return cls(mechanism=name, **kw)

    def __str__(self) -> str:
        """The canonical spec: ``parse(str(p), p.input_range) == p``."""
        if self.mechanism == "none":
            return "none" if self.logits == "raw" else f"none,logits={self.logits}"
        head = f"{self.mechanism}:{_num(self.epsilon)}"
        if self.mechanism == "gaussian":
            head += f":{_num(self.delta)}"
        parts = [head]
        if self.clip is not None:
            parts.append(f"clip={_num(self.clip)}")
        if self.centre is not None:
            parts.append(f"centre={_num(self.centre)}")
        if self.logits == "noised":
            parts.append(f"logits=noised:{_num(self.logits_epsilon)}")
            parts.append(f"logits_clip={_num(self.logits_clip)}")
        else:
            parts.append(f"logits={self.logits}")
        return ",".join(parts)

    # -- derived values ----------------------------------------------------------------------

    @property
    def on(self) -> bool:
        """Noise is added to inputs."""
        return self.mechanism != "none"

    @property
    def norm(self) -> str:
        """The norm of clip and sensitivity: ``l2`` (Gaussian), ``l1`` (Laplace), or ""."""
        return {"gaussian": "l2", "laplace": "l1"}.get(self.mechanism, "")

    @property
    def centre_value(self) -> float:
        lo, hi = self.input_range
        return self.centre if self.centre is not None else (lo + hi) / 2.0

    def radius(self, size: int) -> float:
        """The largest norm of (x - centre) over inputs of ``size`` elements in range."""
        lo, hi = self.input_range
        c = self.centre_value
        reach = max(hi - c, c - lo, 0.0)
        return reach * (math.sqrt(size) if self.norm == "l2" else float(size))

    def resolved(self, shape: Sequence[int] | int) -> PrivacyNoise:
        """This noise with clip and centre fixed for inputs of ``shape`` (one sample)."""
        if not self.on or (self.clip is not None and self.centre is not None):
            return self
        size = shape if isinstance(shape, int) else math.prod(int(d) for d in shape)
        clip = self.clip if self.clip is not None else self.radius(size)
        return dataclasses.replace(self, clip=clip, centre=self.centre_value)

    def _need_clip(self) -> float:
        if self.clip is None:
            raise ValueError("privacy noise without a clip: resolved(input_shape) first")
        return self.clip

    @property
    def sensitivity(self) -> float:
        """Of the whole input under ``norm``: the diameter of the clipped set."""
        return 2.0 * self._need_clip() if self.on else 0.0

    def _scale(self, epsilon: float, sensitivity: float) -> float:
        if self.mechanism == "gaussian":
            return gaussian_sigma(epsilon, self.delta, sensitivity)
        return sensitivity / epsilon  # Laplace's b

    @property
    def scale(self) -> float:
        """Per element: the Gaussian's sigma or the Laplace's b (0 without noise)."""
        return self._scale(self.epsilon, self.sensitivity) if self.on else 0.0

    @property
    def logits_scale(self) -> float:
        if self.logits != "noised":
            return 0.0
        return self._scale(self.logits_epsilon, 2.0 * self.logits_clip)

    @property
    def total_epsilon(self) -> float:
        """What one item reveals about its input in all (inf: no guarantee)."""
        if not self.on or self.logits == "raw":
            return math.inf
        return self.epsilon + self.logits_epsilon

    @property
    def total_delta(self) -> float:
        if not self.on or self.logits == "raw":
            return 0.0
        return self.delta * (2 if self.logits == "noised" else 1)

    # -- the mechanism -----------------------------------------------------------------------

    def _clip_and_noise(
        self, v: np.ndarray, clip: float, scale: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Rows of ``v`` [N, d] (float64, changed in place) scaled to norm <= clip, plus
        noise of ``scale`` per element."""
        order = 2 if self.norm == "l2" else 1
        norms = np.linalg.norm(v, ord=order, axis=1, keepdims=True)
        np.multiply(v, np.minimum(1.0, clip / np.maximum(norms, 1e-300)), out=v)
        if self.mechanism == "gaussian":
            v += rng.normal(0.0, scale, size=v.shape)
        else:
            v += rng.laplace(0.0, scale, size=v.shape)
        return v

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noised copy of the batch ``x`` [N, *input_shape], one input per row, with the
        same dtype (integer inputs are rounded)."""
        if not self.on:
            return x
        x = np.asarray(x)
        noise = self.resolved(x.shape[1:])
        n = x.shape[0]
        c = noise.centre_value
        v = x.reshape(n, -1).astype(np.float64) - c
        v = self._clip_and_noise(v, noise._need_clip(), noise.scale, rng)
        v += c
        np.clip(v, *self.input_range, out=v)
        if x.dtype.kind in "ui":
            np.rint(v, out=v)
        return v.reshape(x.shape).astype(x.dtype)

    def noise_logits(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What ``logits`` mode ``noised`` sends for ``logits`` [N, C] (float32)."""
        v = np.asarray(logits, dtype=np.float64)
        v = v - v.mean(axis=1, keepdims=True)  # softmax-invariant: only the spread counts
        v = self._clip_and_noise(v, self.logits_clip, self.logits_scale, rng)
        return v.astype(np.float32)

    # -- wire and manifest -------------------------------------------------------------------

    def to_pb(self) -> pb.PrivacyNoise:
        """FEATURES' descriptor (a resolved clip is required with noise)."""
        out = pb.PrivacyNoise(
            mechanism=_MECH_PB[self.mechanism],
            norm=_NORM_PB[self.norm],
            logits=_LOGITS_PB[self.logits],  # type: ignore[index]
            total_epsilon=self.total_epsilon,
            total_delta=self.total_delta,
        )
        if self.on:
            out.epsilon, out.delta = self.epsilon, self.delta
            out.sensitivity, out.clip, out.centre = self.sensitivity, self.clip, self.centre_value
        if self.logits == "noised":
            out.logits_epsilon, out.logits_clip = self.logits_epsilon, self.logits_clip
        return out

    @classmethod
    def from_pb(cls, m: pb.PrivacyNoise | None) -> PrivacyNoise:
        """What an agent declared (None or an absent field: no noise, raw logits);
        ValueError when it is not a usable noise."""
        if m is None:
            return NO_NOISE
        name = _MECH_NAME.get(m.mechanism)
        logits = _LOGITS_NAME.get(m.logits)
        if name is None or logits is None:
            raise ValueError(f"unknown mechanism {m.mechanism} or logits mode {m.logits}")
        if name == "none":
            return cls("none", logits=logits)
        return cls(
            name,
            epsilon=_f32(m.epsilon),
            delta=_f32(m.delta) if name == "gaussian" else 0.0,
            clip=_f32(m.clip),
            centre=_f32(m.centre),
            logits=logits,
            logits_epsilon=_f32(m.logits_epsilon),
            logits_clip=_f32(m.logits_clip) if logits == "noised" else DEFAULT_LOGITS_CLIP,
        )

    def matches(self, other: PrivacyNoise) -> bool:
        """The same noise as the wire carries it (float32), ``input_range`` aside."""
        return self.to_pb() == other.to_pb()

    def to_dict(self) -> dict[str, Any]:
        """What an artifact's manifest records (JSON: no infinities)."""
        total = self.total_epsilon
        return {
            "spec": str(self),
            "mechanism": self.mechanism,
            "epsilon": self.epsilon if self.on else None,
            "delta": self.delta,
            "norm": self.norm,
            "clip": self.clip,
            "centre": self.centre,
            "input_range": list(self.input_range),
            "logits": self.logits,
            "logits_epsilon": self.logits_epsilon,
            "logits_clip": self.logits_clip,
            "sensitivity": self.sensitivity if self.clip is not None or not self.on else None,
            "scale": self.scale if self.clip is not None or not self.on else None,
            "logits_scale": self.logits_scale,
            "total_epsilon": total if math.isfinite(total) else None,
            "total_delta": self.total_delta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PrivacyNoise:
        """Inverse of ``to_dict`` (None: an artifact calibrated without noise)."""
        if not d:
            return NO_NOISE
        keys = ("mechanism", "delta", "clip", "centre", "logits", "logits_epsilon", "logits_clip")
        kw = {k: d[k] for k in keys if k in d}
        if d.get("epsilon") is not None:
            kw["epsilon"] = d["epsilon"]
        if "input_range" in d:
            kw["input_range"] = tuple(d["input_range"])
        noise = cls(**kw)
        if noise.on and noise.clip is None:
            raise ValueError(f"privacy {noise} recorded without its clip")
        return noise


def _f32(value: float) -> float:
    """A float32 off the wire as the shortest decimal that is the same float32 (1e-05,
    not 9.99999974e-06): what the sender most likely wrote."""
    return float(str(np.float32(value)))


def _finite(value: str, what: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return x


NO_NOISE = PrivacyNoise("none")
