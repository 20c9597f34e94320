"""ISMN (seed 002): the networks, where its adversarial training data come from and their
cache, the artifact, calibration, and (a small one, trained here) against FGSM made on
the test split: detection and the purified label."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from controller import detectors
from controller.detectors import Batch, Detector, make_batch
from controller.detectors.base import conformal_rank
from controller.detectors.ismn import (
    IsmnDetector,
    Mapper,
    classifier,
    inference_copy,
    inputs_digest,
)
from controller.reference_model import model_fn
from controller.training import adversarial

FGSM_ONLY = [{"art_class": "FastGradientMethod", "params": {"eps": eps}} for eps in (0.1, 0.2, 0.3)]
# small enough for a busy 2-core machine (a few seconds), trained enough to see FGSM
TINY = {
    "mapper_channels": [8, 16, 32, 32],
    "classifier_channels": [8, 16, 8, 8],
    "dense": 32,
    "epochs": 8,
    "classifier_epochs": 3,
    "batch_size": 32,
    "num_train": 400,
    "attacks": FGSM_ONLY,
    "progress": False,
}


@pytest.fixture(scope="module")
def predict(example_model):
    return model_fn(example_model)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ismn-cache")


@pytest.fixture(scope="module")
def fitted(mnist, predict, cache):
    """A tiny ISMN, and the inputs each call of ``mixed_adversarials`` was given."""
    calls: list[np.ndarray] = []
    real = adversarial.mixed_adversarials

    def recording(module, x, classes, **kwargs):
        calls.append(np.array(x))
        return real(module, x, classes, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adversarial, "mixed_adversarials", recording)
        det = IsmnDetector(**TINY, cache=str(cache))
        det.fit(mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k")
    return det, calls


@pytest.fixture(scope="module")
def calibrated(fitted, mnist, predict):
    det = fitted[0]
    det.calibrate(make_batch(mnist.calibration.x, predict), 0.05)
    return det


def test_registered():
    assert detectors.get("ismn") is IsmnDetector
    assert IsmnDetector.needs_model and IsmnDetector.can_purify


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mapper_channels": [8, 16, 32]},
        {"classifier_channels": [8, 0, 8, 8]},
        {"epochs": 0},
        {"num_train": 1},
        {"attacks": []},
        {"attacks": [{"params": {"eps": 0.3}}]},
        {"attacks": [{"art_class": "FastGradientMethod", "eps": 0.3}]},
        {"attacks": [{"art_class": "FastGradientMethod", "weight": 0}]},
        {"lr": 0},
        {"threads": 0},
    ],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        IsmnDetector(**kwargs)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 27, 31)])
def test_networks_keep_the_shape(shape):
    torch.manual_seed(0)
    m = Mapper(shape, [4, 8, 8, 8], 16)
    c = classifier(shape, [4, 8, 4, 4], 8)
    x = torch.rand(3, *shape)
    m.train()
    m(x).sum().backward()  # trainable (batch norm in training mode)
    m.eval()
    with torch.no_grad():
        out = m(x)
        assert out.shape == x.shape
        assert float(out.min()) >= 0 and float(out.max()) <= 1  # a sigmoid output
        assert c(x - out).shape == (3, 1)
        # the scoring copy: batch norm folded, traced; the same function
        logit, purified = inference_copy(m, c.eval(), shape)(x)
        torch.testing.assert_close(purified, out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logit, c(x - out).flatten(), atol=1e-4, rtol=1e-4)


def test_adversarials_come_from_the_training_inputs_only(fitted, mnist):
    det, calls = fitted
    n = TINY["num_train"]
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], mnist.train.x[:n])
    info = det.meta["ismn"]
    assert info["num_train"] == n and "cached" not in info
    assert info["inputs_digest"] == inputs_digest(mnist.train.x[:n])
    assert info["inputs_digest"] != inputs_digest(mnist.train.x[: n + 1])
    # no test input among them
    seen = {row.tobytes() for row in calls[0]}
    assert not any(row.tobytes() in seen for row in mnist.test.x)
    assert info["attacks"] == [f"FastGradientMethod@{e:g}" for e in (0.1, 0.2, 0.3)]


def test_adversarial_cache_is_reused(fitted, mnist, predict, cache, monkeypatch):
    det, _ = fitted
    files = list((cache / "ismn").glob("adv-*.npz"))
    assert [f.name for f in files] == [f"adv-{det.meta['ismn']['adversarials_digest']}.npz"]

    def no_art(*args, **kwargs):
        raise AssertionError("ART ran again: the cache was not used")

    monkeypatch.setattr(adversarial, "mixed_adversarials", no_art)
    # the key covers the adversarials (inputs, model, mixture, seed), not the training
    quick = {**TINY, "epochs": 1, "classifier_epochs": 1}
    again = IsmnDetector(**quick, cache=str(cache))
    again.fit(mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k")
    assert again.meta["ismn"]["cached"] == str(files[0])
    assert again.meta["ismn"]["adversarials_digest"] == det.meta["ismn"]["adversarials_digest"]
    # other training inputs, another mixture or another seed: another key (and ART again)
    for other in ({"num_train": 300}, {"attacks": FGSM_ONLY[:1]}, {"seed": 1}):
        with pytest.raises(AssertionError, match="ART ran again"):
            IsmnDetector(**{**quick, **other}, cache=str(cache)).fit(
                mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k"
            )


def test_training_is_deterministic_with_the_seed(mnist, predict, cache):
    small = {**TINY, "num_train": 64, "epochs": 2, "classifier_epochs": 1}

    def fit(**kwargs):
        det = IsmnDetector(**{**small, **kwargs}, cache=str(cache))
        det.fit(mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k")
        return det.arrays()

    threads = torch.get_num_threads()
    a, b, c = fit(), fit(), fit(seed=1, threads=2)
    assert torch.get_num_threads() == threads  # fit's threads are put back
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.startswith("mapper."))


def test_calibrate_gives_the_target_fpr(calibrated, mnist, predict):
    s = calibrated.score(make_batch(mnist.calibration.x, predict)).scores
    n = len(s)
    # split-conformal: all but the k = ceil((n + 1)(1 - fpr)) lowest are flagged
    assert np.sum(s >= calibrated.threshold) == n - conformal_rank(n, 0.05)
    assert calibrated.meta["calibration"]["measured_fpr"] <= 0.05


def test_detects_fgsm_on_the_test_split_and_purifies(calibrated, fgsm, predict):
    clean, adv = fgsm  # FGSM eps 0.3 on test inputs that fool the model
    assert len(adv) > 50
    s_clean = calibrated.score(make_batch(clean, predict)).scores
    adv_batch = make_batch(adv, predict)
    got = calibrated.score(adv_batch)
    auc = roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[s_clean, got.scores])
    assert auc > 0.8
    assert np.mean(got.scores >= calibrated.threshold) > 0.5
    # the truth: the model's label on the clean input (all of these fooled it)
    truth = predict(clean).argmax(1)
    flagged = got.scores >= calibrated.threshold
    model_acc = np.mean(adv_batch.labels[flagged] == truth[flagged])
    purified_acc = np.mean(got.corrected[flagged] == truth[flagged])
    assert purified_acc > model_acc + 0.25
    # corrected: the model's label on M(x) for flagged items, the batch's label for others
    want = predict(calibrated.purify(adv)).argmax(1)
    np.testing.assert_array_equal(got.corrected[flagged], want[flagged])
    np.testing.assert_array_equal(got.corrected[~flagged], adv_batch.labels[~flagged])


def test_scores_of_small_and_large_batches_agree(calibrated, mnist, predict):
    x = mnist.test.x[:40]
    whole = calibrated.score(make_batch(x, predict))
    ones = [calibrated.score(make_batch(x[i : i + 1], predict)) for i in range(len(x))]
    np.testing.assert_allclose([o.scores[0] for o in ones], whole.scores, rtol=1e-4, atol=1e-4)
    # and the score is C's logit on x - M(x)
    with torch.inference_mode():
        t = torch.from_numpy(np.array(x))
        want = calibrated.classifier(t - calibrated.mapper(t)).flatten().numpy()
    np.testing.assert_allclose(whole.scores, want, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_gives_identical_scores(calibrated, mnist, predict, tmp_path):
    calibrated.save(tmp_path / "ismn")
    manifest = json.loads((tmp_path / "ismn" / "manifest.json").read_text())
    assert manifest["name"] == "ismn" and manifest["config"]["attacks"] == [
        {"art_class": "FastGradientMethod", "params": {"eps": e}, "weight": 1.0}
        for e in (0.1, 0.2, 0.3)
    ]
    assert "cache" not in manifest["config"] and "progress" not in manifest["config"]
    assert manifest["ismn"]["attacks"] == calibrated.meta["ismn"]["attacks"]
    back = Detector.load(tmp_path / "ismn")
    assert isinstance(back, IsmnDetector) and back.threshold == calibrated.threshold
    back.model = predict
    for n in (1, 64):
        batch = make_batch(mnist.test.x[:n], predict)
        a, b = back.score(batch), calibrated.score(batch)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.corrected, b.corrected)


def test_score_without_a_model_is_a_clear_error(calibrated, mnist, tmp_path):
    calibrated.save(tmp_path / "ismn")
    back = Detector.load(tmp_path / "ismn")
    with pytest.raises(ValueError, match="needs the model"):
        back.score(Batch(mnist.test.x[:2], None, np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="TorchScript"):  # fit needs the torch module
        IsmnDetector(**TINY).fit(mnist.train.x[:10], mnist.train.y[:10], model=lambda a: a)
    with pytest.raises(ValueError, match="needs the model"):
        IsmnDetector(**TINY).fit(mnist.train.x[:10], mnist.train.y[:10])


def test_plain_numpy_model_wrong_shapes_and_empty_batches(calibrated, mnist, predict):
    x = mnist.test.x[:16]
    batch = make_batch(x, predict)
    calibrated.threshold, threshold = None, calibrated.threshold
    try:
        want = calibrated.score(batch)
        calibrated.model = lambda a: predict(a)  # no .module: the numpy path
        got = calibrated.score(batch)
    finally:
        calibrated.model, calibrated.threshold = predict, threshold
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.corrected, want.corrected)
    with pytest.raises(ValueError, match="shape"):
        calibrated.score(Batch(np.zeros((2, 1, 8, 8), np.float32), None, np.zeros(2, np.int64)))
    empty = calibrated.score(Batch(x[:0], None, np.zeros(0, np.int64)))
    assert empty.scores.shape == (0,) and empty.corrected.shape == (0,)
