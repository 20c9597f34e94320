"""The controller's reference copy of a model, loaded as a numpy function.

Detectors that call the model (``Detector.needs_model``) get it from here: the config's
``reference_model``, or the model file recorded in an artifact's manifest. The format is
TorchScript, the one the controller config names for reference copies (docs/architecture.md).
This is daemon code: ``serve`` loads it, and it imports nothing of the offline room
(controller/training).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from controller.detectors.base import ModelFn

__all__ = ["load_model", "model_fn", "quiet_torchscript"]


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch.jit's deprecation warning (loading, and tracing in the offline room)."""
    # torch.jit is deprecated upstream but is still the format the design names; keep the
    # warning out of users' logs (the switch to torch.export is a separate decision).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        yield


def load_model(path: str | Path) -> torch.jit.ScriptModule:
    """Load a TorchScript model on the CPU, in eval mode."""
    with quiet_torchscript():
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


def model_fn(path: str | Path, batch_size: int = 512) -> ModelFn:
    """A TorchScript file as a numpy callable: inputs [N, ...] -> logits [N, C].

    The callable's ``module`` attribute is the TorchScript module itself, for detectors
    that train through the model (gradients) or run it on torch tensors
    (:func:`controller.detectors.nets.module_of`).
    """
    model = load_model(path)

    def predict(x: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                # writable: torch warns about (and would share) a read-only buffer
                part = np.require(x[i : i + batch_size], requirements=("C", "W"))
                out.append(model(torch.from_numpy(part)))
        return torch.cat(out).numpy().astype(np.float32)

    predict.module = model  # type: ignore[attr-defined]
    return predict
