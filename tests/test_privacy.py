"""Privacy noise (openexample/privacy.py): the mechanism's calibration, clipping and
scale; specs and config errors; the controller's check of FEATURES against the
artifacts' calibration; and, end to end, a real controller with agents that noise."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import norm

from agents.config import AgentConfig
from bench.procs import ROOT
from controller.config import Config
from controller.core import ControllerCore
from controller.session import Expected
from openexample.errors import ConfigError, ProtocolError
from openexample.identity import Identity, Kind
from openexample.privacy import (
    NO_NOISE,
    PrivacyNoise,
    classic_gaussian_sigma,
    gaussian_delta,
    gaussian_sigma,
)
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import validate_features
from tests.strategies import descriptor

# ---- the Gaussian mechanism's sigma -------------------------------------------------------


def reference_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Balle & Wang's own calibration (their Algorithm 1, via the variable s of
    Theorem 9 and a doubling then binary search): another route to the same sigma."""

    def phi(t: float) -> float:
        return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))

    def case_a(s: float) -> float:
        return phi(math.sqrt(epsilon * s)) - math.exp(epsilon) * phi(-math.sqrt(epsilon * (s + 2)))

    def case_b(s: float) -> float:
        return phi(-math.sqrt(epsilon * s)) - math.exp(epsilon) * phi(-math.sqrt(epsilon * (s + 2)))

    if delta >= case_a(0.0):
        f, left, alpha = (
            case_a,
            (lambda v: v > delta),
            (lambda s: math.sqrt(1 + s / 2) - math.sqrt(s / 2)),
        )
        stop = lambda s: case_a(s) >= delta  # noqa: E731
    else:
        f, left, alpha = (
            case_b,
            (lambda v: v < delta),
            (lambda s: math.sqrt(1 + s / 2) + math.sqrt(s / 2)),
        )
        stop = lambda s: case_b(s) <= delta  # noqa: E731
    lo, hi = 0.0, 1.0
    while not stop(hi):
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if left(f(mid)):
            hi = mid
        else:
            lo = mid
    return alpha((lo + hi) / 2) * sensitivity / math.sqrt(2 * epsilon)


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
@pytest.mark.parametrize("sensitivity", [1.0, 28.0])
def test_sigma_is_balle_and_wangs(epsilon, delta, sensitivity):
    assert gaussian_sigma(epsilon, delta, sensitivity) == pytest.approx(
        reference_sigma(epsilon, delta, sensitivity), rel=1e-6
    )


def test_sigma_known_values_and_the_classic_formula():
    # Balle & Wang's example: epsilon 1, delta 1e-5, sensitivity 1 -> 3.73 (classic 4.84)
    assert gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, abs=1e-4)
    assert classic_gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(4.8448, abs=1e-4)
    assert gaussian_sigma(0.5, 1e-5, 2.0) == pytest.approx(2 * gaussian_sigma(0.5, 1e-5, 1.0))


def scipy_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Theorem 8's delta, computed with scipy in log space (independent of ours)."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return float(norm.cdf(a - b) - np.exp(epsilon + norm.logcdf(-a - b)))


@pytest.mark.parametrize("epsilon", [1.0, 16.0, 64.0, 1024.0, 65536.0])
def test_sigma_is_the_smallest_that_meets_delta_for_large_epsilons(epsilon):
    sigma = gaussian_sigma(epsilon, 1e-5, 28.0)
    assert scipy_delta(sigma, epsilon, 28.0) == pytest.approx(1e-5, rel=1e-6)
    assert scipy_delta(sigma * 0.999, epsilon, 28.0) > 1e-5
    assert gaussian_delta(sigma, epsilon, 28.0) == pytest.approx(1e-5, rel=1e-6)
    if epsilon >= 16:  # past epsilon 1 the classic sigma is smaller and misses delta
        classic = classic_gaussian_sigma(epsilon, 1e-5, 28.0)
        assert classic < sigma and scipy_delta(classic, epsilon, 28.0) > 1e-5


