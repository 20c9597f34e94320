"""controller/offline.py: trained detectors scoring arrays without a controller."""

from __future__ import annotations

import numpy as np
import pytest

from controller.config import ConfigError
from controller.detectors.base import Batch, Detector
from controller.detectors.fusion import Pipeline
from controller.offline import load_detectors
from controller.reference_model import model_fn


@pytest.fixture(scope="module")
def dets(artifacts):
    return load_detectors(artifacts)


def test_verdicts_are_the_pipelines(dets, artifacts, example_model, fgsm) -> None:
    clean, adv = fgsm
    x = np.concatenate([clean, adv])
    logits = model_fn(example_model)(x)
    p = dets.predict(x, logits=logits)
    # the same as the detectors loaded one by one and fused as the daemon fuses them
    ref = Pipeline([Detector.load(a) for a in artifacts], 0.01).evaluate(
        Batch(x, logits, logits.argmax(1))
    )
    np.testing.assert_array_equal(p.flagged, ref.flagged)
    np.testing.assert_allclose(p.score, ref.score)
    np.testing.assert_array_equal(p.corrected, ref.corrected)
    assert set(p.scores) == {"desvig", "margin"} == set(dets.thresholds)
    assert (p.flagged == (p.score >= 0)).all()
    n = len(clean)
    assert p.flagged[:n].mean() <= 0.05  # clean: about the calibrated FPR
    assert p.flagged[n:].mean() >= 0.95  # FGSM 0.3: caught
    assert (p.corrected[n:][p.flagged[n:]] >= 0).all()  # flagged: a corrected label


def test_a_model_file_gives_the_logits(artifacts, example_model, mnist) -> None:
    x = mnist.test.x[:64]
    with_model = load_detectors(artifacts, model=example_model).predict(x)
    given = load_detectors(artifacts).predict(x, logits=model_fn(example_model)(x))
    np.testing.assert_array_equal(with_model.flagged, given.flagged)
    np.testing.assert_allclose(with_model.score, given.score, rtol=1e-6)
    np.testing.assert_array_equal(with_model.labels, given.labels)


def test_bad_calls_are_named(dets, artifacts, tmp_path, mnist) -> None:
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 8, 8\)"):
        dets.predict(np.zeros((2, 1, 8, 8), np.float32), logits=np.zeros((2, 10)))
    with pytest.raises(ValueError, match="needs logits"):
        dets.predict(mnist.test.x[:2])
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\)"):
        dets.predict(mnist.test.x[:2], logits=np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="cannot load detector artifact"):
        load_detectors([tmp_path / "nothing-here"])
    with pytest.raises(ConfigError, match="no artifact paths"):
        load_detectors([])
