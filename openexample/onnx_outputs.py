"""Intermediate tensors of an ONNX model as extra graph outputs, by name, for both planes.

An ONNX graph gives only its declared outputs; to read a layer's activations the model
is rewritten at load time with the named intermediate tensors added as graph outputs
(:func:`with_outputs`), then run once for the real output and those tensors together.

A name is either a tensor name (a node's output, as ``onnx`` lists them: ``max_pool2d``)
or, for files torch's exporter (dynamo) wrote, a torch module path (``features.2``): the
exporter records each node's module scope in its ``namespace`` metadata, and a module's
activation is the output of its last node (a module called more than once gives its last
call's output, as forward hooks do). A wrong name is a ValueError listing names there are.

Needs the ``onnx`` package (``pip install onnx``, the ``onnx`` extra), imported only
when activations are asked of an ONNX model. Pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["intermediate_names", "resolve", "with_outputs"]

SHOWN = 40  # most names a wrong-name error lists


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ValueError(
            "an ONNX model's activations need the onnx package: pip install onnx"
            " (or openexample[onnx])"
        ) from None
    return onnx


def _scopes(node: Any) -> list[str]:
    """The torch module paths a node belongs to (from the exporter's ``namespace``:
    ``: Root/features: Sequential/features.2: MaxPool2d/max_pool2d: aten...``)."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            parts = prop.value.split("/")[1:-1]  # drop the root and the op itself
            return [p.split(": ", 1)[0] for p in parts if p.split(": ", 1)[0]]
    return []


def _index(model: Any) -> tuple[dict[str, str], list[str]]:
    """(module path -> its output tensor, every intermediate tensor name in graph order)."""
    graph = model.graph
    finals = {o.name for o in graph.output}
    modules: dict[str, str] = {}
    tensors: list[str] = []
    for node in graph.node:
        out = next((o for o in node.output if o), "")
        if not out:
            continue
        for scope in _scopes(node):
            modules[scope] = out  # the module's last node so far
        tensors.extend(o for o in node.output if o and o not in finals)
    return modules, tensors


def intermediate_names(model: Any) -> list[str]:
    """What :func:`resolve` accepts for ``model`` (an ``onnx.ModelProto``): its torch
    module paths (when the exporter recorded them), then its intermediate tensor names."""
    modules, tensors = _index(model)
    return [*modules, *tensors]


def resolve(model: Any, names: Sequence[str]) -> dict[str, str]:
    """{asked name: tensor name} for ``names`` in ``model``; ValueError in one line
    naming the wrong ones and (up to ``SHOWN``) the names there are."""
    modules, tensors = _index(model)
    known = set(tensors)
    out: dict[str, str] = {}
    missing = []
    for name in names:
        if name in modules:
            out[name] = modules[name]
        elif name in known:
            out[name] = name
        else:
            missing.append(name)
    if missing:
        every = [*modules, *tensors]
        shown = ", ".join(every[:SHOWN]) or "(none)"
        more = f" and {len(every) - SHOWN} more" if len(every) > SHOWN else ""
        raise ValueError(
            f"no layer {', '.join(map(repr, missing))} in the ONNX model; its module paths"
            f" and intermediate tensors: {shown}{more}"
        )
    return out


def with_outputs(path: str | Path, names: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """The ONNX file at ``path`` with the named tensors added as graph outputs (after its
    own), serialized for ``onnxruntime.InferenceSession``, and {asked name: tensor name}.
    ValueError in one line when a name is wrong or the file does not read."""
    onnx = _onnx()
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx's DecodeError and friends derive from Exception alone
        raise ValueError(f"{path}: not an ONNX model onnx can read: {exc}") from None
    tensors = resolve(model, names)
    present = {o.name for o in model.graph.output}
    for tensor in dict.fromkeys(tensors.values()):  # distinct, in the order asked
        if tensor not in present:
            # no type given: onnxruntime infers it (shape inference is not needed)
            model.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return model.SerializeToString(), tensors