# ---- clipping, sensitivity, noise ---------------------------------------------------------


def test_default_clip_is_the_input_boxs_radius_and_sensitivity_its_diameter():
    g = PrivacyNoise("gaussian", 4.0).resolved((1, 28, 28))
    assert (g.norm, g.centre, g.clip, g.sensitivity) == ("l2", 0.5, 14.0, 28.0)
    assert g.scale == pytest.approx(gaussian_sigma(4.0, 1e-5, 28.0))
    lap = PrivacyNoise("laplace", 2.0).resolved((1, 28, 28))
    assert (lap.norm, lap.clip, lap.sensitivity, lap.delta) == ("l1", 392.0, 784.0, 0.0)
    assert lap.scale == 784.0 / 2.0
    wide = PrivacyNoise("gaussian", 1.0, input_range=(0, 255), centre=0.0).resolved((4,))
    assert wide.clip == 255.0 * 2  # the farthest corner from the centre, under L2


def test_inputs_are_clipped_to_the_norm_around_the_centre_and_into_the_range():
    rng = np.random.default_rng(0)
    quiet = PrivacyNoise("gaussian", 1e12, clip=2.0, centre=0.0)  # ~no noise: see the clip
    big = np.ones((3, 100), np.float32)  # norm 10 around 0
    out = quiet.apply(big, rng)
    assert out.dtype == np.float32
    assert np.linalg.norm(out, axis=1) == pytest.approx([2.0] * 3, rel=1e-4)  # scaled down
    small = np.full((2, 100), 0.1, np.float32)  # norm 1: untouched
    assert quiet.apply(small, rng) == pytest.approx(small, abs=1e-4)
    lap = PrivacyNoise("laplace", 1e12, clip=5.0, centre=0.0)
    assert np.abs(lap.apply(big, rng)).sum(axis=1) == pytest.approx([5.0] * 3, rel=1e-4)
    loud = PrivacyNoise("gaussian", 0.5).apply(np.full((10, 64), 0.5, np.float32), rng)
    assert loud.min() == 0.0 and loud.max() == 1.0  # post-processing: back into the range
    u8 = PrivacyNoise("gaussian", 8.0, input_range=(0, 255))
    y = u8.apply(np.full((2, 16), 128, np.uint8), rng)
    assert y.dtype == np.uint8 and not np.array_equal(y, np.full((2, 16), 128))


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_noise_has_the_stated_scale(mechanism):
    noise = PrivacyNoise(mechanism, 3.0, clip=1.0, centre=0.0, input_range=(-1e9, 1e9))
    y = noise.apply(np.zeros((400, 500)), np.random.default_rng(1))
    b = noise.scale
    if mechanism == "gaussian":
        assert b == pytest.approx(gaussian_sigma(3.0, 1e-5, 2.0))
        assert float(y.std()) == pytest.approx(b, rel=0.01)
    else:
        assert b == pytest.approx(2.0 / 3.0)  # sensitivity 2 x clip over epsilon
        assert float(np.abs(y).mean()) == pytest.approx(b, rel=0.01)  # Laplace: E|y| = b
        assert float(y.std()) == pytest.approx(b * math.sqrt(2), rel=0.02)
    assert abs(float(y.mean())) < 0.01 * b


def test_noised_logits_are_centred_clipped_and_noised_at_their_own_scale():
    noise = PrivacyNoise.parse("gaussian:1,logits=noised:2,logits_clip=4")
    assert noise.logits_scale == pytest.approx(gaussian_sigma(2.0, 1e-5, 8.0))
    logits = np.tile(np.array([[100.0, 0.0, 0.0]]), (20_000, 1))
    out = noise.noise_logits(logits, np.random.default_rng(2))
    assert out.dtype == np.float32
    centred = logits - logits.mean(axis=1, keepdims=True)
    clipped = centred * 4.0 / np.linalg.norm(centred[0])
    assert out.mean(axis=0) == pytest.approx(clipped[0], abs=5 * noise.logits_scale / 141)
    assert float((out - clipped).std()) == pytest.approx(noise.logits_scale, rel=0.02)


