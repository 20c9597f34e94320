"""numpy <-> Tensor codec.

Decoding is zero-copy (a read-only view over the message's bytes); encoding
copies once (protobuf needs a ``bytes``). Only uint8 / float16 / float32 travel,
little-endian, C order.
"""

from __future__ import annotations

import math

import numpy as np

from openexample.errors import bad_tensor
from openexample.limits import DEFAULT_MAX_TENSOR_ELEMENTS, MAX_TENSOR_DIMS
from openexample.v1 import openexample_pb2 as pb

DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
}
_WIRE_DTYPE = {dt.newbyteorder("="): code for code, dt in DTYPES.items()}


def dtype_code(dtype: np.dtype | type | str) -> int:
    """The wire DType for a numpy dtype; raises BAD_TENSOR/BAD_DTYPE if it has none."""
    dt = np.dtype(dtype)
    code = _WIRE_DTYPE.get(dt.newbyteorder("="))
    if code is None:
        raise bad_tensor(pb.BAD_TENSOR_CODE_BAD_DTYPE, f"dtype {dt} cannot travel")
    return code


def encode(arr: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode ``arr`` (any supported dtype; byte order fixed to little-endian)."""
    code = dtype_code(arr.dtype)
    wire = DTYPES[code]
    a = np.require(arr, dtype=wire, requirements="C")  # keeps 0-d arrays 0-d
    t = out if out is not None else pb.Tensor()
    t.dtype = code
    del t.shape[:]
    t.shape.extend(a.shape)
    t.data = a.tobytes()
    return t


def decode(
    t: pb.Tensor,
    *,
    max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS,
    check_finite: bool = True,
) -> np.ndarray:
    """Decode a Tensor to a read-only array viewing its bytes.

    Raises BAD_TENSOR (BAD_DTYPE, BAD_SHAPE, TOO_LARGE, SIZE_MISMATCH, NOT_FINITE).
    """
    dt = DTYPES.get(t.dtype)
    if dt is None:
        raise bad_tensor(pb.BAD_TENSOR_CODE_BAD_DTYPE, f"unknown dtype {t.dtype}")
    shape = tuple(t.shape)
    if len(shape) > MAX_TENSOR_DIMS:
        raise bad_tensor(pb.BAD_TENSOR_CODE_BAD_SHAPE, f"{len(shape)} dims > {MAX_TENSOR_DIMS}")
    if any(d < 0 for d in shape):
        raise bad_tensor(pb.BAD_TENSOR_CODE_BAD_SHAPE, f"negative dimension in {shape}")
    n = math.prod(shape)
    # The product of the non-zero dimensions: an empty tensor of shape (0, 2**62) holds no
    # element, but numpy still refuses to shape an array that wide (ValueError).
    span = math.prod(d or 1 for d in shape)
    if span > max_elements:
        empty = "" if n else f" (shape {shape}, counting its zero dimensions as 1)"
        raise bad_tensor(pb.BAD_TENSOR_CODE_TOO_LARGE, f"{span} elements > {max_elements}{empty}")
    if len(t.data) != n * dt.itemsize:
        raise bad_tensor(
            pb.BAD_TENSOR_CODE_SIZE_MISMATCH,
            f"{len(t.data)} bytes for shape {shape} of {dt} (want {n * dt.itemsize})",
        )
    arr = np.frombuffer(t.data, dtype=dt).reshape(shape)
    if check_finite and dt.kind == "f" and not np.isfinite(arr).all():
        raise bad_tensor(pb.BAD_TENSOR_CODE_NOT_FINITE, "NaN or infinity in tensor")
    return arr
