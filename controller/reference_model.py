"""The controller's reference copy of a model, loaded as a numpy function.

Detectors that call the model (``Detector.needs_model``) get it from here: the config's
``reference_model``, or the model file recorded in an artifact's manifest. The format is
TorchScript, or ONNX (a ``.onnx`` file, run with onnxruntime on the CPU): an ONNX copy is a
plain function with no torch module, so the detectors that train or score through the
model's torch module (``Detector.fits_through_model`` / ``scores_through_model``) cannot
use it (``needing_module`` names them). This is daemon code: ``serve`` loads it, and it
imports nothing of the offline room (controller/training).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controller.detectors.base import Detector, ModelFn

__all__ = [
    "is_onnx",
    "load_model",
    "model_fn",
    "model_format",
    "needing_module",
    "onnx_activations_fn",
    "quiet_torchscript",
]

# onnxruntime's input types -> numpy (what the inputs are cast to)
_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def is_onnx(path: str | Path) -> bool:
    """An ONNX model file, by its name (as agents tell it: ``agents/models.py``)."""
    return Path(path).suffix.lower() == ".onnx"


def model_format(path: str | Path) -> str:
    """``onnx`` or ``torchscript``: what an artifact records beside the model's digest."""
    return "onnx" if is_onnx(path) else "torchscript"


def needing_module(
    detectors: Iterable[type[Detector] | Detector], *, scoring: bool = False
) -> list[str]:
    """The names of ``detectors`` that need the reference copy's torch module: to fit
    (``fits_through_model``), or with ``scoring`` to score (``scores_through_model``).
    An ONNX reference model cannot serve them."""
    flag = "scores_through_model" if scoring else "fits_through_model"
    return [d.name for d in detectors if getattr(d, flag, False)]


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
    """A TorchScript or ONNX file as a numpy callable: inputs [N, ...] -> logits [N, C].

    For TorchScript, the callable's ``module`` attribute is the TorchScript module itself,
    for detectors that train through the model (gradients) or run it on torch tensors
    (:func:`controller.detectors.nets.module_of`); an ONNX callable has none.
    """
    if is_onnx(path):
        return _onnx_fn(Path(path), batch_size)
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


def _onnx_fn(path: Path, batch_size: int) -> ModelFn:
    """An ONNX file as a numpy callable (onnxruntime, CPU): inputs cast to the model's
    input type, run in batches (of the model's own batch size when it fixes one), logits
    float32 out. ValueError in one line (the caller names the file) when it cannot be used.
    Its ``onnx_path`` attribute is the file (for :func:`onnx_activations_fn`)."""
    run = _onnx_runner(str(path), batch_size)

    def predict(x: np.ndarray) -> np.ndarray:
        return run(x, None)[0].astype(np.float32, copy=False)

    predict.onnx_path = path  # type: ignore[attr-defined]
    return predict


def onnx_activations_fn(
    path: str | Path, names: list[str], batch_size: int = 512
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The named intermediate tensors of an ONNX file (module paths or tensor names, as
    ``openexample/onnx_outputs.py`` reads them): inputs [N, ...] -> {name: float32
    [N, ...]}. ValueError in one line (a wrong name lists the names there are)."""
    from openexample.onnx_outputs import with_outputs

    data, tensors = with_outputs(path, names)
    run = _onnx_runner(data, batch_size)
    fetch = list(dict.fromkeys(tensors.values()))

    def activations(x: np.ndarray) -> dict[str, np.ndarray]:
        got = dict(zip(fetch, run(x, fetch), strict=True))
        return {n: got[t].astype(np.float32, copy=False) for n, t in tensors.items()}

    return activations


def _onnx_runner(
    source: str | bytes, batch_size: int
) -> Callable[[np.ndarray, list[str] | None], list[np.ndarray]]:
    """``run(x, fetch)``: the outputs ``fetch`` (None: the first) of the ONNX model
    ``source`` (a path or the serialized model) for inputs x, in batches, concatenated."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError(
            "an ONNX model, but onnxruntime is not installed: pip install onnxruntime"
        ) from None
    options = ort.SessionOptions()
    # no busy-waiting threads between calls: the daemon's detectors share the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its load-time warnings are not the user's
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors derive from Exception alone
        raise ValueError(f"not a readable ONNX model ({_ort_message(exc)})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(
            f"an ONNX model with {len(inputs)} inputs; a reference model takes one batch of inputs"
        )
    name, dtype = inputs[0].name, _ONNX_DTYPES.get(inputs[0].type)
    if dtype is None:
        raise ValueError(
            f"the ONNX model's input is {inputs[0].type}; a reference model takes float inputs"
        )
    fixed = inputs[0].shape[0] if inputs[0].shape else None
    pad = isinstance(fixed, int) and fixed > 0  # the model fixes its batch size
    step = fixed if pad else batch_size
    first = [session.get_outputs()[0].name]

    def part(x: np.ndarray, fetch: list[str] | None) -> list[np.ndarray]:
        n = len(x)
        if pad and n < step:
            x = np.concatenate([x, np.zeros((step - n, *x.shape[1:]), x.dtype)])
        outs = session.run(fetch or first, {name: x.astype(dtype, copy=False)})
        return [np.asarray(o)[:n] for o in outs]

    def run(x: np.ndarray, fetch: list[str] | None) -> list[np.ndarray]:
        x = np.asarray(x)
        parts = [part(x[i : i + step], fetch) for i in range(0, len(x), step)]
        if not parts:
            raise ValueError("the reference model got no inputs")
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    return run


def _ort_message(exc: Any) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : 7 : CODE : Load model from
    PATH failed:`` prefix (the caller names the file)."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .* failed:)?", "", text)
    return text.strip() or type(exc).__name__
