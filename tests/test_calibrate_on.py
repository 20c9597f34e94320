"""``--calibrate-on right`` (controller/training/train.py ``calibration_inputs``): the
thresholds are calibrated on the clean calibration inputs the model classifies correctly,
so the FPR target bounds false alarms on correct outputs; the artifacts, their folder and
the bench's report say which inputs were used."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from controller.cli import main as controller_main
from controller.detectors.base import Detector, conformal_threshold
from controller.reference_model import model_fn
from controller.training import datasets
from controller.training.train import (
    artifacts_folder,
    build_artifacts,
    calibration_inputs,
    check_calibrate_on,
)


def test_right_keeps_only_what_the_model_gets_right() -> None:
    x = np.arange(6, dtype=np.float32).reshape(6, 1)
    y = np.array([0, 1, 0, 1, 0, 1])
    logits = np.array([[1, 0], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]], np.float32)  # 2 wrong
    split = SimpleNamespace(x=x, y=y)
    every, about = calibration_inputs(split, lambda _: logits, "all")
    assert every is x and about == {"inputs": "all", "n": 6, "model_accuracy": 4 / 6}
    right, about = calibration_inputs(split, lambda _: logits, "right")
    assert right[:, 0].tolist() == [0, 1, 3, 4]
    assert about == {"inputs": "right", "n": 4, "model_accuracy": 4 / 6}
    with pytest.raises(ValueError, match="calibrate_on must be one of all, right, got 'some'"):
        check_calibrate_on("some")


def test_right_gets_its_own_artifact_folder(tmp_path) -> None:
    names = ("robust", "margin")
    every = artifacts_folder(names, cache=tmp_path)
    right = artifacts_folder(names, cache=tmp_path, calibrate_on="right", shares=(0.6, 0.4))
    assert right.name == "robust+margin%0.6-0.4^right" and right.parent == every.parent
    with pytest.raises(ValueError, match="calibrate_on"):
        artifacts_folder(names, cache=tmp_path, calibrate_on="wrong")


def test_a_right_calibrated_threshold_is_the_conformal_one_over_the_right_inputs(
    tmp_path, example_model, capsys
) -> None:
    """Built for real (margin: nothing to fit), both ways: each threshold is the
    split-conformal one over the scores of its own calibration inputs, and the manifests
    and calibration.json record which inputs those were."""
    from tests.conftest import CACHE

    cal = datasets.load("mnist5k").split().calibration
    predict = model_fn(example_model)
    logits = predict(cal.x)
    right = logits.argmax(1) == cal.y
    assert 0 < (~right).sum() < len(right)  # the example model errs on some
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, -2:]
    scores = -(top2[:, 1] - top2[:, 0])
    for on, keep in (("all", np.ones_like(right)), ("right", right)):
        (path,) = build_artifacts(
            ["margin"], tmp_path / on, model_path=example_model, cache=CACHE, calibrate_on=on
        )
        det = Detector.load(path)
        assert det.threshold == pytest.approx(conformal_threshold(scores[keep], 0.01), abs=1e-6)
        about = {"inputs": on, "n": int(keep.sum()), "model_accuracy": float(right.mean())}
        assert det.meta["calibrated_on"] == about
        report = json.loads((tmp_path / on / "calibration.json").read_text())
        assert report["calibrated_on"] == about
    # the model's own mistakes are among the least confident clean inputs: without them
    # the threshold on the margin score is stricter at the same target
    every, right_only = (Detector.load(tmp_path / on / "margin") for on in ("all", "right"))
    assert right_only.threshold < every.threshold
    # ``check`` says what the promise covers, and only for right-calibrated sets
    from tests.test_check import _check, _config

    said = "calibrated on the clean inputs the model gets right"
    for on in ("all", "right"):
        folder = tmp_path / f"check-{on}"
        folder.mkdir()
        rc, out, err = _check(_config(folder, [tmp_path / on / "margin"]), capsys)
        assert rc == 0, err
        assert (said in out) == (on == "right"), out


def test_train_refuses_an_unknown_choice_in_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        controller_main(["train", "margin", "--calibrate-on", "most", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert exit_.value.code == 2 and "invalid choice: 'most'" in err
    assert "Traceback" not in err


def test_too_few_right_inputs_for_a_share_are_refused_before_fitting(
    tmp_path, example_model, capsys
) -> None:
    """hardened's split for all inputs gives DeSVig 0.1%, which needs 999 calibration
    inputs; the example model gets fewer of the 1,000 right: one line naming the detector
    and the way out, and nothing fitted. (``hardened`` alone under right takes its own
    split, HARDENED_SHARES_RIGHT.)"""
    from tests.conftest import CACHE

    out = tmp_path / "set"
    shares = "robust=0.4,desvig=0.1,margin=0.3,magnet=0.2"
    argv = ["train", "hardened", "--calibrate-on", "right", "--fpr-shares", shares]
    rc = controller_main([*argv, "--out", str(out), "--cache", str(CACHE)])
    _, err = capsys.readouterr()
    assert rc == 1, err
    assert "calibration inputs right: too few for desvig's share (FPR 0.001 needs 999)" in err, err
    assert "give desvig a larger --fpr-shares share, a larger --fpr" in err, err
    assert err.rstrip().endswith("or --calibrate-on all"), err  # right is hardened's default
    assert "fitting" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
