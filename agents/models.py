"""One face for every kind of model: ``predict(x[N, ...]) -> logits[N, C]`` on numpy.

Wraps a ``torch.nn.Module``, a TorchScript file, an ONNX file (onnxruntime, imported
only when needed) or any callable on numpy arrays, and says what FEATURES_REPLY needs:
input shape and dtype, framework tag and the digest of the model file.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openexample.digests import file_digest

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
}


class ModelAdapter:
    """A wrapped model. ``input_shape`` is one input without the batch dimension."""

    def __init__(
        self,
        predict: Callable[[np.ndarray], Any],
        *,
        framework: str,
        input_shape: Sequence[int] | None = None,
        input_dtype: Any = np.float32,
        digest: str = "",
        module: Any = None,
    ) -> None:
        self._predict = predict
        self.framework = framework
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape else None
        self.input_dtype = np.dtype(input_dtype)
        self.digest = digest
        self.module = module  # the torch module, for activation hooks

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[N, C]`` (float32) for a batch ``x [N, *input_shape]``."""
        out = np.asarray(self._predict(x))
        if out.ndim == 1:  # a model that returns one row for a batch of one
            out = out[None]
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"model returned shape {out.shape} for a batch of {x.shape[0]}")
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def activations_fn(self, names: Sequence[str]) -> Callable[[np.ndarray], dict]:
        """A function from inputs [N, ...] to the named layers' activations {name: [N, ...]}
        (float32 numpy, on the CPU), for ``AgentConfig.activations``. ValueError in one
        line when this model cannot give them: a wrong name lists the layers there are.

        A torch module gets forward hooks on a private copy (a hook on the user's module
        would also fire for calls on other threads); TorchScript takes no hooks, and its
        module graphs are read instead (openexample/layers.py), on the module itself."""
        if self.module is None:
            raise ValueError(
                f"activations: a {self.framework} model cannot send them (torch and TorchScript"
                " models can; an ONNX model's intermediate outputs need the onnx package):"
                " leave activations empty and let the controller compute them from its"
                " reference copy"
            )
        import torch

        from openexample.layers import Taps

        module = self.module
        if not isinstance(module, torch.jit.ScriptModule):
            module = copy.deepcopy(module).to("cpu").eval()
        try:
            taps = Taps(module, names)
        except ValueError as exc:
            raise ValueError(f"activations: {exc}") from None
        return taps.numpy


def wrap_model(
    model: Any,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: Any = None,
) -> ModelAdapter:
    """Wrap ``model``: an nn.Module, a path to a .pt/.onnx file, or a numpy callable."""
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} not found")
        if path.suffix.lower() == ".onnx":
            return _wrap_onnx(path, input_shape, input_dtype)
        return _wrap_torchscript(path, input_shape, input_dtype)
    torch = _torch_if_loaded()
    if torch is not None and isinstance(model, torch.nn.Module):
        framework = "torchscript" if isinstance(model, torch.jit.ScriptModule) else "torch"
        return _wrap_torch(model, framework, "", input_shape, input_dtype)
    if callable(model):
        return ModelAdapter(
            model,
            framework="callable",
            input_shape=input_shape,
            input_dtype=input_dtype or np.float32,
        )
    raise TypeError(f"cannot wrap {type(model).__name__}: not a model, a model file or a callable")


def _torch_if_loaded() -> Any:
    # A model object can only be a torch module if torch is already imported.
    import sys

    return sys.modules.get("torch")


def _wrap_torch(
    module: Any, framework: str, digest: str, input_shape: Any, input_dtype: Any
) -> ModelAdapter:
    import torch

    module.eval()
    try:
        device = next(module.parameters()).device
    except (StopIteration, AttributeError, RuntimeError):
        device = torch.device("cpu")

    def predict(x: np.ndarray) -> np.ndarray:
        if not x.flags.writeable:  # torch.from_numpy refuses to share read-only memory
            x = x.copy()
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to(device))
        if isinstance(out, tuple | list):  # e.g. (logits, features)
            out = out[0]
        return out.detach().to("cpu", torch.float32).numpy()

    return ModelAdapter(
        predict,
        framework=framework,
        input_shape=input_shape,
        input_dtype=input_dtype or np.float32,
        digest=digest,
        module=module,
    )


def _wrap_torchscript(path: Path, input_shape: Any, input_dtype: Any) -> ModelAdapter:
    import torch

    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; files remain
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} is neither an .onnx file nor a TorchScript file: {exc}") from exc
    return _wrap_torch(module, "torchscript", file_digest(path), input_shape, input_dtype)


def _wrap_onnx(path: Path, input_shape: Any, input_dtype: Any) -> ModelAdapter:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            f"{path} is an ONNX model but onnxruntime is not installed: pip install onnxruntime"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    if input_shape is None:
        dims = list(inp.shape)[1:]  # first dim is the batch
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            input_shape = dims
    if input_dtype is None:
        input_dtype = _ONNX_DTYPES.get(inp.type, np.float32)
    name = inp.name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return ModelAdapter(
        predict,
        framework="onnx",
        input_shape=input_shape,
        input_dtype=input_dtype,
        digest=file_digest(path),
    )
