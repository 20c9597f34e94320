import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openexample import tensor
from openexample.errors import ProtocolError
from openexample.limits import DEFAULT_LIMITS, Limits
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import validate_features, validate_pkg_in
from tests.strategies import descriptor, pkg_ins

MODELS = {"m": descriptor(activations=["conv1"])}


def good_pkg(n=2):
    x = np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)
    logits = np.zeros((n, 3), np.float32)
    items = [pb.PkgInItem(label=1, confidence=0.5, reason=pb.PKG_IN_REASON_ACTION)] * n
    return pb.PkgIn(
        model_id="m", inputs=tensor.encode(x), logits=tensor.encode(logits), items=items
    )


def refused(pkg, models=MODELS, limits=DEFAULT_LIMITS):
    with pytest.raises(ProtocolError) as e:
        validate_pkg_in(pkg, models, limits)
    return pb.ErrorType.Name(e.value.error_type), e.value.code


def test_a_good_pkg_in_decodes():
    d = validate_pkg_in(good_pkg(3), MODELS)
    assert d.inputs.shape == (3, 1, 4, 4) and d.logits.shape == (3, 3)
    assert list(d.labels) == [1, 1, 1]


def test_unknown_model():
    p = good_pkg()
    p.model_id = "other"
    assert refused(p) == ("ERROR_TYPE_BAD_REQUEST", pb.BAD_REQUEST_CODE_UNKNOWN_MODEL)


def test_batch_bounds():
    p = good_pkg()
    del p.items[:]
    assert refused(p)[1] == pb.BAD_REQUEST_CODE_BAD_BATCH
    assert refused(good_pkg(5), limits=Limits(max_batch_items=4))[1] == (
        pb.BAD_REQUEST_CODE_BAD_BATCH
    )


def test_item_count_must_match_tensor_batch():
    p = good_pkg(2)
    p.items.append(p.items[0])
    assert refused(p) == ("ERROR_TYPE_BAD_TENSOR", pb.BAD_TENSOR_CODE_BAD_SHAPE)


def test_wrong_dtype_and_shape():
    p = good_pkg()
    tensor.encode(np.zeros((2, 1, 4, 4), np.uint8), out=p.inputs)
    assert refused(p)[1] == pb.BAD_TENSOR_CODE_BAD_DTYPE
    p = good_pkg()
    tensor.encode(np.zeros((2, 1, 4, 5), np.float32), out=p.inputs)
    assert refused(p)[1] == pb.BAD_TENSOR_CODE_BAD_SHAPE
    p = good_pkg()
    tensor.encode(np.zeros((2, 4), np.float32), out=p.logits)
    assert refused(p)[1] == pb.BAD_TENSOR_CODE_BAD_SHAPE
    p = good_pkg()
    p.ClearField("inputs")
    assert refused(p)[1] == pb.BAD_TENSOR_CODE_MISSING


def test_nan_input_is_refused():
    p = good_pkg()
    x = np.zeros((2, 1, 4, 4), np.float32)
    x[1, 0, 2, 2] = np.nan
    tensor.encode(x, out=p.inputs)
    assert refused(p) == ("ERROR_TYPE_BAD_TENSOR", pb.BAD_TENSOR_CODE_NOT_FINITE)


def test_oversize_tensor_is_refused_before_decoding():
    big = {"m": descriptor(shape=(1, 64, 64))}
    x = np.zeros((4, 1, 64, 64), np.float32)
    p = pb.PkgIn(model_id="m", inputs=tensor.encode(x), items=[good_pkg(1).items[0]] * 4)
    assert refused(p, big, Limits(max_tensor_elements=10_000))[1] == pb.BAD_TENSOR_CODE_TOO_LARGE


@pytest.mark.parametrize(
    "change",
    [
        {"label": 3},
        {"confidence": 1.5},
        {"confidence": float("nan")},
        {"reason": 0},
        {"fingerprint": b"short"},
        {"source_id": "s" * 300},
    ],
)
def test_bad_item_fields(change):
    p = good_pkg()
    for k, v in change.items():
        setattr(p.items[1], k, v)
    assert refused(p) == ("ERROR_TYPE_BAD_REQUEST", pb.BAD_REQUEST_CODE_BAD_FIELD)


def test_activations_must_be_declared_and_batched():
    p = good_pkg()
    p.activations.add(name="conv1", tensor=tensor.encode(np.zeros((2, 8), np.float32)))
    assert set(validate_pkg_in(p, MODELS).activations) == {"conv1"}
    p.activations.add(name="fc9", tensor=tensor.encode(np.zeros((2, 8), np.float32)))
    assert refused(p)[1] == pb.BAD_REQUEST_CODE_BAD_FIELD
    p = good_pkg()
    p.activations.add(name="conv1", tensor=tensor.encode(np.zeros((3, 8), np.float32)))
    assert refused(p)[1] == pb.BAD_TENSOR_CODE_BAD_SHAPE


@given(pkg_ins(), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_pkg_in_never_raises_anything_but_protocol_error(pkg, data):
    raw = bytearray(pkg.SerializeToString())
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        mutated = pb.PkgIn.FromString(bytes(raw))
    except Exception:  # undecodable: decode_envelope's job, tested there
        return
    with contextlib.suppress(ProtocolError):
        validate_pkg_in(mutated, {"m": descriptor()})


def features(**kw):
    m = descriptor()
    m.MergeFrom(pb.ModelDescriptor(**kw))
    return pb.FeaturesReply(agent_id="a1", models=[m])


def test_features_ok_and_errors():
    assert list(validate_features(features())) == ["m"]
    bad = [
        pb.FeaturesReply(agent_id="", models=[descriptor()]),
        pb.FeaturesReply(agent_id="a"),
        pb.FeaturesReply(agent_id="a", models=[descriptor(), descriptor()]),
        pb.FeaturesReply(agent_id="a", models=[descriptor(shape=(0, 3))]),
        pb.FeaturesReply(agent_id="a", models=[descriptor(dtype=pb.DTYPE_UNSPECIFIED)]),
        pb.FeaturesReply(agent_id="a", models=[descriptor(classes=0)]),
        pb.FeaturesReply(agent_id="a", models=[descriptor(shape=(4096, 4096))]),
    ]
    for reply in bad:
        with pytest.raises(ProtocolError) as e:
            validate_features(reply)
        assert e.value.code == pb.BAD_REQUEST_CODE_BAD_FIELD