def test_total_epsilon_and_delta_compose_by_logits_mode():
    label = PrivacyNoise.parse("gaussian:4:1e-6")
    assert (label.logits, label.total_epsilon, label.total_delta) == ("label", 4.0, 1e-6)
    noised = PrivacyNoise.parse("gaussian:4:1e-6,logits=noised:1")
    assert (noised.total_epsilon, noised.total_delta) == (5.0, 2e-6)
    raw = PrivacyNoise.parse("gaussian:4,logits=raw")
    assert math.isinf(raw.total_epsilon)  # raw logits: nothing covers the item
    assert PrivacyNoise.parse("laplace:2,logits=noised:1").total_delta == 0.0
    assert math.isinf(NO_NOISE.total_epsilon) and NO_NOISE.logits == "raw"


# ---- specs, the wire, the manifest ---------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "none",
        "none,logits=label",
        "gaussian:4:1e-05,logits=label",
        "gaussian:0.5:0.001,clip=10,centre=0,logits=raw",
        "gaussian:65536:1e-05,logits=noised:2,logits_clip=5",
        "laplace:3,clip=100,logits=label",
    ],
)
def test_specs_print_and_read_back_the_same(spec):
    noise = PrivacyNoise.parse(spec)
    assert str(noise) == spec
    assert PrivacyNoise.parse(str(noise)) == noise
    resolved = noise.resolved((1, 28, 28))
    assert PrivacyNoise.from_pb(resolved.to_pb()).matches(resolved)
    assert PrivacyNoise.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved


def test_matching_is_at_the_wires_precision_and_on_every_parameter():
    a = PrivacyNoise.parse("gaussian:4").resolved((1, 28, 28))
    assert a.matches(PrivacyNoise.parse("gaussian:4.0000000001").resolved((1, 28, 28)))
    for other in ("gaussian:8", "gaussian:4:1e-6", "gaussian:4,clip=10", "gaussian:4,centre=0",
                  "gaussian:4,logits=raw", "laplace:4", "none"):  # fmt: skip
        assert not a.matches(PrivacyNoise.parse(other).resolved((1, 28, 28))), other


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("laplace", "bad privacy spec 'laplace'"),
        ("uniform:1", "bad privacy spec 'uniform:1'"),
        ("gaussian:0", "epsilon must be > 0, got '0'"),
        ("gaussian:inf", "epsilon must be > 0, got 'inf'"),
        ("gaussian:1:2", "delta must be in (0, 1), got 2.0"),
        ("laplace:1:1e-5", "bad privacy spec"),
        ("gaussian:1,clip=-1", "clip must be > 0, got '-1'"),
        ("gaussian:1,colour=red", "privacy option 'colour': clip, centre, logits or logits_clip"),
        ("gaussian:1,logits=noised", "logits=noised needs its own budget: logits=noised:EPS"),
        ("gaussian:1,logits=all", "logits must be raw, label or noised, got 'all'"),
        ("none,logits=noised:1", "logits=noised needs noise on the input too"),
    ],
)
def test_bad_specs_are_config_errors_naming_the_problem(spec, message):
    with pytest.raises(ValueError) as exc:
        PrivacyNoise.parse(spec)
    assert message in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        AgentConfig(privacy=spec)
    assert str(exc.value).startswith("privacy: ") and message in str(exc.value)


def test_agent_config_refuses_noise_for_another_range_and_other_types():
    with pytest.raises(ConfigError, match=r"privacy: noise for inputs in \(0.0, 255.0\)"):
        AgentConfig(privacy=PrivacyNoise("gaussian", 2.0, input_range=(0, 255)))
    with pytest.raises(ConfigError, match="privacy: None, a PrivacyNoise or a spec"):
        AgentConfig(privacy=4.0)  # type: ignore[arg-type]
    assert AgentConfig(privacy="gaussian:2", input_range=(0, 255)).privacy.input_range == (
        0.0,
        255.0,
    )


