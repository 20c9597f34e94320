"""Checks on what a peer declares and sends: FEATURES_REPLY and PKG_IN.

Both sides use these; the controller on every PKG_IN it receives. Every failure is a
typed :class:`ProtocolError` naming the field, so the daemon answers with ERROR and
keeps the session.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from openexample import tensor
from openexample.errors import bad_request, bad_tensor
from openexample.limits import (
    DEFAULT_LIMITS,
    FINGERPRINT_BYTES,
    MAX_ID_BYTES,
    MAX_TENSOR_DIMS,
    Limits,
)
from openexample.privacy import PrivacyNoise
from openexample.v1 import openexample_pb2 as pb

_BAD_FIELD = pb.BAD_REQUEST_CODE_BAD_FIELD
_ACTIVATION_DTYPES = frozenset({pb.DTYPE_FLOAT16, pb.DTYPE_FLOAT32})
MAX_ACTIVATIONS = 64  # activations one model may declare


def check_id(value: str, what: str, *, allow_empty: bool = False) -> None:
    if not value and not allow_empty:
        raise bad_request(_BAD_FIELD, f"{what} is empty")
    if len(value.encode()) > MAX_ID_BYTES:
        raise bad_request(_BAD_FIELD, f"{what} longer than {MAX_ID_BYTES} bytes")


def validate_features(
    reply: pb.FeaturesReply, limits: Limits = DEFAULT_LIMITS
) -> dict[str, pb.ModelDescriptor]:
    """The agent's models by id, after checking the descriptor is usable."""
    check_id(reply.agent_id, "agent_id")
    if not reply.models:
        raise bad_request(_BAD_FIELD, "FEATURES_REPLY declares no model")
    models: dict[str, pb.ModelDescriptor] = {}
    for m in reply.models:
        check_id(m.model_id, "model_id")
        if m.model_id in models:
            raise bad_request(_BAD_FIELD, f"model {m.model_id!r} declared twice")
        shape = tuple(m.input_shape)
        if not shape or len(shape) >= MAX_TENSOR_DIMS or any(d <= 0 for d in shape):
            raise bad_request(_BAD_FIELD, f"model {m.model_id!r}: bad input_shape {shape}")
        if math.prod(shape) > limits.max_tensor_elements:
            raise bad_request(_BAD_FIELD, f"model {m.model_id!r}: input of {shape} is too large")
        if m.input_dtype not in tensor.DTYPES:
            raise bad_request(_BAD_FIELD, f"model {m.model_id!r}: bad input_dtype {m.input_dtype}")
        if not m.class_names:
            raise bad_request(_BAD_FIELD, f"model {m.model_id!r}: no class_names")
        for name in m.activation_names:
            check_id(name, f"model {m.model_id!r} activation name")
        _check_activations(m, limits)
        if m.HasField("privacy"):
            try:
                PrivacyNoise.from_pb(m.privacy)
            except ValueError as exc:
                raise bad_request(_BAD_FIELD, f"model {m.model_id!r}: privacy: {exc}") from None
        models[m.model_id] = m
    return models


def _check_activations(m: pb.ModelDescriptor, limits: Limits) -> None:
    """A model's declared activations: distinct names, a shape of one item that a
    tensor within the limits can batch, FLOAT16 or FLOAT32."""
    if len(m.activations) > MAX_ACTIVATIONS:
        raise bad_request(_BAD_FIELD, f"model {m.model_id!r}: over {MAX_ACTIVATIONS} activations")
    seen: set[str] = set()
    for a in m.activations:
        check_id(a.name, f"model {m.model_id!r} activation name")
        where = f"model {m.model_id!r}: activation {a.name!r}"
        if a.name in seen:
            raise bad_request(_BAD_FIELD, f"{where} declared twice")
        seen.add(a.name)
        shape = tuple(a.shape)
        if not shape or len(shape) >= MAX_TENSOR_DIMS or any(d <= 0 for d in shape):
            raise bad_request(_BAD_FIELD, f"{where}: bad shape {shape[:MAX_TENSOR_DIMS]}")
        if math.prod(shape) > limits.max_tensor_elements:
            raise bad_request(_BAD_FIELD, f"{where}: shape {shape} is too large")
        if a.dtype not in _ACTIVATION_DTYPES:
            raise bad_request(_BAD_FIELD, f"{where}: dtype {_dtype_name(a.dtype)}, not float")


@dataclass(slots=True)
class DecodedPkgIn:
    """A PKG_IN after validation, with its tensors as (read-only) numpy arrays."""

    model_id: str
    inputs: np.ndarray  # [N, *input_shape]
    logits: np.ndarray | None  # [N, num_classes]
    items: list[pb.PkgInItem]
    activations: dict[str, np.ndarray]

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((it.label for it in self.items), dtype=np.int64, count=len(self.items))


