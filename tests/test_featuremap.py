"""Seed 004's feature-map transformer (``featuremap``) and the activations it reads: the
taps on the reference model (TorchScript graphs, forward hooks), the detector's fit,
artifact and calibration, and PKG_IN's activations through the pipeline and a real
controller process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from controller import detectors
from controller.activations import OnnxTaps, Taps, layer_names, taps_for
from controller.core import InspectJob
from controller.detectors import Detector, make_batch
from controller.detectors.base import Batch
from controller.detectors.featuremap import FeatureMapDetector, FeatureMapNet
from controller.detectors.fusion import Pipeline
from controller.pipeline import FusedScorer, score_jobs
from controller.reference_model import load_model, model_fn
from controller.training.example_model import SmallCNN
from openexample import messages, tensor
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn
from tests.conftest import MODEL_ID
from tests.peers import GrpcPeer, pkg_in

LAYERS = ["features.2", "features.5"]
# small enough for a busy 2-core machine (seconds), trained enough to see FGSM
TINY = {
    "dim": 32,
    "epochs": 3,
    "batch_size": 32,
    "num_train": 400,
    "attacks": [{"art_class": "FastGradientMethod", "params": {"eps": e}} for e in (0.2, 0.3)],
    "progress": False,
}


@pytest.fixture(scope="module")
def predict(example_model):
    return model_fn(example_model)


@pytest.fixture(scope="module")
def calibrated(mnist, predict, tmp_path_factory):
    det = FeatureMapDetector(**TINY, cache=str(tmp_path_factory.mktemp("featuremap-cache")))
    det.fit(mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k")
    det.calibrate(make_batch(mnist.calibration.x, predict), 0.05)
    return det


@pytest.fixture(scope="module")
def artifact(calibrated, tmp_path_factory):
    path = tmp_path_factory.mktemp("featuremap-artifact") / "featuremap"
    calibrated.save(path)
    return path


# -- taps -----------------------------------------------------------------------------------


def test_torchscript_taps_equal_forward_hooks_on_the_same_module(example_model):
    scripted = load_model(example_model)
    assert Taps(scripted, LAYERS).scripted
    eager = SmallCNN(10)
    eager.load_state_dict(scripted.state_dict())
    eager.eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        a, b = Taps(scripted, LAYERS)(x), Taps(eager, LAYERS)(x)
        whole = scripted.features(x)
    assert [a[n].shape[1:] for n in LAYERS] == [(16, 14, 14), (32, 7, 7)]
    for n in LAYERS:
        assert torch.equal(a[n], b[n])
    for module in (scripted, eager):  # in the order asked, whatever order the model runs
        with torch.inference_mode():
            assert list(Taps(module, LAYERS[::-1])(x)) == LAYERS[::-1]
    assert torch.equal(a["features.5"], whole)


def test_a_wrong_layer_name_lists_the_layers_and_an_unreachable_one_says_why(example_model):
    scripted = load_model(example_model)
    with pytest.raises(ValueError, match=r"no layer 'conv9'.*features\.2, features\.3"):
        Taps(scripted, ["conv9"])
    with pytest.raises(ValueError, match=r"'head'.*flatten"):
        Taps(scripted, ["head"])  # after the forward's flatten: refused, not guessed
    assert layer_names(scripted)[:2] == ["features", "features.0"]
    with pytest.raises(ValueError, match="TorchScript"):
        taps_for(lambda x: x, LAYERS)  # an ONNX or plain callable reference model


# -- the detector ---------------------------------------------------------------------------


def test_registered_with_its_contract():
    assert detectors.get("featuremap") is FeatureMapDetector
    assert FeatureMapDetector.needs_activations and FeatureMapDetector.needs_model
    assert FeatureMapDetector.fits_through_model


@pytest.mark.parametrize(
    "kwargs",
    [{"adv_ratio": 0.0}, {"adv_ratio": 1.0}, {"dim": 30}, {"layers": []}, {"attacks": []}],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        FeatureMapDetector(**kwargs)


def test_the_network_is_the_seeds_structure():
    net = FeatureMapNet([(16, 14, 14), (32, 7, 7)], dim=32, depth=3, heads=4)
    assert net.pos.shape == (1, 1 + 2 * 49, 32)  # CLS + a 7x7 grid per map
    assert [e.stride for e in net.embeds] == [(2, 2), (1, 1)]
    assert len(net.encoder.layers) == 3 and net.encoder.layers[0].norm_first
    assert net.encoder.layers[0].self_attn.num_heads == 4 and net.head.out_features == 2
    out = net([torch.rand(2, 16, 14, 14), torch.rand(2, 32, 7, 7)])
    assert out.shape == (2, 2)


def test_calibrated_fpr_and_fgsm_on_the_test_split(calibrated, mnist, predict, fgsm):
    clean = calibrated.score(make_batch(mnist.test.x[:500], predict)).scores
    assert np.mean(calibrated.flag(clean)) < 0.12  # target 0.05; 500 unseen images
    x, adv = fgsm
    s_clean = calibrated.score(make_batch(x, predict)).scores
    s_adv = calibrated.score(make_batch(adv, predict)).scores
    assert roc_auc_score(np.r_[np.zeros(len(x)), np.ones(len(adv))], np.r_[s_clean, s_adv]) > 0.9
    assert np.mean(calibrated.flag(s_adv)) > 0.5
    meta = calibrated.meta["featuremap"]
    assert meta["num_clean"] == meta["num_adversarial"] == 400  # adv_ratio 0.5
    assert meta["shapes"] == [[16, 14, 14], [32, 7, 7]]


def test_sent_activations_are_used_float16_too_and_wrong_shapes_refused(calibrated, mnist, predict):
    b = make_batch(mnist.test.x[:8], predict)
    acts = Taps(predict.module, LAYERS).numpy(b.inputs)
    own = calibrated.score(b).scores
    sent = calibrated.score(Batch(b.inputs, b.logits, b.labels, acts)).scores
    np.testing.assert_allclose(sent, own, rtol=1e-5, atol=1e-5)
    half = {n: a.astype(np.float16) for n, a in acts.items()}
    np.testing.assert_allclose(
        calibrated.score(Batch(b.inputs, b.logits, b.labels, half)).scores, own, atol=0.05
    )
    zeros = {n: np.zeros_like(a) for n, a in acts.items()}
    assert not np.allclose(calibrated.score(Batch(b.inputs, b.logits, b.labels, zeros)).scores, own)
    bad = {**acts, "features.5": acts["features.5"][:, :, :6, :6]}
    with pytest.raises(ValueError, match=r"'features.5' has shape \(32, 6, 6\)"):
        calibrated.score(Batch(b.inputs, b.logits, b.labels, bad))


def test_artifact_round_trip_and_no_model(calibrated, artifact, mnist, predict):
    b = make_batch(mnist.test.x[:16], predict)
    loaded = Detector.load(artifact)
    loaded.model = predict
    np.testing.assert_array_equal(loaded.score(b).scores, calibrated.score(b).scores)
    assert loaded.threshold == calibrated.threshold
    loaded.model = None
    with pytest.raises(ValueError, match="activations in PKG_IN or a reference model"):
        loaded.score(b)
    acts = Taps(predict.module, LAYERS).numpy(b.inputs)  # the agent sent them: no model needed
    got = loaded.score(Batch(b.inputs, b.logits, b.labels, acts)).scores
    np.testing.assert_allclose(got, calibrated.score(b).scores, atol=1e-5)


def test_an_onnx_reference_copy_computes_them(calibrated, cnn_onnx, mnist, predict):
    b = make_batch(mnist.test.x[:8], predict)
    onnx_ref = model_fn(cnn_onnx)
    assert isinstance(taps_for(onnx_ref, LAYERS), OnnxTaps)
    own = calibrated.score(b).scores
    try:  # the same detector, its reference copy now the ONNX export
        calibrated.model = onnx_ref
        np.testing.assert_allclose(calibrated.score(b).scores, own, atol=1e-4)
    finally:
        calibrated.model = predict
    with pytest.raises(ValueError, match=r"no layer 'conv9'.*features\.2"):
        taps_for(onnx_ref, ["conv9"])


def test_the_controller_knows_what_featuremap_reads_and_who_computes_it(
    artifact, cnn_onnx, example_model, monkeypatch
):
    import dataclasses
    import sys

    from controller.check import summary
    from controller.config import ConfigError, from_mapping
    from controller.pipeline import expectations, load_scorers

    def config(ref, mode):
        model = {"detectors": [str(artifact)], "fpr": 0.05, "reference_model": str(ref)}
        return from_mapping({"models": {MODEL_ID: {**model, "activations": mode}}})

    for ref, mode in ((example_model, "auto"), (cnn_onnx, "agent")):
        want = expectations(load_scorers(config(ref, mode)))[MODEL_ID]
        assert want.activations == (("features.2", (16, 14, 14)), ("features.5", (32, 7, 7)))
        assert want.computes_activations and want.activations_from == mode
    cfg = dataclasses.replace(config(example_model, "auto"), plaintext=True)
    said = "reads activations features.2 (16, 14, 14), features.5 (32, 7, 7): asked of agents"
    lines = summary(cfg, load_scorers(cfg))
    assert f"  {said}, else computed by the reference copy" in lines
    monkeypatch.setitem(sys.modules, "onnx", None)  # an ONNX copy can no longer give them
    with pytest.raises(ConfigError, match=r"activations: reference, but featuremap's.*onnx"):
        load_scorers(config(cnn_onnx, "reference"))
    assert not expectations(load_scorers(config(cnn_onnx, "auto")))[MODEL_ID].computes_activations


# -- the pipeline and a real controller -----------------------------------------------------


def _job(x, predict, xid, activations=None) -> InspectJob:
    logits = predict(x)
    items = [pb.PkgInItem(label=int(v)) for v in logits.argmax(1)]
    pkg = DecodedPkgIn(MODEL_ID, x, logits, items, activations or {})
    return InspectJob(sid=1, xid=xid, agent_id="a", pkg=pkg, received_at=0.0)


def test_score_jobs_passes_pkg_in_activations_and_batches_alike_jobs(calibrated, mnist, predict):
    scorer = FusedScorer(MODEL_ID, Pipeline([calibrated], 0.05))
    x = mnist.test.x[:6]
    acts = Taps(predict.module, LAYERS).numpy(x)
    zeros = {n: np.zeros_like(a) for n, a in acts.items()}
    jobs = [
        _job(x[:3], predict, 1),
        _job(x[3:], predict, 2, {n: a[3:] for n, a in acts.items()}),
        _job(x[:3], predict, 3, {n: a[:3] for n, a in zeros.items()}),
    ]
    out = score_jobs(scorer, jobs)
    own = calibrated.score(make_batch(x, predict)).scores
    np.testing.assert_allclose([i.evidence[0].score for i in out[0]], own[:3], atol=1e-4)
    np.testing.assert_allclose([i.evidence[0].score for i in out[1]], own[3:], atol=1e-4)
    from_zeros = calibrated.score(make_batch(x[:3], predict)).scores
    assert not np.allclose([i.evidence[0].score for i in out[2]], from_zeros, atol=1e-3)


@pytest.mark.integration
def test_a_controller_scores_sent_and_computed_activations(
    controller, artifact, calibrated, mnist, predict, example_model
):
    model = {"detectors": [str(artifact)], "fpr": 0.05, "reference_model": str(example_model)}
    proc = controller(models={MODEL_ID: model})
    peer = GrpcPeer(proc.channel_as("agent/fm-raw"))
    try:
        peer.recv("hello")
        peer.send(messages.hello("fm-raw").SerializeToString())
        req = peer.recv("features_request")
        asked = req.features_request.activations  # what the detectors read, by shape
        assert [(a.model_id, [(d.name, tuple(d.shape)) for d in a.activations]) for a in asked] == [
            (MODEL_ID, [("features.2", (16, 14, 14)), ("features.5", (32, 7, 7))])
        ]
        desc = pb.ModelDescriptor(
            model_id=MODEL_ID,
            input_shape=(1, 28, 28),
            input_dtype=pb.DTYPE_FLOAT32,
            class_names=[str(i) for i in range(10)],
            activations=[
                pb.ActivationDescriptor(name=d.name, shape=d.shape, dtype=pb.DTYPE_FLOAT16)
                for d in asked[0].activations
            ],
        )
        reply = pb.FeaturesReply(agent_id="fm-raw", models=[desc])
        peer.send(messages.reply(req, reply).SerializeToString())
        while not (env := peer.recv()).HasField("barrier_request"):
            pass
        peer.send(messages.reply(env, pb.BarrierReply()).SerializeToString())
        x = mnist.test.x[:4]
        logits = predict(x)
        acts = Taps(predict.module, LAYERS).numpy(x)
        own = calibrated.score(make_batch(x, predict)).scores
        for xid, sent in ((11, None), (12, {n: a.astype(np.float16) for n, a in acts.items()})):
            pkg = pkg_in(x, MODEL_ID, logits)
            for n, a in (sent or {}).items():
                pkg.activations.add(name=n, tensor=tensor.encode(a))
            peer.send_env(pkg, xid=xid)
            out = peer.recv("pkg_out", timeout=30)
            assert out.xid == xid
            got = [i.evidence[0].score for i in out.pkg_out.items]
            np.testing.assert_allclose(got, own, atol=0.05 if sent else 1e-4)
        pkg = pkg_in(x, MODEL_ID, logits)
        pkg.activations.add(name="conv9", tensor=tensor.encode(acts["features.2"]))
        peer.send_env(pkg, xid=13)
        err = peer.recv("error", timeout=30).error
        assert err.type == pb.ERROR_TYPE_BAD_REQUEST and "not declared" in err.text
    finally:
        peer.close()


# -- agents send activations ----------------------------------------------------------------


def test_an_agent_builds_declared_float16_activations_the_controller_accepts(example_model):
    from agents.models import wrap_model
    from agents.outbox import build_pkg_in
    from agents.results import Batch as AgentBatch
    from agents.results import Item, ModelInfo
    from openexample.validate import validate_pkg_in

    adapter = wrap_model(str(example_model), input_shape=(1, 28, 28))
    info = ModelInfo(
        MODEL_ID,
        (1, 28, 28),
        tuple(str(i) for i in range(10)),
        activation_names=tuple(LAYERS),
        activations=adapter.activations_fn(LAYERS),
        activation_shapes=((16, 14, 14), (32, 7, 7)),
    )
    desc = info.descriptor()
    assert list(desc.activation_names) == LAYERS  # deprecated, still filled
    assert [(a.name, tuple(a.shape), a.dtype) for a in desc.activations] == [
        ("features.2", (16, 14, 14), pb.DTYPE_FLOAT16),
        ("features.5", (32, 7, 7), pb.DTYPE_FLOAT16),
    ]
    batch = AgentBatch(5, MODEL_ID)
    xs = np.random.default_rng(0).random((3, 1, 28, 28), np.float32)
    for x in xs:
        logits = adapter.predict(x[None])[0]
        item = Item(x, logits, int(logits.argmax()), 0.9, "", 1, 0, b"", 1000, 0.0)
        batch.items.append(item)

    def build(asked):
        env = build_pkg_in(
            batch, info, np.random.default_rng(0), version=1, wall_offset_s=0.0, activations=asked
        )
        return validate_pkg_in(env.pkg_in, {MODEL_ID: desc})

    assert build(()).activations == {}  # not asked: none computed, none sent
    assert list(build(("features.5",)).activations) == ["features.5"]
    decoded = build(tuple(LAYERS))
    assert {n: (a.dtype, a.shape) for n, a in decoded.activations.items()} == {
        "features.2": (np.float16, (3, 16, 14, 14)),
        "features.5": (np.float16, (3, 32, 7, 7)),
    }
    want = Taps(load_model(example_model), LAYERS).numpy(xs)
    np.testing.assert_allclose(decoded.activations["features.5"], want["features.5"], atol=1e-2)


def test_an_eager_module_is_tapped_on_a_copy_and_bad_requests_are_config_errors(example_model):
    from agents import AgentConfig
    from agents.models import wrap_model
    from openexample.errors import ConfigError

    eager = SmallCNN(10)
    eager.load_state_dict(load_model(example_model).state_dict())
    fn = wrap_model(eager, input_shape=(1, 28, 28)).activations_fn(LAYERS)
    assert not eager._forward_hooks and not eager.features[2]._forward_hooks  # a copy
    x = np.random.default_rng(1).random((2, 1, 28, 28), np.float32)
    np.testing.assert_array_equal(fn(x)["features.2"], Taps(eager, LAYERS).numpy(x)["features.2"])
    with pytest.raises(ValueError, match=r"no layer 'conv9'.*features\.2"):
        wrap_model(eager, input_shape=(1, 28, 28)).activations_fn(["conv9"])
    with pytest.raises(ValueError, match="callable model cannot send them"):
        wrap_model(lambda a: a.reshape(len(a), -1)[:, :10]).activations_fn(LAYERS)
    with pytest.raises(ConfigError, match="not with privacy noise"):
        AgentConfig(activations=LAYERS, privacy="gaussian:16384")
    with pytest.raises(ConfigError, match="activations_dtype"):
        AgentConfig(activations=LAYERS, activations_dtype="int8")
    assert AgentConfig(activations="features.2, features.5").activations == tuple(LAYERS)


@pytest.mark.integration
def test_attached_agent_sends_activations_and_gets_verdicts(
    controller, artifact, example_model, mnist, fgsm
):
    from agents import attach
    from openexample.errors import ConfigError

    model = {"detectors": [str(artifact)], "fpr": 0.05, "reference_model": str(example_model)}
    proc = controller(models={MODEL_ID: model})
    shape = {"model_id": MODEL_ID, "input_shape": (1, 28, 28), "connect_timeout_s": 20}
    with pytest.raises(ConfigError, match=r"no layer 'conv9'.*features\.2"):
        attach(str(example_model), controller=proc.address, activations=["conv9"],
               **shape, **proc.agent_tls("fm-bad"))  # fmt: skip
    guards = {}
    for name, acts in (("fm-plain", ()), ("fm-acts", LAYERS)):
        g = attach(str(example_model), controller=proc.address, activations=acts,
                   **shape, **proc.agent_tls(name))  # fmt: skip
        guards[name] = g
    try:
        _, adv = fgsm
        for i, g in enumerate(guards.values()):  # other inputs: no RT entry pushed for them
            assert g.connected
            clean = [g(x) for x in mnist.test.x[10 * i : 10 * i + 10]]
            attacked = [g(a) for a in adv[10 * i : 10 * i + 10]]
            assert [r.decided_by for r in clean + attacked] == ["controller"] * 20
            assert sum(r.verdict == "adversarial" for r in attacked) >= 5
            assert sum(r.verdict == "adversarial" for r in clean) <= 2
        sent = {n: g.core.counters.pkg_in_bytes for n, g in guards.items()}
        # 20 items of 3.2 kB; float16 activations add 9.4 kB each
        assert sent["fm-acts"] > sent["fm-plain"] + 20 * 9000
    finally:
        for g in guards.values():
            g.close()


@pytest.mark.integration
def test_the_controller_asks_an_onnx_agent_and_refuses_one_that_cannot_send(
    controller, artifact, example_model, cnn_onnx, fgsm
):
    """models.ID.activations: agent. An agent running the ONNX export of the model sends
    the layers the controller asked for (by module path) and gets verdicts; an agent that
    declares only one of them is refused at FEATURES, the reason naming both sides."""
    import time

    from agents import attach

    model = {
        "detectors": [str(artifact)],
        "fpr": 0.05,
        "reference_model": str(example_model),
        "activations": "agent",
    }
    proc = controller(models={MODEL_ID: model})
    shape = {"model_id": MODEL_ID, "input_shape": (1, 28, 28), "connect_timeout_s": 20}
    g = attach(str(cnn_onnx), controller=proc.address, activations=LAYERS,
               **shape, **proc.agent_tls("fm-onnx"))  # fmt: skip
    try:
        assert g.connected and g.core.activations_asked == {MODEL_ID: tuple(LAYERS)}
        _, adv = fgsm
        attacked = [g(a) for a in adv[:10]]
        assert [r.decided_by for r in attacked] == ["controller"] * 10
        assert sum(r.verdict == "adversarial" for r in attacked) >= 5
        # each item carried both layers (9.4 kB in float16) besides its 3.2 kB input
        assert g.core.counters.pkg_in_bytes > 10 * 12_000
    finally:
        g.close()
    half = attach(str(example_model), controller=proc.address, activations=["features.2"],
                  **{**shape, "connect_timeout_s": 3}, **proc.agent_tls("fm-half"))  # fmt: skip
    try:
        assert not half.connected
        deadline = time.monotonic() + 30
        said = "agent 'fm-half' refused at FEATURES: HELLO_FAILED/INCOMPATIBLE"
        while not (lines := [ln for ln in proc.log if said in ln]):
            assert time.monotonic() < deadline, "\n".join(proc.log[-20:])
            time.sleep(0.1)
        assert "features.5 (32, 7, 7); the agent declares features.2 (16, 14, 14)" in lines[0]
    finally:
        half.close()
    assert any("'fm-onnx': model" in ln and "sent by the agent" in ln for ln in proc.log)