def test_features_with_unusable_privacy_are_refused_as_bad_fields():
    d = descriptor()
    d.privacy.CopyFrom(pb.PrivacyNoise(mechanism=pb.NOISE_MECHANISM_GAUSSIAN, epsilon=-1))
    with pytest.raises(ProtocolError, match="model 'm': privacy: epsilon must be > 0"):
        validate_features(pb.FeaturesReply(agent_id="a", models=[d]))
    d.privacy.CopyFrom(pb.PrivacyNoise(mechanism=7))
    with pytest.raises(ProtocolError, match="unknown mechanism 7"):
        validate_features(pb.FeaturesReply(agent_id="a", models=[d]))


def _handshake(core: ControllerCore, agent_id: str, d: pb.ModelDescriptor):
    from openexample import messages

    sid, _ = core.open_session(0.0, Identity(Kind.AGENT, agent_id))
    step = core.on_bytes(
        sid, messages.envelope(pb.Hello(versions_bitmap=0b10)).SerializeToString(), 0.0
    )
    (req,) = [e for _, e in step.send]
    reply = pb.FeaturesReply(agent_id=agent_id, models=[d])
    return core.on_bytes(sid, messages.envelope(reply, xid=req.xid).SerializeToString(), 0.0)


def test_the_controller_refuses_noise_its_detectors_were_not_calibrated_for():
    """FEATURES' privacy against the artifacts': the same is admitted; another epsilon,
    logits mode, or none at all is HELLO_FAILED/INCOMPATIBLE naming both."""
    calibrated = PrivacyNoise.parse("gaussian:64").resolved((1, 4, 4))
    core = ControllerCore(
        Config(journal=":memory:"),
        {"m"},
        0.0,
        expected={"m": Expected((1, 4, 4), 3, "", calibrated)},
    )
    d = descriptor()
    d.privacy.CopyFrom(calibrated.to_pb())
    assert _handshake(core, "same", d).ready
    for spec in ("gaussian:32", "gaussian:64,logits=raw", None):
        other = descriptor()
        if spec is not None:
            other.privacy.CopyFrom(PrivacyNoise.parse(spec).resolved((1, 4, 4)).to_pb())
        step = _handshake(core, "other", other)
        (err,) = [e.error for _, e in step.send]
        assert (err.type, err.code) == (
            pb.ERROR_TYPE_HELLO_FAILED,
            pb.HELLO_FAILED_CODE_INCOMPATIBLE,
        )
        said = str(PrivacyNoise.parse(spec).resolved((1, 4, 4))) if spec else "none"
        assert f"the agent's privacy noise is {said};" in err.text
        assert f"calibrated for {calibrated}" in err.text and not step.ready
    plain = ControllerCore(
        Config(journal=":memory:"), {"m"}, 0.0, expected={"m": Expected((1, 4, 4), 3)}
    )
    assert _handshake(plain, "none", descriptor()).ready
    assert not _handshake(plain, "noised", d).ready