def validate_pkg_in(
    pkg: pb.PkgIn,
    models: Mapping[str, pb.ModelDescriptor],
    limits: Limits = DEFAULT_LIMITS,
) -> DecodedPkgIn:
    """Check a PKG_IN against the sender's declared models and decode its tensors.

    Raises BAD_REQUEST (UNKNOWN_MODEL, BAD_BATCH, BAD_FIELD) or BAD_TENSOR.
    """
    model = models.get(pkg.model_id)
    if model is None:
        raise bad_request(
            pb.BAD_REQUEST_CODE_UNKNOWN_MODEL, f"model {pkg.model_id[:64]!r} was not declared"
        )
    n = len(pkg.items)
    if n == 0 or n > limits.max_batch_items:
        raise bad_request(
            pb.BAD_REQUEST_CODE_BAD_BATCH, f"{n} items (1..{limits.max_batch_items} allowed)"
        )
    if not pkg.HasField("inputs"):
        raise bad_tensor(pb.BAD_TENSOR_CODE_MISSING, "PKG_IN without inputs")
    if pkg.inputs.dtype != model.input_dtype:
        raise bad_tensor(
            pb.BAD_TENSOR_CODE_BAD_DTYPE,
            f"inputs are {_dtype_name(pkg.inputs.dtype)}, "
            f"model {model.model_id!r} declared {_dtype_name(model.input_dtype)}",
        )
    want = (n, *model.input_shape)
    if tuple(pkg.inputs.shape) != want:
        raise bad_tensor(
            pb.BAD_TENSOR_CODE_BAD_SHAPE, f"inputs shape {tuple(pkg.inputs.shape)}, want {want}"
        )
    inputs = tensor.decode(pkg.inputs, max_elements=limits.max_tensor_elements)

    logits = None
    classes = len(model.class_names)
    if pkg.HasField("logits") and len(pkg.logits.shape) > 0:
        if pkg.logits.dtype not in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16):
            raise bad_tensor(pb.BAD_TENSOR_CODE_BAD_DTYPE, "logits must be float32 or float16")
        if tuple(pkg.logits.shape) != (n, classes):
            raise bad_tensor(
                pb.BAD_TENSOR_CODE_BAD_SHAPE,
                f"logits shape {tuple(pkg.logits.shape)}, want {(n, classes)}",
            )
        logits = tensor.decode(pkg.logits, max_elements=limits.max_tensor_elements)

    for i, it in enumerate(pkg.items):
        if it.label >= classes:
            raise bad_request(_BAD_FIELD, f"item {i}: label {it.label} >= {classes} classes")
        if not 0.0 <= it.confidence <= 1.0:  # also refuses NaN
            raise bad_request(_BAD_FIELD, f"item {i}: confidence {it.confidence} not in [0, 1]")
        if it.reason not in _REASONS:
            raise bad_request(_BAD_FIELD, f"item {i}: reason {it.reason} unknown")
        if it.fingerprint and len(it.fingerprint) != FINGERPRINT_BYTES:
            raise bad_request(
                _BAD_FIELD, f"item {i}: fingerprint must be {FINGERPRINT_BYTES} bytes"
            )
        check_id(it.source_id, f"item {i}: source_id", allow_empty=True)

    activations: dict[str, np.ndarray] = {}
    # declared with shape and dtype; by name alone (deprecated field 5): any. Built only
    # for a PKG_IN that carries activations (most do not).
    declared: dict[str, tuple[tuple[int, ...], int] | None] = {}
    if pkg.activations:
        declared = dict.fromkeys(model.activation_names)
        declared.update({a.name: (tuple(a.shape), a.dtype) for a in model.activations})
    for act in pkg.activations:
        if act.name not in declared:
            raise bad_request(_BAD_FIELD, f"activation {act.name[:64]!r} was not declared")
        if act.name in activations:
            raise bad_request(_BAD_FIELD, f"activation {act.name!r} sent twice")
        arr = tensor.decode(act.tensor, max_elements=limits.max_tensor_elements)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise bad_tensor(
                pb.BAD_TENSOR_CODE_BAD_SHAPE, f"activation {act.name!r} batch {arr.shape} != {n}"
            )
        spec = declared[act.name]
        if spec is not None and arr.shape[1:] != spec[0]:
            raise bad_tensor(
                pb.BAD_TENSOR_CODE_BAD_SHAPE,
                f"activation {act.name!r} of shape {arr.shape[1:]}, declared {spec[0]}",
            )
        if spec is not None and act.tensor.dtype != spec[1]:
            raise bad_tensor(
                pb.BAD_TENSOR_CODE_BAD_DTYPE,
                f"activation {act.name!r} is {_dtype_name(act.tensor.dtype)}, declared"
                f" {_dtype_name(spec[1])}",
            )
        activations[act.name] = arr
    return DecodedPkgIn(pkg.model_id, inputs, logits, list(pkg.items), activations)


def _dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


_REASONS = frozenset(v for v in pb.PkgInReason.values() if v != pb.PKG_IN_REASON_UNSPECIFIED)
