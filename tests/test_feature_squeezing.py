"""Feature squeezing: the squeezers, the score, the artifact and the model re-attachment."""

import json

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import roc_auc_score

from controller import config, detectors
from controller.detectors import Batch, Detector, make_batch
from controller.detectors.arrays import bit_depth
from controller.detectors.feature_squeezing import FeatureSqueezingDetector, median_2x2
from controller.pipeline import load_scorers
from controller.reference_model import load_model, model_fn


@pytest.fixture(scope="module")
def predict(example_model):
    return model_fn(example_model)


@pytest.fixture(scope="module")
def fitted(mnist, predict):
    det = FeatureSqueezingDetector()
    return det.fit(mnist.train.x[:100], mnist.train.y[:100], model=predict, dataset="mnist5k")


@pytest.fixture(scope="module")
def fgsm(mnist, example_model):
    net = load_model(example_model)
    x = torch.from_numpy(np.ascontiguousarray(mnist.test.x)).requires_grad_(True)
    torch.nn.functional.cross_entropy(net(x), torch.from_numpy(mnist.test.y)).backward()
    return (x + 0.3 * x.grad.sign()).clamp(0, 1).detach().numpy()


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.just(1), st.integers(1, 9), st.integers(1, 9)),
        elements=st.floats(0, 1, width=32),
    )
)
def test_median_matches_scipy(x):
    want = scipy.ndimage.median_filter(x, size=(1, 1, 2, 2), mode="reflect")
    np.testing.assert_array_equal(median_2x2(x), want)


def test_median_matches_scipy_on_mnist(mnist):
    x = mnist.test.x[:50]
    want = scipy.ndimage.median_filter(x, size=(1, 1, 2, 2), mode="reflect")
    np.testing.assert_array_equal(median_2x2(x), want)


def test_bit_depth_one_bit():
    x = np.array([0.0, 0.49, 0.5, 0.51, 1.0], np.float32)
    np.testing.assert_array_equal(bit_depth(x, 1), [0, 0, 0, 1, 1])  # rint: half to even
    np.testing.assert_allclose(bit_depth(x, 2), np.rint(x * 3) / 3)


def test_registered():
    assert detectors.get("feature_squeezing") is FeatureSqueezingDetector


def test_bad_squeezer():
    with pytest.raises(ValueError, match="squeezers"):
        FeatureSqueezingDetector(squeezers=["jpeg"])
    with pytest.raises(ValueError, match="squeezers"):
        FeatureSqueezingDetector(squeezers=[])


def test_needs_model(mnist):
    assert FeatureSqueezingDetector.needs_model  # declared: the controller attaches one
    det = FeatureSqueezingDetector()
    with pytest.raises(ValueError, match="needs the model"):
        det.score(Batch(mnist.test.x[:2], None, np.zeros(2, np.int64)))


def test_separates_fgsm_from_clean(fitted, mnist, predict, fgsm):
    clean = make_batch(mnist.test.x, predict)
    adv = make_batch(fgsm, predict)
    ok = (clean.labels == mnist.test.y) & (adv.labels != mnist.test.y)
    s_clean = fitted.score(clean).scores
    s_adv = fitted.score(Batch(adv.inputs[ok], adv.logits[ok], adv.labels[ok])).scores
    assert s_clean.min() >= 0 and s_adv.max() <= 2 + 1e-9  # an L1 distance of two softmaxes
    auc = roc_auc_score(np.r_[np.zeros(len(s_clean)), np.ones(len(s_adv))], np.r_[s_clean, s_adv])
    assert auc > 0.85, auc


def test_logits_in_batch_or_not_agree(fitted, mnist, predict):
    x = mnist.test.x[:64]
    with_logits = fitted.score(make_batch(x, predict)).scores
    without = fitted.score(Batch(x, None, np.zeros(64, np.int64))).scores
    np.testing.assert_allclose(with_logits, without, atol=1e-5)


def test_uint8_inputs(fitted, mnist):
    x = mnist.test.x[:16]
    u8 = np.rint(x * 255).astype(np.uint8)
    a = fitted.score(Batch(x, None, np.zeros(16, np.int64))).scores
    b = fitted.score(Batch(u8, None, np.zeros(16, np.int64))).scores
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_artifact_records_model_and_controller_reattaches_it(
    tmp_path, fitted, mnist, predict, example_model
):
    det = FeatureSqueezingDetector(squeezers=["median_2x2", "bit_depth_1"])
    det.fit(mnist.train.x[:50], mnist.train.y[:50], model=predict, dataset="mnist5k")
    det.calibrate(make_batch(mnist.calibration.x, predict), 0.05)
    det.meta["model"] = str(example_model)  # what build_artifacts records
    det.save(tmp_path / "fs")
    manifest = json.loads((tmp_path / "fs" / "manifest.json").read_text())
    assert manifest["config"] == {"squeezers": ["median_2x2", "bit_depth_1"]}
    assert manifest["model"] == str(example_model)

    loaded = Detector.load(tmp_path / "fs")
    assert isinstance(loaded, FeatureSqueezingDetector) and loaded.model is None
    # no reference_model in the config: the manifest's model is used
    cfg = config.from_mapping({"models": {"m": {"detectors": [str(tmp_path / "fs")]}}})
    scorer = load_scorers(cfg)["m"]
    attached = scorer.pipeline.detectors[0]
    assert attached.model is not None
    batch = make_batch(mnist.test.x[:32], predict)
    np.testing.assert_allclose(attached.score(batch).scores, det.score(batch).scores)


def test_controller_reports_a_missing_model(tmp_path, mnist, predict):
    det = FeatureSqueezingDetector().fit(mnist.train.x[:20], mnist.train.y[:20], model=predict)
    det.calibrate(make_batch(mnist.calibration.x[:200], predict), 0.05)
    det.save(tmp_path / "fs")  # no meta["model"]
    cfg = config.from_mapping({"models": {"m": {"detectors": [str(tmp_path / "fs")]}}})
    with pytest.raises(config.ConfigError, match="reference_model"):
        load_scorers(cfg)
    det.meta["model"] = str(tmp_path / "missing.pt")
    det.save(tmp_path / "fs")
    with pytest.raises(config.ConfigError, match="cannot load model"):
        load_scorers(cfg)
