"""Intermediate activations of the controller's reference copy of a model, by layer name.

Detectors that read feature maps (``Detector.needs_activations``) use what the agent
sent in PKG_IN (``Batch.activations``); for agents that send none, the controller
computes them here from its reference copy, with ``openexample/layers.py``'s ``Taps``
(forward hooks on a torch module, the module graphs of a TorchScript one). An ONNX
reference copy cannot give them (adding graph outputs needs the ``onnx`` package, which
the controller does not install): such agents must send the activations themselves.

This is daemon code: it imports nothing of the offline room.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openexample.layers import Taps, layer_names

__all__ = ["Taps", "layer_names", "taps_for"]


def taps_for(model: object, names: Sequence[str]) -> Taps:
    """``Taps`` over a reference model callable (``reference_model.model_fn``: its
    ``module``) or a torch module; ValueError in one line when it cannot give them."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            "activations from the reference model need it as TorchScript (an ONNX or plain"
            " callable reference model cannot give them: agents must send them)"
        )
    return Taps(module, names)
