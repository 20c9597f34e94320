import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openexample import messages
from openexample.errors import ProtocolError
from openexample.limits import Limits
from openexample.v1 import openexample_pb2 as pb
from tests.strategies import envelopes


@given(envelopes)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_envelope_round_trip(env):
    assert messages.decode_envelope(messages.encode_envelope(env)) == env


@given(st.binary(max_size=512))
@settings(max_examples=1000)
def test_garbage_bytes_never_raise_anything_but_protocol_error(data):
    try:
        env = messages.decode_envelope(data)
    except ProtocolError as e:
        assert e.error_type == pb.ERROR_TYPE_BAD_REQUEST
        assert e.code in (pb.BAD_REQUEST_CODE_MALFORMED, pb.BAD_REQUEST_CODE_BAD_TYPE)
    else:
        assert messages.body_kind(env) is not None


@given(envelopes, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_messages_never_raise_anything_but_protocol_error(env, data):
    raw = bytearray(messages.encode_envelope(env))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(ProtocolError):
        messages.decode_envelope(bytes(raw[:cut]))


def test_oversize_message_is_bad_len_before_parsing():
    with pytest.raises(ProtocolError) as e:
        messages.decode_envelope(b"\0" * 101, Limits(max_message_bytes=100))
    assert e.value.code == pb.BAD_REQUEST_CODE_BAD_LEN


def test_empty_envelope_is_bad_type_with_its_xid():
    raw = pb.Envelope(version=1, xid=77).SerializeToString()
    with pytest.raises(ProtocolError) as e:
        messages.decode_envelope(raw)
    assert (e.value.code, e.value.xid) == (pb.BAD_REQUEST_CODE_BAD_TYPE, 77)


def test_envelope_sets_the_matching_body_field():
    env = messages.envelope(pb.BarrierRequest(), xid=5)
    assert messages.body_kind(env) == "barrier_request"
    assert env.xid == 5 and env.version == messages.PROTOCOL_VERSION
    rep = messages.reply(env, pb.BarrierReply())
    assert (messages.body_kind(rep), rep.xid) == ("barrier_reply", 5)
    with pytest.raises(TypeError):
        messages.envelope(pb.Tensor())


def test_every_body_kind_has_a_builder_mapping():
    fields = pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields
    for f in fields:
        cls = getattr(pb, f.message_type.name)
        assert messages.body_kind(messages.envelope(cls())) == f.name


def test_xids_wrap_and_skip_zero():
    alloc = messages.XidAllocator(start=messages.XID_MAX - 1)
    assert [alloc() for _ in range(4)] == [messages.XID_MAX - 1, messages.XID_MAX, 1, 2]
    assert messages.XidAllocator(start=0)() == 1


@pytest.mark.parametrize(
    ("ours", "theirs", "expect"),
    [({1}, {1}, 1), ({1, 2, 5}, {1, 5, 6}, 5), ({1, 3}, {2, 3}, 3), ({2}, {1, 2, 3}, 2)],
)
def test_version_negotiation_picks_the_highest_common(ours, theirs, expect):
    peer = messages.hello("peer", versions=theirs)
    assert messages.negotiate_version(peer, ours) == expect


def test_version_negotiation_fails_typed_without_common_version():
    peer = messages.hello("peer", versions={2, 3}, xid=9)
    with pytest.raises(ProtocolError) as e:
        messages.negotiate_version(peer, {1})
    assert e.value.error_type == pb.ERROR_TYPE_HELLO_FAILED
    assert e.value.code == pb.HELLO_FAILED_CODE_INCOMPATIBLE
    assert e.value.xid == 9
    err = messages.error_envelope(e.value)
    assert err.error.type == pb.ERROR_TYPE_HELLO_FAILED and err.xid == 9


def test_hello_without_bitmap_uses_the_envelope_version():
    peer = pb.Envelope(version=1, hello=pb.Hello())
    assert messages.negotiate_version(peer, {1}) == 1
    peer.version = 4
    with pytest.raises(ProtocolError):
        messages.negotiate_version(peer, {1})


def test_first_message_must_be_hello():
    with pytest.raises(ProtocolError) as e:
        messages.negotiate_version(messages.envelope(pb.EchoRequest(), xid=3))
    assert e.value.code == pb.BAD_REQUEST_CODE_UNEXPECTED


def test_limits_merge_takes_the_minimum_and_ignores_zero():
    ours = Limits(max_message_bytes=1000, max_batch_items=10, max_tensor_elements=50)
    merged = ours.merge(pb.Limits(max_message_bytes=500, max_batch_items=0, max_tensor_elements=80))
    assert merged == Limits(max_message_bytes=500, max_batch_items=10, max_tensor_elements=50)


def test_error_round_trips_to_the_same_exception():
    err = ProtocolError(pb.ERROR_TYPE_BAD_TENSOR, pb.BAD_TENSOR_CODE_NOT_FINITE, "nan", xid=4)
    wire = err.to_error(b"x" * 100)
    assert len(wire.data) == 64
    back = ProtocolError.from_error(wire)
    assert (back.error_type, back.code, back.xid, back.name) == (
        err.error_type,
        err.code,
        4,
        "BAD_TENSOR/NOT_FINITE",
    )


def test_pkg_out_timings_round_trip_and_stay_optional():
    timings = pb.Timings(
        queue_us=12,
        batch_items=5,
        score_us=340,
        detectors=[
            pb.DetectorTiming(detector="desvig", us=200),
            pb.DetectorTiming(detector="margin", us=9),
        ],
        reply_us=7,
        controller_us=359,
    )
    body = pb.PkgOut(
        model_id="m", items=[pb.PkgOutItem(verdict=pb.VERDICT_BENIGN)], timings=timings
    )
    env = messages.decode_envelope(messages.encode_envelope(messages.envelope(body, xid=3)))
    got = env.pkg_out.timings
    assert env.pkg_out.HasField("timings") and got == timings
    assert [(d.detector, d.us) for d in got.detectors] == [("desvig", 200), ("margin", 9)]
    # Additive: without timings the message is what an older controller sends, and
    # the field is appended after the items, which an older agent skips as unknown.
    old = pb.PkgOut(model_id="m", items=list(body.items))
    assert not old.HasField("timings")
    assert body.SerializeToString().startswith(old.SerializeToString())


def test_peek_xid_reads_the_xid_of_an_oversize_message():
    from hypothesis import given
    from hypothesis import strategies as st

    from openexample.errors import ProtocolError
    from openexample.limits import Limits

    env = messages.envelope(pb.EchoRequest(data=b"x" * 5000), xid=4242)
    data = env.SerializeToString()
    assert messages.peek_xid(data) == 4242
    with pytest.raises(ProtocolError) as e:
        messages.decode_envelope(data, Limits(max_message_bytes=1000))
    assert e.value.name == "BAD_REQUEST/BAD_LEN" and e.value.xid == 4242

    @given(st.integers(0, 2**32 - 1), st.binary(max_size=64))
    def any_envelope(xid, payload):
        env = messages.envelope(pb.EchoRequest(data=payload), xid=xid)
        assert messages.peek_xid(env.SerializeToString()) == xid

    any_envelope()

    @given(st.binary(max_size=256))
    def garbage(data):
        assert 0 <= messages.peek_xid(data) < 2**32

    garbage()
