"""Fuzz ``openexample.tensor.decode`` directly. Input: a serialized ``Tensor``.

Anything that parses as a Tensor must decode, or be refused with BAD_TENSOR, under the
default element limit and a small one; a decoded array matches its declared shape and
dtype and views the message's bytes read-only.

    python fuzz/fuzz_tensor.py fuzz/corpus/tensor -max_total_time=600
    python fuzz/fuzz_tensor.py --replay fuzz/corpus/tensor
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf.message import DecodeError

from fuzz.common import main
from openexample import tensor
from openexample.errors import ProtocolError
from openexample.v1 import openexample_pb2 as pb

TARGET = "tensor"


def test_one_input(data: bytes) -> None:
    t = pb.Tensor()
    try:
        t.ParseFromString(data)
    except DecodeError:
        return
    for max_elements in (tensor.DEFAULT_MAX_TENSOR_ELEMENTS, 64):
        try:
            arr = tensor.decode(t, max_elements=max_elements, check_finite=bool(len(data) & 1))
        except ProtocolError as err:
            if err.error_type != pb.ERROR_TYPE_BAD_TENSOR:
                raise AssertionError(f"not a BAD_TENSOR: {err}") from err
            continue
        if arr.shape != tuple(t.shape) or arr.dtype != tensor.DTYPES[t.dtype]:
            raise AssertionError(f"{arr.shape} {arr.dtype} for {list(t.shape)} {t.dtype}")
        if arr.flags.writeable or arr.nbytes != len(t.data):
            raise AssertionError("the array does not view the message's bytes read-only")
        if arr.size > max_elements:
            raise AssertionError(f"{arr.size} elements decoded, limit {max_elements}")
        again = tensor.decode(tensor.encode(arr), max_elements=max_elements, check_finite=False)
        if again.tobytes() != arr.tobytes():
            raise AssertionError("encode(decode(t)) changed the bytes")


if __name__ == "__main__":
    main(test_one_input, TARGET)
