"""Shared plumbing for detectors that are small torch networks (the denoiser family).

A detector keeps its network's weights in the artifact as plain arrays (no pickle:
``state_arrays`` / ``load_state``), runs it under ``torch.inference_mode`` on CPU
(``forward``), and reaches the protected model's torch module through the controller's
reference copy (``module_of``) when it must train through the model or run it on
tensors it already holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from controller.detectors.base import ModelFn

PREFIX = "net."


def module_of(model: ModelFn | None, who: str) -> torch.nn.Module:
    """The torch module behind a reference model callable (``model_fn`` sets it)."""
    module = getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            f"{who} needs the protected model as TorchScript (a reference_model, or the"
            " model file its artifact was trained with); got a plain callable"
        )
    return module


def classify(model: ModelFn | None, x: torch.Tensor) -> np.ndarray:
    """The protected model's logits on ``x``: its TorchScript module on the tensor when
    the reference copy has one, else the plain numpy callable."""
    module = getattr(model, "module", None)
    if isinstance(module, torch.nn.Module):
        return module(x).numpy()
    if model is None:
        raise ValueError("no model to classify with")
    return np.asarray(model(x.numpy()), np.float32)


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in eval mode with no parameter gradients (a classifier trained through)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def state_arrays(net: torch.nn.Module, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """The network's parameters and buffers as named float32/int64 arrays."""
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def load_state(
    net: torch.nn.Module, arrays: Mapping[str, np.ndarray], prefix: str = PREFIX
) -> None:
    """Inverse of :func:`state_arrays` (strict: a missing or extra tensor is an error)."""
    state = {
        k[len(prefix) :]: torch.from_numpy(np.array(v))
        for k, v in arrays.items()
        if k.startswith(prefix)
    }
    net.load_state_dict(state, strict=True)
    net.eval()


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A float32 tensor over ``x`` (copied when read-only or not C-contiguous)."""
    a = np.require(np.asarray(x, dtype=np.float32), requirements=("C", "W"))
    return torch.from_numpy(a)


def forward(net: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``net`` on ``x`` in inference mode, in chunks; float32 numpy out."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out.append(net(as_tensor(x[i : i + batch_size])))
    if not out:
        raise ValueError("forward: empty input")
    return torch.cat(out).numpy()


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled index batches over ``range(n)`` for one epoch."""
    order = rng.permutation(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
