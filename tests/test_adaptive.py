"""The adaptive attack bench: surrogates whose forward value is the detector's score, a
gradient that reaches the input, and successes the real pipeline confirms."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import adaptive
from bench.surrogates import surrogate
from controller.detectors.base import Batch, Detector
from controller.detectors.fusion import Pipeline
from controller.reference_model import load_model, model_fn


@pytest.fixture(scope="module")
def loaded(artifacts, example_model):
    predict = model_fn(example_model)
    dets = [Detector.load(p) for p in artifacts]
    for d in dets:
        d.model = predict
    return dets, predict


def _inputs(mnist):
    x = mnist.test.x[:120]
    noisy = np.random.default_rng(0).uniform(-0.3, 0.3, x.shape)
    return np.concatenate([x, np.clip(x + noisy, 0, 1).astype(np.float32)])


def test_each_default_detector_has_a_surrogate_equal_to_its_score(loaded, mnist):
    dets, predict = loaded
    x = _inputs(mnist)
    logits = predict(x)
    right = logits.argmax(1)
    for labels in (right, (right + 3) % 10):  # the model's labels, and wrong claims
        for d in dets:
            s = surrogate(d)
            assert s is not None, d.name
            real = np.asarray(d.score(Batch(x, logits, labels)).scores)
            got = s.score(torch.from_numpy(x), torch.from_numpy(logits), torch.from_numpy(labels))
            np.testing.assert_allclose(got.detach().numpy(), real, rtol=1e-5, atol=1e-5)


def test_the_surrogates_gradients_reach_the_input(loaded, mnist, example_model):
    dets, _ = loaded
    module = load_model(example_model)
    x = torch.from_numpy(_inputs(mnist)[:40]).requires_grad_(True)
    logits = module(x)
    labels = (logits.argmax(1) + 1) % 10
    for d in dets:
        (grad,) = torch.autograd.grad(surrogate(d).score(x, logits, labels).sum(), x)
        assert (grad.flatten(1).abs().sum(1) > 0).all(), d.name  # no input left without one


def test_the_adaptive_bench_reports_successes_the_pipeline_confirms(tmp_path, loaded, artifacts):
    out = tmp_path / "adaptive"
    cmd = [sys.executable, "-m", "bench.cli", "detection", "--adaptive", "--quick"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "adaptive.json").read_text())
    assert report["schema"] == "openexample.bench.adaptive/1"
    assert report["detectors"] == ["desvig", "margin"] and report["skipped"] == {}
    assert report["test_images"] == [0, 40]
    (row,) = report["rows"]
    assert row["budget"] == "L-inf 0.3" and row["adaptive"]["n"] == report["n_attacked"] > 20
    assert row["adaptive"]["median_linf"] <= 0.3 + 1e-6  # within the budget
    # every success is misclassified and let through by the deployed pipeline
    dets, predict = loaded
    found = np.load(out / "adaptive_successes.npz")
    adv, y = found["linf-0.3-x"], found["linf-0.3-y"]
    assert len(adv) == row["adaptive"]["broken"] > 0
    assert np.abs(adv - adv.clip(0, 1)).max() == 0
    logits = predict(adv)
    labels = logits.argmax(1)
    flagged = Pipeline(dets, 0.01).evaluate(Batch(adv, logits, labels)).flagged
    assert (labels != y).all() and not flagged.any()
    # without the detector terms, the same budget does worse against the pipeline
    assert row["unaware"]["success"] < row["adaptive"]["success"]
    assert "| L-inf 0.3 | 40 |" in (out / "adaptive.md").read_text()
    assert (out / "adaptive.png").stat().st_size > 0


def test_magnets_surrogate_equals_its_score(mnist, example_model):
    from controller.detectors.magnet import MagnetDetector
    from tests.test_magnet import TINY

    predict = model_fn(example_model)
    torch.manual_seed(0)
    det = MagnetDetector(**TINY).fit(mnist.train.x, mnist.train.y, model=predict)
    cal = mnist.calibration.x[:300]
    det.calibrate(Batch(cal, predict(cal), predict(cal).argmax(1)), 0.01)
    s = surrogate(det)
    assert s is not None
    x = _inputs(mnist)[60:180]  # clean and noisy
    xt = torch.from_numpy(x).requires_grad_(True)
    logits = predict.module(xt)
    labels = logits.argmax(1)
    got = s.score(xt, logits, labels)
    real = det.score(Batch(x, predict(x), labels.numpy())).scores
    np.testing.assert_allclose(got.detach().numpy(), real, rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(got.sum(), xt)
    assert (grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        (["--adaptive-from", "-1"], "--adaptive-from must be at least 0, got -1"),
        (["--adaptive-from", "99999"], "--adaptive-from 99999: the test split has"),
        (["--adaptive-budgets", "linf:0.3,l1:2"], "--adaptive-budgets: 'l1:2' is not NORM:EPS"),
        (["--adaptive-budgets", "linf:-1"], "--adaptive-budgets: 'linf:-1' is not NORM:EPS"),
        (["--adaptive-steps", "0"], "--adaptive-steps must be at least 1, got 0"),
        (["--adaptive-targets", "0"], "--adaptive-targets must be at least 1, got 0"),
        (["--adaptive-kappa", "nan"], "--adaptive-kappa must be a number >= 0, got nan"),
        (["--adaptive-weights", "1,x"], "--adaptive-weights: '1,x' is not positive numbers"),
        (["--adaptive-weights", "0"], "--adaptive-weights: '0' is not positive numbers"),
    ],
)
def test_adaptive_image_ranges_out_of_the_split_are_refused_in_one_line(capsys, flag, said) -> None:
    """Refused before anything is trained or loaded (a clean clone trains nothing here)."""
    from bench.cli import main as bench_main

    rc = bench_main(["detection", "--adaptive", *flag, "--out", "/nonexistent/adaptive"])
    err = capsys.readouterr().err
    assert rc == 2 and said in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_the_attack_flags_make_the_budgets_and_the_defaults_are_the_documented_five() -> None:
    from bench.cli import build_parser

    parse = build_parser().parse_args
    default = adaptive.attack_budgets(parse(["detection", "--adaptive"]))
    assert [b.label for b in default] == ["L-inf 0.1", "L-inf 0.2", "L-inf 0.3", "L2 2", "L2 3"]
    assert default == adaptive.budgets(False)
    flags = ["--adaptive-budgets", "linf:0.3, l2:3", "--adaptive-steps", "500"]
    flags += ["--adaptive-targets", "9", "--adaptive-kappa", "2", "--adaptive-weights", "1,100"]
    got = adaptive.attack_budgets(parse(["detection", "--adaptive", *flags]))
    assert got == [
        adaptive.Budget("linf", 0.3, 500, 9, (1.0, 100.0), 2.0),
        adaptive.Budget("l2", 3.0, 500, 9, (1.0, 100.0), 2.0),
    ]
    quick = adaptive.attack_budgets(parse(["detection", "--adaptive", "--quick", *flags]))
    assert quick == adaptive.budgets(True)  # the smoke run keeps its own
