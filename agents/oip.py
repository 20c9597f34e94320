"""The Open Inference Protocol (KServe v2) for a guarded model, without the I/O.

Both shells, gRPC (:mod:`agents.oip_grpc`) and HTTP/REST (:mod:`agents.oip_http`),
turn requests into calls of these functions, so one set of rules decides what an
inference request may carry and what its answer says:

- the model has one input, ``input`` (``[-1, *input_shape]``, the model's dtype; any
  numeric KServe datatype is accepted and cast, NaN and infinity refused) and two
  outputs, ``logits`` (FP32 ``[-1, classes]``) and ``label`` (INT64 ``[-1]``, the label
  handed out: the corrected one for a CORRECT verdict);
- an answer whose outputs were all released carries the guard's decision as response
  parameters (:data:`PARAMETERS`); one withheld input (an adversarial verdict, a DROP
  rule, the secure fail mode) fails the whole request with :class:`OipError`
  ``withheld`` (gRPC PERMISSION_DENIED, HTTP 403) naming each withheld input's verdict,
  decider and reason, so an unchanged client can never read a withheld output as a
  valid one. The Predict API answers per input for callers that want partial batches.

Errors are :class:`OipError` with a ``kind`` the shells map to a status code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from agents.results import Result

INPUT, LOGITS, LABEL = "input", "logits", "label"
OUTPUTS = (LOGITS, LABEL)
VERSION = "1"
# Request parameter: the source id the caller claims (checked like Predict's source_id).
SOURCE_PARAMETER = "openexample.source_id"
# Response parameters (one value, or one per input joined by "," for a batch).
VERDICT, DECIDED_BY, REASON, RELEASED, LATENCY = (
    "openexample.verdict",
    "openexample.decided_by",
    "openexample.reason",
    "openexample.released",
    "openexample.added_latency_us",
)
PARAMETERS = (VERDICT, DECIDED_BY, REASON, RELEASED, LATENCY)

# KServe v2 tensor datatypes (little-endian on the wire, as the binary extension says).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dt.newbyteorder("="): name for name, dt in DATATYPES.items()}
_PLATFORMS = {
    "torchscript": "pytorch_libtorch",
    "torch": "pytorch_libtorch",
    "onnx": "onnxruntime_onnx",
}

# OipError kinds -> (HTTP status, gRPC status code name)
STATUS = {
    "invalid": (400, "INVALID_ARGUMENT"),
    "not_found": (404, "NOT_FOUND"),
    "withheld": (403, "PERMISSION_DENIED"),
    "refused": (403, "PERMISSION_DENIED"),
    "unavailable": (503, "UNAVAILABLE"),
}


class OipError(Exception):
    """A request the guarded model does not answer; ``kind`` is a key of :data:`STATUS`."""

    def __init__(self, kind: str, message: str, parameters: dict[str, Any] | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.parameters = parameters or {}  # the decision, for withheld answers


def datatype_of(dtype: Any) -> str:
    """The KServe datatype name of a numpy dtype (ValueError if it has none)."""
    name = _NAMES.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise ValueError(f"dtype {np.dtype(dtype)} has no KServe v2 datatype")
    return name


@dataclass(frozen=True)
class ModelView:
    """What the protocol says about the guarded model, and the limits on a request."""

    name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    n_classes: int
    framework: str = "callable"
    max_batch: int = 1024
    max_elements: int = 4 * 1024 * 1024

    def metadata(self) -> dict[str, Any]:
        """ModelMetadataResponse as a dict (the REST body; gRPC copies it field by field)."""
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": _PLATFORMS.get(self.framework, "python"),
            "inputs": [
                {
                    "name": INPUT,
                    "datatype": datatype_of(self.input_dtype),
                    "shape": [-1, *self.input_shape],
                }
            ],
            "outputs": [
                {"name": LOGITS, "datatype": "FP32", "shape": [-1, self.n_classes]},
                {"name": LABEL, "datatype": "INT64", "shape": [-1]},
            ],
        }

    def check_model(self, name: str, version: str = "") -> None:
        """NOT_FOUND unless ``name`` (and ``version``, when given) is this model."""
        if name != self.name:
            raise OipError("not_found", f"no model {name!r} (this agent serves {self.name!r})")
        if version not in ("", VERSION):
            raise OipError(
                "not_found", f"model {name!r} has no version {version!r} (only {VERSION!r})"
            )

    def decode_input(
        self, name: str, datatype: str, shape: Sequence[int], data: bytes | Any
    ) -> np.ndarray:
        """One request input -> ``[N, *input_shape]`` in the model's dtype.

        ``data``: the raw little-endian bytes (binary extension, ``raw_input_contents``)
        or the values (REST ``data``, gRPC ``contents``), nested or flat, in row-major
        order. The batch dimension is required, as the metadata says: a shape without
        it could be read two ways when the model's first dimension is 1.
        """
        if name != INPUT:
            raise OipError("invalid", f"unknown input {name!r} (the model takes {INPUT!r})")
        dt = DATATYPES.get(datatype)
        if dt is None:
            known = ", ".join(DATATYPES)
            raise OipError("invalid", f"input {INPUT}: datatype {datatype!r} (one of {known})")
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(self.input_shape) + 1 or shape[1:] != self.input_shape:
            want = [-1, *self.input_shape]
            raise OipError("invalid", f"input {INPUT}: shape {list(shape)}, the model takes {want}")
        n = shape[0]
        if not 0 < n <= self.max_batch:
            raise OipError("invalid", f"input {INPUT}: batch of {n} (1..{self.max_batch})")
        count = math.prod(shape)
        if count > self.max_elements:
            raise OipError(
                "invalid", f"input {INPUT}: {count} elements > {self.max_elements} (limits)"
            )
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) != count * dt.itemsize:
                raise OipError(
                    "invalid",
                    f"input {INPUT}: {len(data)} bytes for shape {list(shape)} of {datatype}"
                    f" (want {count * dt.itemsize})",
                )
            arr = np.frombuffer(data, dtype=dt)
        else:
            try:
                arr = np.asarray(data, dtype=dt).reshape(-1)
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                raise OipError(
                    "invalid", f"input {INPUT}: data are not {datatype} values ({exc})"
                ) from None
            if arr.size != count:
                raise OipError(
                    "invalid",
                    f"input {INPUT}: {arr.size} values for shape {list(shape)} (want {count})",
                )
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(arr.reshape(shape), dtype=self.input_dtype)
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise OipError("invalid", f"input {INPUT}: NaN or infinity (or out of range)")
        return out

    def requested(self, names: Iterable[str]) -> tuple[str, ...]:
        """The outputs asked for, in the model's order (all when none are named)."""
        names = list(names)
        for n in names:
            if n not in OUTPUTS:
                raise OipError("invalid", f"unknown output {n!r} (the model has {list(OUTPUTS)})")
        return tuple(o for o in OUTPUTS if o in names) if names else OUTPUTS


