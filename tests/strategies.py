"""Hypothesis strategies for OpenExample messages, shared by the property tests."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from openexample import messages, tensor
from openexample.v1 import openexample_pb2 as pb

ids = st.text(min_size=1, max_size=12)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def pkg_ins(draw, n_max=4, shape=(1, 4, 4), classes=3):
    n = draw(st.integers(1, n_max))
    x = draw(hnp.arrays(np.float32, (n, *shape), elements=st.floats(0, 1, width=32)))
    logits = draw(hnp.arrays(np.float32, (n, classes), elements=st.floats(-9, 9, width=32)))
    items = [
        pb.PkgInItem(
            label=draw(st.integers(0, classes - 1)),
            confidence=draw(st.floats(0, 1, width=32)),
            source_id=draw(st.text(max_size=8)),
            reason=draw(st.sampled_from([1, 2, 3, 4])),
            rule_cookie=draw(st.integers(0, 2**64 - 1)),
            fingerprint=draw(st.binary(min_size=16, max_size=16)),
            budget_us=draw(u32),
            inferred_at_ns=draw(st.integers(0, 2**64 - 1)),
        )
        for _ in range(n)
    ]
    return pb.PkgIn(
        model_id="m", inputs=tensor.encode(x), logits=tensor.encode(logits), items=items
    )


timings = st.builds(
    pb.Timings,
    queue_us=u32,
    batch_items=u32,
    score_us=u32,
    detectors=st.lists(st.builds(pb.DetectorTiming, detector=ids, us=u32), max_size=3),
    reply_us=u32,
    controller_us=st.integers(0, 2**64 - 1),
)


@st.composite
def pkg_outs(draw, n_max=4):
    items = [
        pb.PkgOutItem(
            verdict=draw(st.sampled_from([1, 2, 3])),
            action=draw(st.sampled_from([1, 2, 3])),
            score=draw(st.floats(-9, 9, width=32)),
        )
        for _ in range(draw(st.integers(1, n_max)))
    ]
    return pb.PkgOut(model_id="m", items=items, timings=draw(st.none() | timings))


def descriptor(shape=(1, 4, 4), classes=3, dtype=pb.DTYPE_FLOAT32, activations=()):
    return pb.ModelDescriptor(
        model_id="m",
        input_shape=shape,
        input_dtype=dtype,
        class_names=[str(i) for i in range(classes)],
        activation_names=list(activations),
    )


bodies = st.one_of(
    st.builds(pb.Hello, versions_bitmap=st.integers(0, 2**64 - 1), sender_id=ids),
    st.builds(pb.EchoRequest, data=st.binary(max_size=32)),
    st.builds(pb.EchoReply, data=st.binary(max_size=32)),
    st.just(pb.FeaturesRequest()),
    st.just(pb.BarrierRequest()),
    st.just(pb.BarrierReply()),
    st.builds(
        pb.RoleRequest,
        role=st.sampled_from([1, 2, 3, 4]),
        generation_id=st.integers(0, 2**64 - 1),
    ),
    st.builds(pb.Error, type=st.integers(1, 6), code=st.integers(0, 10), text=st.text()),
    st.builds(pb.StatsRequest, type=st.sampled_from([1, 2, 3])),
    pkg_ins(),
    pkg_outs(),
)
envelopes = st.builds(lambda body, xid: messages.envelope(body, xid=xid), bodies, u32)