def test_agent_metrics_state_the_guarantee():
    import threading

    from agents.core import AgentCore
    from agents.metrics import AgentMetrics
    from agents.results import ModelInfo

    models = [
        ModelInfo("noised", (1, 4, 4), ("a", "b"), privacy=PrivacyNoise.parse("gaussian:2")),
        ModelInfo(
            "raw", (1, 4, 4), ("a", "b"), privacy=PrivacyNoise.parse("gaussian:2,logits=raw")
        ),
        ModelInfo("off", (1, 4, 4), ("a", "b")),
    ]
    core = AgentCore("ag", models, AgentConfig(), now=0.0)
    reg = AgentMetrics(core, threading.Lock()).registry

    def value(name: str, model: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, {"model": model, "agent": "ag", **labels})

    eps = "openexample_agent_privacy_epsilon"
    assert value(eps, "noised", part="input") == 2.0 and value(eps, "noised", part="total") == 2.0
    assert value(eps, "noised", part="logits") == 0.0  # none sent
    assert value(eps, "raw", part="total") == math.inf and value(eps, "raw", part="input") == 2.0
    assert value(eps, "off", part="total") == math.inf
    assert value("openexample_agent_privacy_delta", "noised") == 1e-5
    sigma = gaussian_sigma(2.0, 1e-5, 4.0)  # 16 elements in [0, 1]: clip 2, sensitivity 4
    assert value("openexample_agent_privacy_noise_scale", "noised", part="input") == pytest.approx(
        sigma
    )
    spec = "gaussian:2:1e-05,clip=2,centre=0.5,logits=label"
    info = {"mechanism": "gaussian", "norm": "l2", "logits": "label", "spec": spec}
    assert value("openexample_agent_privacy_info", "noised", **info) == 1.0


# ---- command lines -------------------------------------------------------------------------


def test_train_refuses_a_bad_privacy_spec_in_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "controller.cli", "train", "margin", "--out", str(tmp_path),
         "--privacy", "gaussian:-3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "openexample-controller train: --privacy: epsilon must be > 0, got '-3'"
    ]


def test_agent_cli_refuses_a_bad_privacy_spec_in_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "agents.cli", "attach", "--model", str(tmp_path / "m.pt"),
         "--controller", "127.0.0.1:6653", "--serve", "127.0.0.1:0", "--privacy", "gauss:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2
    (line,) = p.stderr.splitlines()
    assert line.startswith("openexample-agent: error: privacy: bad privacy spec 'gauss:1'")


# ---- end to end: a real controller, agents that noise --------------------------------------

SPEC = "gaussian:65536"  # near no effect on detection (README "Privacy noise")


@pytest.fixture(scope="module")
def privacy_artifacts(example_model):
    """The default set calibrated for agents with SPEC (built once, cached)."""
    from controller.training.train import DEFAULT_DETECTORS, ensure_artifacts
    from tests.conftest import CACHE

    return ensure_artifacts(DEFAULT_DETECTORS, cache=CACHE, privacy=SPEC)


@pytest.mark.integration
def test_agents_with_privacy_noise_against_a_real_controller(
    controller, privacy_artifacts, example_model, mnist, fgsm
):
    """The agent declares its noise in FEATURES; the controller admits it when its
    detectors were calibrated for that noise and refuses another epsilon, or no noise,
    naming both. Admitted, ``label`` logits mode (no logits go up) works: margin scores
    through the reference model recorded in the artifacts, clean inputs pass at the
    calibrated FPR and FGSM is caught."""
    from agents import attach
    from tests.conftest import MODEL_ID
    from tests.test_security import logged

    manifest = json.loads((privacy_artifacts[0] / "manifest.json").read_text())
    calibrated = PrivacyNoise.parse(SPEC).resolved((1, 28, 28))
    assert manifest["privacy"]["spec"] == str(calibrated)
    models = {MODEL_ID: {"detectors": [str(p) for p in privacy_artifacts], "fpr": 0.01}}
    proc = controller(models=models)
    made = []

    def agent(agent_id: str, wait_s: float, **kw):
        g = attach(
            str(example_model),
            controller=proc.address,
            model_id=MODEL_ID,
            input_shape=(1, 28, 28),
            connect_timeout_s=wait_s,
            **proc.agent_tls(agent_id),
            **kw,
        )
        made.append(g)
        return g

    try:
        g = agent("noisy", 20, privacy=SPEC)
        assert g.connected, "an agent with the calibrated noise was not admitted"
        xs, ys = mnist.test.x[::20], mnist.test.y[::20]  # 50, every class
        results = [g(x) for x in xs]
        assert {r.decided_by for r in results} == {"controller"}
        assert sum(r.verdict == "benign" for r in results) >= 47  # 1% FPR, noise and all
        right = [r for r, y in zip(results, ys, strict=True) if r.verdict == "benign"]
        assert all(r.released and r.label == int(np.argmax(r.output)) for r in right)
        _, adv = fgsm
        caught = sum(g(a).verdict == "adversarial" for a in adv[:20])
        assert caught >= 18
        assert not logged(proc, "left out", timeout_s=0.5)  # margin ran on the reference model

        other = agent("other-eps", 3, privacy="gaussian:1024")
        assert not other.connected
        said = str(PrivacyNoise.parse("gaussian:1024").resolved((1, 28, 28)))
        assert logged(
            proc,
            "agent 'other-eps' refused at FEATURES: HELLO_FAILED/INCOMPATIBLE: model"
            f" '{MODEL_ID}': the agent's privacy noise is {said}; the controller's detectors"
            f" for it were calibrated for {calibrated}",
        )
        plain = agent("no-noise", 3)
        assert not plain.connected
        assert logged(proc, "agent 'no-noise' refused at FEATURES: HELLO_FAILED/INCOMPATIBLE")
        assert logged(proc, "the agent's privacy noise is none;")
    finally:
        for g in made:
            g.close()


