"""Intermediate activations of the controller's reference copy of a model, by layer name.

Detectors that read feature maps (``Detector.needs_activations``) use what the agent
sent in PKG_IN (``Batch.activations``); for agents that send none, the controller
computes them here from its reference copy, with ``openexample/layers.py``'s ``Taps``
(forward hooks on a torch module, the module graphs of a TorchScript one), or for an
ONNX copy with the layers added as graph outputs (``OnnxTaps``; needs the ``onnx``
package).

This is daemon code: it imports nothing of the offline room.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from openexample.layers import Taps, layer_names

__all__ = ["OnnxTaps", "Taps", "layer_names", "taps_for"]


def taps_for(model: object, names: Sequence[str]) -> Taps | OnnxTaps:
    """``Taps`` over a reference model callable (``reference_model.model_fn``: its
    ``module``, or its ``onnx_path``) or a torch module; ValueError in one line when it
    cannot give them."""
    path = getattr(model, "onnx_path", None)
    if path is not None:
        return OnnxTaps(path, names)
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            "activations from the reference model need it as TorchScript or ONNX (a plain"
            " callable reference model cannot give them: agents must send them)"
        )
    return Taps(module, names)


class OnnxTaps:
    """The activations of ``names`` in an ONNX reference copy (the file reloaded with
    them as graph outputs), with ``Taps``' two calls: torch tensors or numpy in."""

    def __init__(self, path: str | Path, names: Sequence[str]) -> None:
        from controller.reference_model import onnx_activations_fn

        self.names = list(names)
        self._fn = onnx_activations_fn(path, self.names)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(a) for n, a in self.numpy(x.numpy()).items()}

    def numpy(self, x: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        return self._fn(np.asarray(x))
