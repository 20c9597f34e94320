"""Local differential-privacy noise on what the agent sends (DeSVig Table II, R_Noise).

The controller only ever sees noisy inputs; the fingerprint for RT/FT is taken on the
raw input before noise, so the label tables still work. The noise is calibrated per
input with sensitivity = the input's value range (one element can move that far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from openexample.v1 import openexample_pb2 as pb

_MECHANISMS = {
    "none": pb.NOISE_MECHANISM_NONE,
    "laplace": pb.NOISE_MECHANISM_LAPLACE,
    "gaussian": pb.NOISE_MECHANISM_GAUSSIAN,
}


@dataclass(frozen=True, slots=True)
class PrivacyNoise:
    """One model's noise: ``laplace`` (epsilon-DP) or ``gaussian`` ((epsilon, delta)-DP)."""

    mechanism: str = "laplace"
    epsilon: float = 1.0
    delta: float = 1e-5
    sensitivity: float = 1.0
    # Noisy values are clipped back into the input range: post-processing keeps the
    # guarantee and the controller gets inputs the model could have seen.
    clip: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.mechanism not in _MECHANISMS:
            raise ValueError(f"noise mechanism {self.mechanism!r}: laplace, gaussian or none")
        if self.mechanism != "none":
            if not (math.isfinite(self.epsilon) and self.epsilon > 0):
                raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
            if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
                raise ValueError(f"sensitivity must be > 0, got {self.sensitivity}")
        if self.mechanism == "gaussian" and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @classmethod
    def parse(cls, spec: str, input_range: tuple[float, float] = (0.0, 1.0)) -> PrivacyNoise:
        """``"laplace:EPS"``, ``"gaussian:EPS[:DELTA]"`` or ``"none"``."""
        name, *params = spec.strip().lower().split(":")
        lo, hi = input_range
        kw: dict = {"sensitivity": float(hi - lo), "clip": (float(lo), float(hi))}
        try:
            if params:
                kw["epsilon"] = float(params[0])
            if len(params) > 1:
                kw["delta"] = float(params[1])
        except ValueError:
            raise ValueError(f"bad privacy spec {spec!r}") from None
        if len(params) > 2 or (name != "none" and not params):
            raise ValueError(f"bad privacy spec {spec!r} (want laplace:EPS or gaussian:EPS[:D])")
        return cls(mechanism=name, **kw)

    @property
    def scale(self) -> float:
        """Laplace b = sensitivity / epsilon; Gaussian sigma of the classic mechanism."""
        if self.mechanism == "laplace":
            return self.sensitivity / self.epsilon
        if self.mechanism == "gaussian":
            return self.sensitivity * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon
        return 0.0

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noisy copy of ``x`` with the same dtype (uint8 inputs are rounded)."""
        if self.mechanism == "none":
            return x
        if self.mechanism == "laplace":
            noise = rng.laplace(0.0, self.scale, size=x.shape)
        else:
            noise = rng.normal(0.0, self.scale, size=x.shape)
        y = x.astype(np.float64) + noise
        if self.clip is not None:
            np.clip(y, self.clip[0], self.clip[1], out=y)
        if x.dtype.kind in "ui":
            y = np.rint(y)
        return y.astype(x.dtype)

    def to_pb(self) -> pb.PrivacyNoise:
        return pb.PrivacyNoise(
            mechanism=_MECHANISMS[self.mechanism],
            epsilon=self.epsilon if self.mechanism != "none" else 0.0,
            delta=self.delta if self.mechanism == "gaussian" else 0.0,
            sensitivity=self.sensitivity if self.mechanism != "none" else 0.0,
        )
