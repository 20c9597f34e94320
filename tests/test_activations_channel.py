"""The activations channel without processes: ONNX intermediate outputs by module path or
tensor name, what FEATURES declares (name, shape, dtype) and how it is checked, the
controller's ask (FEATURES_REQUEST) and its plan per agent (sent, computed, refused),
and an agent sending only what was asked. Real processes: tests/test_featuremap.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from controller.config import Config, ConfigError, from_mapping
from controller.core import ControllerCore
from controller.session import Expected
from openexample import messages, tensor
from openexample.errors import ProtocolError
from openexample.identity import Identity, Kind
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import validate_features, validate_pkg_in
from tests.strategies import descriptor
from tests.test_agent_core import send

LAYERS = ["features.2", "features.5"]
SHAPES = {"features.2": (16, 14, 14), "features.5": (32, 7, 7)}


# -- ONNX ----------------------------------------------------------------------------------


def test_onnx_activations_by_module_path_or_tensor_name_equal_torchs(cnn_onnx, example_model):
    from agents.models import wrap_model
    from controller.activations import Taps
    from controller.reference_model import load_model

    adapter = wrap_model(str(cnn_onnx))
    x = np.random.default_rng(0).random((3, 1, 28, 28), np.float32)
    before = adapter.predict(x)
    fn = adapter.activations_fn(["features.2", "max_pool2d_1"])
    got = fn(x)
    want = Taps(load_model(example_model), LAYERS).numpy(x)
    assert {n: (a.dtype, a.shape) for n, a in got.items()} == {
        "features.2": (np.float32, (3, 16, 14, 14)),
        "max_pool2d_1": (np.float32, (3, 32, 7, 7)),  # the tensor features.5 outputs
    }
    np.testing.assert_allclose(got["features.2"], want["features.2"], atol=1e-5)
    np.testing.assert_allclose(got["max_pool2d_1"], want["features.5"], atol=1e-5)
    np.testing.assert_array_equal(adapter.predict(x), before)  # still the model's output


def test_an_onnx_agent_without_activations_never_imports_onnx(cnn_onnx):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from agents.models import wrap_model;"
        f" wrap_model({str(cnn_onnx)!r}).predict(np.zeros((1, 1, 28, 28), np.float32));"
        " print('onnx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_a_wrong_onnx_name_lists_the_names_there_are_capped(cnn_onnx):
    import onnx
    from onnx import TensorProto, helper

    from agents.models import wrap_model
    from openexample.onnx_outputs import SHOWN, resolve

    with pytest.raises(ValueError, match=r"no layer 'conv9'.*features\.2.*max_pool2d"):
        wrap_model(str(cnn_onnx)).activations_fn(["conv9"])
    # a long graph: the list stops at SHOWN names and says how many more there are
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(SHOWN + 10)]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "g",
        [vi("t0", TensorProto.FLOAT, [1])],
        [vi(f"t{SHOWN + 10}", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    assert resolve(model, ["t3"]) == {"t3": "t3"}
    with pytest.raises(ValueError, match=r"no layer 'x'.*t1, t2, .* and 9 more$"):
        resolve(model, ["x"])


# -- FEATURES: what agents declare -----------------------------------------------------------


def declared(*acts) -> pb.ModelDescriptor:
    d = descriptor()
    for name, shape, dtype in acts:
        d.activations.add(name=name, shape=shape, dtype=dtype)
    return d


@pytest.mark.parametrize(
    "acts, said",
    [
        ((("a", (0, 2), pb.DTYPE_FLOAT16),), "bad shape"),
        ((("a", (), pb.DTYPE_FLOAT16),), "bad shape"),
        ((("a", (4,), pb.DTYPE_UINT8),), "not float"),
        ((("a", (4,), pb.DTYPE_FLOAT16), ("a", (4,), pb.DTYPE_FLOAT16)), "declared twice"),
        ((("a", (1 << 40,), pb.DTYPE_FLOAT32),), "too large"),
        ((("", (4,), pb.DTYPE_FLOAT32),), "empty"),
    ],
)
def test_bad_activation_declarations_are_typed_errors(acts, said):
    with pytest.raises(ProtocolError, match=said):
        validate_features(pb.FeaturesReply(agent_id="a", models=[declared(*acts)]))


def test_sent_activations_must_have_the_declared_shape_and_dtype():
    d = declared(("a", (2, 3), pb.DTYPE_FLOAT16))
    pkg = pb.PkgIn(model_id="m", items=[pb.PkgInItem(reason=pb.PKG_IN_REASON_TABLE_MISS)])
    tensor.encode(np.zeros((1, 1, 4, 4), np.float32), pkg.inputs)
    for arr, said in (
        (np.zeros((1, 2, 3), np.float16), None),
        (np.zeros((1, 3, 2), np.float16), r"of shape \(3, 2\), declared \(2, 3\)"),
        (np.zeros((1, 2, 3), np.float32), "is DTYPE_FLOAT32, declared DTYPE_FLOAT16"),
    ):
        del pkg.activations[:]
        tensor.encode(arr, pkg.activations.add(name="a").tensor)
        if said is None:
            assert validate_pkg_in(pkg, {"m": d}).activations["a"].shape == (1, 2, 3)
        else:
            with pytest.raises(ProtocolError, match=said) as err:
                validate_pkg_in(pkg, {"m": d})
            assert err.value.error_type == pb.ERROR_TYPE_BAD_TENSOR


# -- the controller's ask and its plan --------------------------------------------------------


def _expected(source="auto", computes=True) -> Expected:
    acts = tuple((n, SHAPES[n]) for n in LAYERS)
    return Expected((1, 4, 4), 3, activations=acts, activations_from=source,
                    computes_activations=computes)  # fmt: skip


def _handshake(core, agent_id, desc):
    """HELLO, the FEATURES_REQUEST it brings, then FEATURES_REPLY: (sid, request, step)."""
    sid, _ = core.open_session(0.0, Identity(Kind.AGENT, agent_id))
    hello = pb.Envelope(version=1, hello=pb.Hello(versions_bitmap=0b10))
    step = core.on_bytes(sid, hello.SerializeToString(), 0.0)
    (req,) = [e for _, e in step.send]
    reply = pb.Envelope(version=1, xid=req.xid)
    reply.features_reply.CopyFrom(pb.FeaturesReply(agent_id=agent_id, models=[desc]))
    return sid, req.features_request, core.on_bytes(sid, reply.SerializeToString(), 0.0)


def _refusal(step) -> str:
    (err,) = [e.error for _, e in step.send if e.HasField("error")]
    assert (err.type, err.code) == (pb.ERROR_TYPE_HELLO_FAILED, pb.HELLO_FAILED_CODE_INCOMPATIBLE)
    assert step.closed and not step.ready
    return err.text


def test_the_controller_asks_for_what_its_detectors_read_and_plans_per_agent(caplog):
    caplog.set_level(logging.INFO, "controller.session")
    core = ControllerCore(Config(journal=":memory:"), {"m"}, 0.0, expected={"m": _expected()})
    good = declared(*((n, SHAPES[n], pb.DTYPE_FLOAT16) for n in LAYERS))
    sid, req, step = _handshake(core, "sends", good)
    assert [
        (a.model_id, [(d.name, tuple(d.shape)) for d in a.activations]) for a in req.activations
    ] == [("m", [("features.2", (16, 14, 14)), ("features.5", (32, 7, 7))])]
    assert step.ready and core.sessions[sid].activations == {"m": frozenset(LAYERS)}
    assert (
        "activations features.2 (16, 14, 14), features.5 (32, 7, 7) sent by the agent"
        in caplog.text
    )
    # another shape: the reference copy computes them (one WARNING naming both sides)
    caplog.clear()
    odd = declared(("features.2", (8, 14, 14), pb.DTYPE_FLOAT16))
    sid, _, step = _handshake(core, "odd", odd)
    assert step.ready and core.sessions[sid].activations == {"m": frozenset()}
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and "features.2 (8, 14, 14)" in rec.message
    assert "reference copy computes them" in rec.message
    # without a copy that computes them, or with activations: agent, it is refused
    for source, computes in (("auto", False), ("agent", True)):
        core.expected["m"] = _expected(source, computes)
        _, _, step = _handshake(core, f"refused-{source}", odd)
        text = _refusal(step)
        assert "the agent declares features.2 (8, 14, 14)" in text
        assert "attach the agent with activations=" in text
    # activations: reference never asks
    core.expected["m"] = _expected("reference")
    _, req, step = _handshake(core, "plain", descriptor())
    assert step.ready and not req.activations


def test_activations_that_were_not_asked_for_are_refused():
    core = ControllerCore(Config(journal=":memory:"), {"m"}, 0.0, expected={"m": _expected()})
    d = declared(
        *((n, SHAPES[n], pb.DTYPE_FLOAT16) for n in LAYERS), ("extra", (4,), pb.DTYPE_FLOAT32)
    )
    sid, _, step = _handshake(core, "a", d)
    assert step.ready
    env = pb.Envelope(version=1, xid=7)
    pkg = env.pkg_in
    pkg.model_id = "m"
    pkg.items.add(reason=pb.PKG_IN_REASON_TABLE_MISS)
    tensor.encode(np.zeros((1, 1, 4, 4), np.float32), pkg.inputs)
    tensor.encode(np.zeros((1, 4), np.float32), pkg.activations.add(name="extra").tensor)
    step = core.on_bytes(sid, env.SerializeToString(), 0.0)
    (err,) = [e.error for _, e in step.send if e.HasField("error")]
    assert err.type == pb.ERROR_TYPE_BAD_REQUEST and "'extra' was not asked for" in err.text
    assert not step.closed


def test_the_models_activations_setting_is_checked():
    cfg = from_mapping({"models": {"m": {"activations": "agent"}}})
    assert cfg.models["m"].activations == "agent"
    with pytest.raises(ConfigError, match=r"models\.m\.activations: one of auto, agent, reference"):
        from_mapping({"models": {"m": {"activations": "sometimes"}}})


# -- the agent sends only what was asked -----------------------------------------------------


def test_an_agent_sends_only_the_activations_asked_with_the_shape_it_declares(caplog):
    from agents import AgentConfig
    from agents.core import AgentCore
    from agents.results import ModelInfo

    calls = []

    def acts(x):
        calls.append(len(x))
        return {n: np.ones((len(x), *SHAPES[n]), np.float32) for n in LAYERS}

    shapes = tuple(SHAPES[n] for n in LAYERS)
    info = ModelInfo("m", (1, 4, 4), ("0", "1", "2"), activation_names=tuple(LAYERS),
                     activations=acts, activation_shapes=shapes)  # fmt: skip
    core = AgentCore("a", [info], AgentConfig(), now=0.0)
    req = pb.FeaturesRequest()
    req.activations.add(
        model_id="m",
        activations=[
            pb.ActivationDescriptor(name="features.5", shape=SHAPES["features.5"]),
            pb.ActivationDescriptor(name="features.2", shape=(1, 2, 3)),  # not as declared
            pb.ActivationDescriptor(name="conv9", shape=(4,)),  # not declared
        ],
    )
    req.activations.add(model_id="other", activations=[pb.ActivationDescriptor(name="x")])
    caplog.set_level(logging.INFO, "agents.core")
    core.connected(0.0)
    core.receive(messages.hello("ctrl").SerializeToString(), 0.0)
    (reply,) = send(core, req, xid=7)
    assert [(a.name, tuple(a.shape)) for a in reply.features_reply.models[0].activations] == [
        (n, SHAPES[n]) for n in LAYERS
    ]
    assert core.activations_asked == {"m": ("features.5",)}
    assert "asks for activations features.2 (1, 2, 3), conv9 (4,) of model 'm'" in caplog.text
    # one line per model it serves: WARNING where it declares other ones (INFO for none)
    levels = {
        r.getMessage().split(" of model ")[1].split(";")[0]: r.levelno
        for r in caplog.records
        if "asks for" in r.getMessage()
    }
    assert levels == {"'m'": logging.WARNING}  # 'other' is another agent's model: no line
    from agents.outbox import build_pkg_in
    from agents.results import Batch, Item

    batch = Batch(5, "m")
    x = np.zeros((1, 4, 4), np.float32)
    batch.items.append(Item(x, np.zeros(3, np.float32), 0, 0.5, "", 1, 0, b"", 1000, 0.0))
    kw = {"version": 1, "wall_offset_s": 0.0}
    rng = np.random.default_rng(0)
    sent = build_pkg_in(batch, info, rng, activations=core.activations_asked["m"], **kw)
    assert [a.name for a in sent.pkg_in.activations] == ["features.5"]
    assert calls == [1]
    assert not build_pkg_in(batch, info, rng, **kw).pkg_in.activations and calls == [1]


def test_an_agent_keeps_its_batches_with_activations_within_the_limits():
    """The controller's HELLO allows 10,000 elements per tensor: with features.5 asked
    (32 x 7 x 7 = 1,568 per item) a PKG_IN carries at most 6 items, declared in FEATURES."""
    from agents import AgentConfig
    from agents.core import AgentCore
    from agents.results import ModelInfo
    from openexample.limits import Limits

    shapes = tuple(SHAPES[n] for n in LAYERS)
    info = ModelInfo("m", (1, 4, 4), ("0", "1", "2"), activation_names=tuple(LAYERS),
                     activations=lambda x: {}, activation_shapes=shapes)  # fmt: skip
    for asked, batch in (((), 64), (("features.5",), 6)):
        core = AgentCore("a", [info], AgentConfig(max_batch_items=64), now=0.0)
        core.connected(0.0)
        hello = messages.hello("ctrl", limits=Limits(max_tensor_elements=10_000))
        core.receive(hello.SerializeToString(), 0.0)
        req = pb.FeaturesRequest()
        for name in asked:
            req.activations.add(model_id="m").activations.add(name=name, shape=SHAPES[name])
        (reply,) = send(core, req, xid=7)
        assert reply.features_reply.max_batch_items == core.outbox.max_batch_items == batch


def test_onnx_needs_the_onnx_package_said_in_one_line(monkeypatch, cnn_onnx):
    import sys

    from agents.models import wrap_model

    adapter = wrap_model(str(cnn_onnx))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ValueError, match="need the onnx package: pip install onnx"):
        adapter.activations_fn(LAYERS)


def test_activations_past_float16_saturate_and_never_void_the_batch():
    """A caller's input whose activations pass float16's range (65504) must not send inf:
    the controller would refuse the whole PKG_IN (NOT_FINITE), the other callers' items
    in the batch with it."""
    from agents.outbox import build_pkg_in
    from agents.results import Batch, Item, ModelInfo

    def acts(x):  # 1e6 times each item's first pixel; NaN where it is 2
        out = {n: np.ones((len(x), *SHAPES[n]), np.float32) * 1e6 * x[:, 0, 0, 0, None, None, None]
               for n in LAYERS}  # fmt: skip
        for a in out.values():
            a[x[:, 0, 0, 0] == 2.0] = np.nan
        return out

    shapes = tuple(SHAPES[n] for n in LAYERS)
    info = ModelInfo("m", (1, 4, 4), ("0", "1", "2"), activation_names=tuple(LAYERS),
                     activations=acts, activation_shapes=shapes)  # fmt: skip
    batch = Batch(5, "m")
    for v in (1.0, -1.0, 1e-3, 2.0):  # one caller's huge activations, NaN, two others
        x = np.full((1, 4, 4), v, np.float32)
        batch.items.append(Item(x, np.zeros(3, np.float32), 0, 0.5, "", 1, 0, b"", 1000, 0.0))
    env = build_pkg_in(batch, info, np.random.default_rng(0), version=1, wall_offset_s=0.0,
                       activations=("features.5",))  # fmt: skip
    got = validate_pkg_in(env.pkg_in, {"m": info.descriptor()}).activations["features.5"]
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert got[0].min() == 65504 and got[1].max() == -65504 and abs(got[2].max() - 1000) < 1
    assert not got[3].any()


def test_one_callers_non_finite_logits_never_void_the_batch():
    """A finite input past the model's range (3e38) gives NaN logits: the PKG_IN that
    carries it and other callers' items must still be one the controller takes."""
    from agents.outbox import build_pkg_in
    from agents.results import Batch, Item, ModelInfo

    info = ModelInfo("m", (1, 4, 4), ("0", "1", "2"))
    batch = Batch(5, "m")
    rows = ([np.nan] * 3, [np.inf, -np.inf, 0.0], [1.0, 2.0, 3.0])
    for row in rows:
        x = np.zeros((1, 4, 4), np.float32)
        logits = np.array(row, np.float32)
        batch.items.append(Item(x, logits, 0, 0.5, "", 1, 0, b"", 1000, 0.0))
    env = build_pkg_in(batch, info, np.random.default_rng(0), version=1, wall_offset_s=0.0)
    got = validate_pkg_in(env.pkg_in, {"m": info.descriptor()}).logits
    big = np.finfo(np.float32).max
    assert got.tolist() == [[0.0, 0.0, 0.0], [big, -big, 0.0], [1.0, 2.0, 3.0]]