@pytest.mark.integration
def test_privacy_bench_spans_useless_to_no_effect(tmp_path, example_model):
    """``openexample-bench privacy``: at epsilon 1 detection is gone (TPR near the FPR),
    at 16384 it is back; the clean FPR stays near its target throughout; the table, the
    JSON and the plot are written."""
    from bench.cli import main
    from tests.conftest import CACHE

    out = tmp_path / "privacy"
    flags = ["--eps", "1,16384,inf", "--n", "100", "--cache", str(CACHE), "--out", str(out)]
    assert main(["privacy", *flags]) == 0
    report = json.loads((out / "privacy.json").read_text())
    useless, fine, off = report["rows"]
    assert (useless["epsilon"], fine["epsilon"], off["epsilon"]) == (1.0, 16384.0, None)
    assert useless["sigma"] > 50 and off["sigma"] == 0.0
    for row in report["rows"]:
        assert row["fpr"] <= 0.05 and row["clean_accuracy"] >= 0.9
    assert max(useless["tpr"].values()) < 0.1 and min(fine["tpr"].values()) > 0.9
    table = (out / "privacy.md").read_text()
    assert "| 16384 | 0.158 |" in table and "inf (off)" in table
    assert (out / "privacy.png").stat().st_size > 10_000


@pytest.mark.integration
def test_the_controller_config_names_and_checks_the_artifacts_noise(
    tmp_path, privacy_artifacts, artifacts
):
    """`openexample-controller check` says which noise the detectors expect, and a set
    whose members were calibrated for different noise is refused by name."""
    import io

    import yaml

    from controller.check import run

    cfg = tmp_path / "c.yaml"
    spec = {"detectors": [str(p) for p in privacy_artifacts]}
    cfg.write_text(yaml.safe_dump({"plaintext": True, "models": {"m": spec}}))
    out, err = io.StringIO(), io.StringIO()
    assert run(str(cfg), out=out, err=err) == 0, err.getvalue()
    calibrated = PrivacyNoise.parse(SPEC).resolved((1, 28, 28))
    assert f"calibrated for agents with privacy noise {calibrated}" in out.getvalue()
    assert "margin: threshold" in out.getvalue() and "+ reference model" in out.getvalue()
    mixed = {"detectors": [str(privacy_artifacts[0]), str(artifacts[1])]}
    cfg.write_text(yaml.safe_dump({"plaintext": True, "models": {"m": mixed}}))
    out, err = io.StringIO(), io.StringIO()
    assert run(str(cfg), out=out, err=err) == 2
    assert "detector artifacts disagree" in err.getvalue()
    assert f"calibrated for privacy {calibrated}" in err.getvalue() and "for none" in err.getvalue()
