"""Split-conformal calibration (controller/detectors/base.py): the threshold's rank, the
promise it keeps on unseen data (synthetic scores), the refusal of too few scores, and
the manifest mark that makes ``ensure_artifacts`` rebuild artifacts calibrated otherwise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from controller.detectors.base import (
    CALIBRATION,
    Batch,
    Detector,
    Scores,
    conformal_rank,
    conformal_threshold,
)
from controller.detectors.fusion import Pipeline
from controller.training.train import artifact_is_current


class Given(Detector):
    """Scores are the inputs themselves: calibration on synthetic scores."""

    name = "given"

    def score(self, batch: Batch) -> Scores:
        return Scores(np.asarray(batch.inputs, np.float64).ravel(), None)


def _batch(scores: np.ndarray) -> Batch:
    return Batch(np.asarray(scores), None, np.zeros(len(scores), np.int64))


@pytest.mark.parametrize(
    ("n", "alpha", "k"), [(1000, 0.01, 991), (1000, 0.005, 996), (99, 0.01, 99), (19, 0.05, 19)]
)
def test_rank_is_ceil_n_plus_one_times_one_minus_alpha(n, alpha, k):
    assert conformal_rank(n, alpha) == k == math.ceil((n + 1) * (1 - alpha) - 1e-9)
    scores = np.random.default_rng(n).permutation(np.arange(n, dtype=np.float64))
    thr = conformal_threshold(scores, alpha)
    # just above the k-th smallest (k - 1 here): it stays under, everything above is flagged
    assert k - 1 < thr < k - 1 + 1e-9 and int((scores >= thr).sum()) == n - k


def test_too_few_scores_for_the_target_are_refused_by_name():
    assert conformal_rank(199, 0.005) == 199  # the smallest n for 0.5%
    too_few = r"198 clean calibration inputs are too few .* at least 199"
    with pytest.raises(ValueError, match=too_few):
        conformal_rank(198, 0.005)
    det = Given()
    with pytest.raises(ValueError, match=r"detector 'given': 50 clean calibration inputs"):
        det.calibrate(_batch(np.arange(50.0)), 0.01)
    assert det.threshold is None
    # a pipeline of two splits 1% in two: 0.5% each needs 199 items
    pipe = Pipeline([Given(), Given()], 0.01)
    with pytest.raises(ValueError, match="at least 199"):
        pipe.calibrate(_batch(np.arange(150.0)))
    pipe.calibrate(_batch(np.arange(199.0)))


@pytest.mark.parametrize("discrete", [False, True])
def test_expected_fpr_on_unseen_clean_scores_stays_under_the_target(discrete):
    """Many calibration sets of n = 200 at alpha = 0.05, each threshold judged on 2,000
    fresh scores of the same distribution: the mean FPR is at most alpha (the guarantee),
    and close to 1 - k / (n + 1) for continuous scores (not wastefully conservative). The
    old rule (flag floor(alpha n) of the calibration set) overshoots: shown beside it."""
    rng = np.random.default_rng(7)
    n, alpha, trials = 200, 0.05, 400
    k = conformal_rank(n, alpha)

    def draw(size: int) -> np.ndarray:
        v = rng.standard_normal(size)
        return np.round(v * 4) if discrete else v  # discrete: many ties

    conformal, old = [], []
    for _ in range(trials):
        cal, fresh = draw(n), draw(2000)
        conformal.append(np.mean(fresh >= conformal_threshold(cal, alpha)))
        ranked = np.sort(cal)
        thr = np.nextafter(ranked[n - int(np.floor(alpha * n)) - 1], np.inf)
        old.append(np.mean(fresh >= thr))
    se = np.std(conformal) / np.sqrt(trials)
    assert np.mean(conformal) <= alpha + 2 * se
    if not discrete:
        assert abs(np.mean(conformal) - (1 - k / (n + 1))) < 3 * se
        assert np.mean(old) > alpha  # the old rule's k = 190 of 200 misses its promise


def test_calibrate_records_the_method_and_stale_artifacts_are_not_current(tmp_path):
    det = Given()
    det.calibrate(_batch(np.random.default_rng(0).standard_normal(500)), 0.02)
    cal = det.meta["calibration"]
    assert cal["method"] == CALIBRATION and cal["rank"] == conformal_rank(500, 0.02) == 491
    assert cal["measured_fpr"] == pytest.approx(9 / 500)
    det.save(tmp_path / "given")
    assert artifact_is_current(tmp_path / "given")
    manifest = json.loads((tmp_path / "given" / "manifest.json").read_text())
    del manifest["calibration"]["method"]  # as calibrated before split-conformal
    (tmp_path / "given" / "manifest.json").write_text(json.dumps(manifest))
    assert not artifact_is_current(tmp_path / "given")
    assert not artifact_is_current(tmp_path / "absent")


def _saved_margin(path):
    """A margin artifact, fitted and calibrated on random scores, saved at ``path``."""
    from controller import detectors

    rng = np.random.default_rng(0)
    x = rng.random((300, 1, 4, 4)).astype(np.float32)
    logits = rng.normal(size=(300, 10))
    det = detectors.get("margin")()
    det.fit(x, logits.argmax(1))
    det.calibrate(Batch(x, logits, logits.argmax(1)), 0.05)
    det.save(path)
    return det


def test_an_artifact_with_a_setting_this_version_lacks_is_refused_by_name_and_rebuilt(
    tmp_path,
):

    det = _saved_margin(tmp_path / "margin")
    assert artifact_is_current(tmp_path / "margin")
    assert Detector.load(tmp_path / "margin").threshold == det.threshold
    manifest = json.loads((tmp_path / "margin" / "manifest.json").read_text())
    manifest["config"] = {"l2_eps": 0.0}  # written by a version with another setting
    (tmp_path / "margin" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="margin detector has no setting l2_eps; retrain"):
        Detector.load(tmp_path / "margin")
    assert not artifact_is_current(tmp_path / "margin")  # ensure_artifacts rebuilds it


def test_a_cached_artifact_trained_at_defaults_that_changed_since_is_not_current(tmp_path):
    """The robust model's epochs went from 1 + 12 to 2 + 60: a cache built before kept
    serving the old model to every bench run until this check."""
    from controller import detectors
    from controller.detectors.robust import RobustDetector

    assert RobustDetector.changed_defaults({"clean_epochs": 2, "epochs": 60, "eps": 0.3}) == []
    old = {"clean_epochs": 1, "epochs": 12, "eps": 0.3, "threads": 2}
    assert RobustDetector.changed_defaults(old) == ["clean_epochs", "epochs"]
    # a nested or None default (desvig's cgan) is the detector's own business
    assert detectors.get("desvig").changed_defaults({"cgan": {"epochs": 1}}) == []
    _saved_margin(tmp_path / "margin")
    manifest = json.loads((tmp_path / "margin" / "manifest.json").read_text())
    manifest["name"], manifest["config"] = "robust", old  # as the old default wrote it
    (tmp_path / "margin" / "manifest.json").write_text(json.dumps(manifest))
    assert not artifact_is_current(tmp_path / "margin")
    manifest["config"] = {**old, "clean_epochs": 2, "epochs": 60}
    (tmp_path / "margin" / "manifest.json").write_text(json.dumps(manifest))
    assert artifact_is_current(tmp_path / "margin")
