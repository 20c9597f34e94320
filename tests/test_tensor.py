import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from openexample import tensor
from openexample.errors import ProtocolError
from openexample.v1 import openexample_pb2 as pb

SUPPORTED = [np.uint8, np.float16, np.float32]


@given(
    hnp.arrays(
        dtype=st.sampled_from(SUPPORTED),
        shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_round_trip_bit_exact(arr):
    t = tensor.encode(arr)
    back = tensor.decode(pb.Tensor.FromString(t.SerializeToString()))
    assert back.shape == arr.shape
    assert back.dtype == arr.dtype
    assert back.tobytes() == np.ascontiguousarray(arr).tobytes()


def test_decode_is_a_read_only_view():
    t = tensor.encode(np.arange(12, dtype=np.float32).reshape(3, 4))
    arr = tensor.decode(t)
    assert not arr.flags.writeable
    assert arr.base is not None  # a view over the message bytes, not a copy


def test_big_endian_and_non_contiguous_inputs_travel_little_endian():
    a = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    t = tensor.encode(a)
    assert t.dtype == pb.DTYPE_FLOAT32
    assert t.data == np.ascontiguousarray(a, dtype="<f4").tobytes()
    np.testing.assert_array_equal(tensor.decode(t), a)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int64, np.bool_, np.complex64])
def test_unsupported_dtypes_are_refused(dtype):
    with pytest.raises(ProtocolError) as e:
        tensor.encode(np.zeros(3, dtype=dtype))
    assert e.value.code == pb.BAD_TENSOR_CODE_BAD_DTYPE


def _code(t, **kw):
    with pytest.raises(ProtocolError) as e:
        tensor.decode(t, **kw)
    assert e.value.error_type == pb.ERROR_TYPE_BAD_TENSOR
    return e.value.code


def test_decode_errors_are_typed():
    ok = tensor.encode(np.zeros((2, 3), np.float32))
    assert _code(pb.Tensor(dtype=0, shape=[1], data=b"\0" * 4)) == pb.BAD_TENSOR_CODE_BAD_DTYPE
    assert _code(pb.Tensor(dtype=99, shape=[1], data=b"\0")) == pb.BAD_TENSOR_CODE_BAD_DTYPE
    bad = pb.Tensor(dtype=ok.dtype, shape=[2, 3], data=ok.data[:-1])
    assert _code(bad) == pb.BAD_TENSOR_CODE_SIZE_MISMATCH
    assert _code(pb.Tensor(dtype=1, shape=[-1, 2], data=b"")) == pb.BAD_TENSOR_CODE_BAD_SHAPE
    assert _code(pb.Tensor(dtype=1, shape=[1] * 9, data=b"\0")) == pb.BAD_TENSOR_CODE_BAD_SHAPE
    assert _code(ok, max_elements=5) == pb.BAD_TENSOR_CODE_TOO_LARGE
    # A huge declared shape is refused by arithmetic, before any allocation.
    huge = pb.Tensor(dtype=1, shape=[2**40, 2**40], data=b"")
    assert _code(huge) == pb.BAD_TENSOR_CODE_TOO_LARGE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_non_finite_floats_are_refused(bad, dtype):
    a = np.zeros(5, dtype=dtype)
    a[3] = bad
    assert _code(tensor.encode(a)) == pb.BAD_TENSOR_CODE_NOT_FINITE
    # ... unless the caller asked for raw values.
    assert np.isnan(tensor.decode(tensor.encode(a), check_finite=False)[3]) == np.isnan(bad)
