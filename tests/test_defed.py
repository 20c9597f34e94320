"""Defed (seed 001): the denoiser's architecture, the fused ensemble, fit / calibrate /
score on mnist5k (tiny settings), the artifact, and the errors."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from controller import detectors
from controller.detectors import Batch, Detector, make_batch
from controller.detectors.defed import DefedDetector
from controller.detectors.defed.net import DefedNet, EFEBlock, FusedEnsemble, num_parameters
from controller.reference_model import model_fn

TINY = {"sigmas": [40, 100], "widths": [4, 8, 8], "epochs": 3, "train_images": 600}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Scoring on one torch thread, as the controller runs it (and fast on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def predict(example_model):
    return model_fn(example_model)


@pytest.fixture(scope="module")
def fitted(mnist, predict):
    det = DefedDetector(**TINY, progress=False)
    det.fit(mnist.train.x[:1000], mnist.train.y[:1000], model=predict, dataset="mnist5k")
    det.calibrate(make_batch(mnist.calibration.x[:500], predict), 0.05)
    return det


def test_registered():
    assert detectors.get("defed") is DefedDetector
    assert DefedDetector.needs_model and DefedDetector.can_purify


def test_block_has_three_branches_with_fixed_blur_and_edge_filters():
    blk = EFEBlock(4, 6)
    for branch in (blk.blur_branch, blk.edge_branch, blk.identity_branch):
        conv, bn, act = branch
        assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3)
        assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(act, torch.nn.PReLU)
    assert blk.mix.kernel_size == (1, 1) and blk.mix.out_channels == 6
    # the blur and edge filters are fixed buffers, not learned, and not in the artifact
    assert not any(p is blk.filters for p in blk.parameters())
    assert "filters" not in blk.state_dict()
    blur, edge = blk.filters[0, 0], blk.filters[1, 0]
    assert torch.isclose(blur.sum(), torch.tensor(1.0)) and blur[1, 1] == blur.max()
    torch.testing.assert_close(blur, blur.T)
    torch.testing.assert_close(edge, torch.tensor([[1.0, 1, 1], [1, -8, 1], [1, 1, 1]]))
    # on a constant image (away from the zero-padded border) the edge filter sees nothing
    b, e = blk.blur_and_edge(torch.ones(1, 4, 8, 8))
    assert torch.allclose(b[..., 1:-1, 1:-1], torch.ones(1))
    assert e[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_encoder_decoder_sizes_and_parameter_count():
    net = DefedNet().eval()
    sizes = {}
    for name in ("enc1", "enc2", "mid", "dec2", "dec1"):
        getattr(net, name).register_forward_hook(
            lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[1:]))
        )
    out = net(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    assert sizes == {
        "enc1": (8, 28, 28),
        "enc2": (16, 14, 14),
        "mid": (32, 7, 7),
        "dec2": (16, 14, 14),
        "dec1": (8, 28, 28),
    }
    assert 40_000 <= num_parameters(net) <= 65_000, num_parameters(net)


def test_fused_ensemble_matches_the_nets():
    torch.manual_seed(0)
    nets = [DefedNet(1, (4, 8, 8)) for _ in range(3)]
    for net in nets:  # batch statistics and slopes that are not the initial ones
        net.train()
        with torch.no_grad():
            net(torch.rand(16, 1, 28, 28))
            for m in net.modules():
                if isinstance(m, torch.nn.PReLU):
                    m.weight.uniform_(0.05, 0.5)
        net.eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        want = torch.stack([net(x) for net in nets])
        got = FusedEnsemble(nets)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_calibrate_meets_the_target_fpr_and_records_the_paper_rule(fitted, mnist, predict):
    clean = make_batch(mnist.calibration.x[:500], predict)
    s = fitted.score(clean).scores
    n = len(s)
    measured = float(np.mean(s >= fitted.threshold))
    assert 0.05 - 2.0 / n <= measured <= 0.05  # split-conformal: just under the target
    assert fitted.meta["calibration"]["measured_fpr"] == measured
    ci = fitted.meta["confidence_interval"]
    assert ci["k"] == 3.0 and 0.0 <= ci["clean_fpr"] <= 1.0
    assert len(ci["per_denoiser_fpr"]) == 2
    assert ci["clean_fpr"] == pytest.approx(float(np.mean(s > 3.0)))
    stats = fitted.meta["defed"]["clean"]
    assert [d["sigma"] for d in stats] == [40.0, 100.0] and all(d["std"] > 0 for d in stats)


def test_scores_fgsm_above_clean_and_corrects_it(fitted, fgsm, predict, mnist):
    clean, adv = fgsm
    s_clean = fitted.score(make_batch(mnist.test.x[:300], predict)).scores
    adv_batch = make_batch(adv, predict)
    out = fitted.score(adv_batch)
    auc = roc_auc_score(
        np.r_[np.zeros(len(s_clean)), np.ones(len(out.scores))], np.r_[s_clean, out.scores]
    )
    assert auc > 0.8, auc
    # the true labels of the adversarials: the model's labels on their clean originals
    truth = predict(clean).argmax(1)
    model_acc = float(np.mean(adv_batch.labels == truth))  # 0: only fooled ones are kept
    corrected_acc = float(np.mean(out.corrected == truth))
    assert corrected_acc > model_acc + 0.15, (corrected_acc, model_acc)


def test_scores_do_not_depend_on_the_batch(fitted, mnist, predict):
    batch = make_batch(mnist.test.x[:8], predict)
    together = fitted.score(batch)
    one_by_one = [
        fitted.score(Batch(batch.inputs[i : i + 1], None, batch.labels[i : i + 1]))
        for i in range(8)
    ]
    np.testing.assert_allclose(together.scores, [o.scores[0] for o in one_by_one], atol=1e-4)
    np.testing.assert_array_equal(together.corrected, [o.corrected[0] for o in one_by_one])
    assert together.scores.dtype == np.float64 and together.corrected.dtype == np.int64


def test_uint8_inputs_and_invalid_labels(fitted, mnist):
    x = mnist.test.x[:4]
    labels = np.array([0, 1, 2, 99])
    a = fitted.score(Batch(x, None, labels)).scores
    b = fitted.score(Batch(np.rint(x * 255).astype(np.uint8), None, labels)).scores
    np.testing.assert_allclose(a[:3], b[:3], atol=1e-2)
    assert a[3] >= 1e6 > a[:3].max()  # a label that is no class: flagged whatever the input


def test_artifact_round_trip_gives_identical_scores(tmp_path, fitted, mnist, predict):
    fitted.save(tmp_path / "defed")
    manifest = json.loads((tmp_path / "defed" / "manifest.json").read_text())
    assert manifest["config"]["sigmas"] == [40.0, 100.0]
    assert manifest["config"]["widths"] == [4, 8, 8]
    loaded = Detector.load(tmp_path / "defed")
    assert isinstance(loaded, DefedDetector) and loaded.model is None
    assert loaded.threshold == fitted.threshold
    assert loaded.meta["confidence_interval"] == fitted.meta["confidence_interval"]
    loaded.model = predict  # what the controller re-attaches
    batch = make_batch(mnist.test.x[:64], predict)
    a, b = fitted.score(batch), loaded.score(batch)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.corrected, b.corrected)


def test_score_without_model_is_a_clear_error(tmp_path, fitted, mnist):
    fitted.save(tmp_path / "defed")
    loaded = Detector.load(tmp_path / "defed")
    with pytest.raises(ValueError, match="defed needs the model"):
        loaded.score(Batch(mnist.test.x[:2], None, np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="TorchScript"):
        DefedDetector(**TINY).fit(mnist.train.x[:8], mnist.train.y[:8], model=lambda x: x)


def test_wrong_input_shape_is_a_clear_error(fitted):
    for x in (np.zeros((2, 1, 32, 32), np.float32), np.zeros((2, 28, 28), np.float32)):
        with pytest.raises(ValueError, match=r"trained on inputs of shape \[N, 1, 28, 28\]"):
            fitted.score(Batch(x, None, np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="divisible by 4"):
        DefedDetector(**TINY).fit(np.zeros((8, 1, 30, 30)), np.zeros(8), model=None)


def test_bad_settings():
    with pytest.raises(ValueError, match="sigmas"):
        DefedDetector(sigmas=[])
    with pytest.raises(ValueError, match="widths"):
        DefedDetector(widths=[8, 16])
    with pytest.raises(ValueError, match="holdout"):
        DefedDetector(holdout=1.0)


def test_deterministic_and_cached(tmp_path, mnist, predict):
    kw = {"sigmas": [50], "widths": [2, 2, 2], "epochs": 1, "train_images": 64, "holdout": 0.05}
    x, y = mnist.train.x[:400], mnist.train.y[:400]
    a = DefedDetector(**kw, progress=False).fit(x, y, model=predict)
    b = DefedDetector(**kw, progress=False, cache=tmp_path).fit(x, y, model=predict)
    c = DefedDetector(**kw, progress=False, cache=tmp_path).fit(x, y, model=predict)
    assert "cached" not in b.meta["defed"] and "cached" in c.meta["defed"]
    for other in (b, c):
        arrays = other.arrays()
        for k, v in a.arrays().items():
            np.testing.assert_array_equal(v, arrays[k], err_msg=k)
