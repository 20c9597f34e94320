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
        onnx: Any = None,
    ) -> None:
        self._predict = predict
        self.framework = framework
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape else None
        self.input_dtype = np.dtype(input_dtype)
        self.digest = digest
        self.module = module  # the torch module, for activation hooks
        self.onnx = onnx  # the ONNX runner, for intermediate outputs

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
        module graphs are read instead (openexample/layers.py), on the module itself. An
        ONNX model is reloaded with the tensors as extra graph outputs (by tensor name,
        or by torch module path for files torch exported; openexample/onnx_outputs.py)."""
        if self.onnx is not None:
            try:
                return self.onnx.tap(names)
            except ValueError as exc:
                raise ValueError(f"activations: {exc}") from None
        if self.module is None:
            raise ValueError(
                f"activations: a {self.framework} model cannot send them (torch, TorchScript"
                " and ONNX models can): leave activations empty and let the controller"
                " compute them from its reference copy"
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
    runner = _OnnxRunner(path)
    inp = runner.session.get_inputs()[0]
    if input_shape is None:
        dims = list(inp.shape)[1:]  # first dim is the batch
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            input_shape = dims
    if input_dtype is None:
        input_dtype = _ONNX_DTYPES.get(inp.type, np.float32)
    return ModelAdapter(
        runner.predict,
        framework="onnx",
        input_shape=input_shape,
        input_dtype=input_dtype,
        digest=file_digest(path),
        onnx=runner,
    )


class _OnnxRunner:
    """One onnxruntime session over an ONNX file: the model's first output for
    ``predict``; :meth:`tap` reloads it once with named intermediate tensors added as
    graph outputs (openexample/onnx_outputs.py), which ``predict`` leaves unfetched."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(
                f"{path} is an ONNX model but onnxruntime is not installed: pip install onnxruntime"
            ) from None
        self._ort, self.path = ort, path
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input: x})[0]

    def tap(self, names: Sequence[str]) -> Callable[[np.ndarray], dict]:
        """inputs [N, ...] -> {name: float32 [N, ...]}; ValueError in one line."""
        from openexample.onnx_outputs import with_outputs

        data, tensors = with_outputs(self.path, names)
        session = self._ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.session = session  # one session serves both (predict fetches its output only)
        fetch = list(dict.fromkeys(tensors.values()))

        def activations(x: np.ndarray) -> dict:
            got = dict(zip(fetch, session.run(fetch, {self.input: x}), strict=True))
            return {n: np.asarray(got[t], np.float32) for n, t in tensors.items()}

        return activations