class Output(NamedTuple):
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray


def _joined(values: Iterable[str]) -> str:
    return ",".join(values)


def decision(results: Sequence[Result]) -> dict[str, Any]:
    """The response parameters for these results (:data:`PARAMETERS`)."""
    reasons = sorted({r.reason for r in results if r.reason})
    return {
        VERDICT: _joined(r.verdict for r in results),
        DECIDED_BY: _joined(r.decided_by for r in results),
        REASON: "; ".join(reasons),
        RELEASED: all(r.released for r in results),
        LATENCY: round(max(r.latency_s for r in results) * 1e6, 1),
    }


def answer(results: Sequence[Result], outputs: Sequence[str]) -> tuple[dict, list[Output]]:
    """Parameters and output tensors for released results; OipError ``withheld`` naming
    every withheld input otherwise."""
    params = decision(results)
    withheld = [(i, r) for i, r in enumerate(results) if not r.released]
    if withheld:
        parts = []
        for i, r in withheld[:8]:
            why = f": {r.reason}" if r.reason else ""
            parts.append(f"input {i} {r.verdict} (decided by {r.decided_by}{why})")
        more = f"; and {len(withheld) - 8} more" if len(withheld) > 8 else ""
        raise OipError("withheld", "withheld by the guard: " + "; ".join(parts) + more, params)
    out = []
    for name in outputs:
        if name == LOGITS:
            arr = np.stack([np.asarray(r.output, dtype=np.float32) for r in results])
            out.append(Output(LOGITS, "FP32", list(arr.shape), arr))
        else:
            arr = np.array([r.label for r in results], dtype=np.int64)
            out.append(Output(LABEL, "INT64", [len(results)], arr))
    return params, out
