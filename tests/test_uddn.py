"""UDDN (seed 003): the U-Net's connections, the logits-guided loss, the artifact,
calibration, a small denoiser trained here against FGSM, and the offline distillation."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from controller import detectors
from controller.detectors import Batch, Detector, make_batch
from controller.detectors.base import conformal_rank
from controller.detectors.uddn import (
    C2,
    C3,
    LABEL_CHANGED,
    UddnDetector,
    UNet,
    logits_guided_loss,
)
from controller.reference_model import load_model, model_fn

# small enough for a busy 2-core machine (~10 s), trained enough to see FGSM
TINY = {"width": 8, "epochs": 4, "num_train": 400, "attacks": "fgsm", "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the controller and the training run: on a busy 2-core machine
    a second one only slows these small convolutions down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predict(example_model):
    return model_fn(example_model)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("uddn-cache")


@pytest.fixture(scope="module")
def fitted(mnist, predict, cache):
    det = UddnDetector(**TINY, cache=str(cache))
    return det.fit(mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k")


@pytest.fixture(scope="module")
def artifact(fitted, tmp_path_factory, example_model):
    path = tmp_path_factory.mktemp("uddn-artifact") / "uddn"
    fitted.meta["model"] = str(example_model)
    fitted.save(path)
    return path


# -- the network ---------------------------------------------------------------------------


def _capture(module: torch.nn.Module, store: list) -> None:
    module.register_forward_hook(lambda m, args, out: store.append((args[0].detach(), out)))


def test_unet_structure_strided_down_upsample_concat_and_1x1_output():
    net = UNet(channels=1, width=4, depth=2).eval()
    assert isinstance(net.encoder[0], C2)
    assert [type(b) for b in net.encoder[1:]] == [C3, C3]
    assert [b.c1.conv.stride for b in net.encoder[1:]] == [(2, 2), (2, 2)]
    assert [type(b) for b in net.decoder] == [C3, C2]  # C3 below, C2 at the top
    assert net.out.kernel_size == (1, 1) and net.out.out_channels == 1
    enc, dec = [], []
    for block in net.encoder:
        _capture(block, enc)
    for block in net.decoder:
        _capture(block, dec)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        net(x)
    assert [tuple(out.shape) for _, out in enc] == [(3, 4, 28, 28), (3, 8, 14, 14), (3, 16, 7, 7)]
    # each decoder block takes [upsampled deeper output, lateral encoder output]
    (in1, out1), (in0, _) = dec
    assert tuple(in1.shape) == (3, 16 + 8, 14, 14)
    up = torch.nn.functional.interpolate(enc[2][1], size=(14, 14), mode="nearest")
    assert torch.equal(in1, torch.cat([up, enc[1][1]], 1))
    up = torch.nn.functional.interpolate(out1, size=(28, 28), mode="nearest")
    assert torch.equal(in0, torch.cat([up, enc[0][1]], 1))


def test_output_is_the_input_minus_the_predicted_perturbation():
    torch.manual_seed(0)
    net = UNet(1, 4, 2).eval()
    x = torch.rand(2, 1, 28, 28) * 0.8 + 0.1
    with torch.no_grad():
        assert torch.allclose(net(x), (x - net.perturbation(x)).clamp(0, 1))
        net.out.weight.zero_()
        net.out.bias.fill_(0.05)  # a constant perturbation of 0.05
        assert torch.allclose(net(x), x - 0.05)
        net.out.bias.zero_()  # no perturbation: the input passes unchanged
        assert torch.equal(net(x), x)


def test_c2_is_residual_and_c3_is_dense():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    c2 = C2(3, 5).eval()
    with torch.no_grad():
        a = c2.c1(x)
        assert torch.allclose(c2(x), a + c2.c2(a))
        c2.c2.bn.weight.zero_()  # the second unit outputs relu(0) = 0: only the skip is left
        c2.c2.bn.bias.zero_()
        assert torch.equal(c2(x), a)
    c3 = C3(3, 5, stride=2).eval()
    assert c3.c3.conv.in_channels == 2 * 5  # the third unit sees the first two
    seen = []
    _capture(c3.c3, seen)
    with torch.no_grad():
        out = c3(x)
        a = c3.c1(x)
        b = c3.c2(a)
    assert out.shape == (2, 5, 4, 4)
    assert torch.equal(seen[0][0], torch.cat([a, b], 1))


def test_fused_network_matches_the_trained_one():
    torch.manual_seed(0)
    net = UNet(1, 4, 2)
    net.train()
    with torch.no_grad():
        net(torch.rand(16, 1, 28, 28))  # move the batch-norm statistics off their defaults
    net.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net.fused()(x), net(x), atol=1e-5)


def test_logits_guided_loss_by_hand():
    denoised = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    clean = torch.tensor([[1.0, 0.0, 3.0], [1.0, -1.0, 1.0]])
    # per input: |0| + |2| + |0| = 2 and |-1| + |1| + |-1| = 3
    assert logits_guided_loss(denoised, clean).item() == pytest.approx(2.5)
    weight = torch.tensor([1.0, 3.0])
    assert logits_guided_loss(denoised, clean, weight).item() == pytest.approx((2 + 9) / 4)
    # the gradient reaches the denoised logits only through the L1: sign(difference) / N
    d = denoised.clone().requires_grad_(True)
    logits_guided_loss(d, clean).backward()
    assert torch.equal(d.grad, torch.tensor([[0.0, 0.5, 0.0], [-0.5, 0.5, -0.5]]))


# -- the detector --------------------------------------------------------------------------


def test_registered_with_its_contract():
    cls = detectors.get("uddn")
    assert cls is UddnDetector
    assert cls.needs_model and cls.can_purify


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="attacks"):
        UddnDetector(attacks="nope")
    with pytest.raises(ValueError, match="epochs"):
        UddnDetector(epochs=0)
    with pytest.raises(ValueError, match="art_class"):
        UddnDetector(attacks=[{"eps": 0.1}]).train_config.attack_specs()


def test_fit_and_score_without_a_model_raise_a_clear_error(mnist, artifact):
    with pytest.raises(ValueError, match="uddn needs the model"):
        UddnDetector(**TINY).fit(mnist.train.x[:10], mnist.train.y[:10])
    loaded = Detector.load(artifact)
    assert loaded.model is None
    batch = Batch(mnist.test.x[:4], None, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="uddn needs the model"):
        loaded.score(batch)


def test_training_is_recorded_and_cached(fitted, cache, mnist, predict):
    meta = fitted.meta["uddn"]
    assert meta["attacks"] == [f"FastGradientMethod@{e}" for e in (0.1, 0.2, 0.3)]
    assert sum(meta["attack_counts"].values()) == meta["num_train"] == TINY["num_train"]
    assert meta["train_clean_label_kept"] > 0.9
    assert list((cache / "uddn").glob("adv-*.npy")) and list((cache / "uddn").glob("net-*.npz"))
    # the same settings again: adversarials and denoiser from the cache, the same weights
    again = UddnDetector(**TINY, cache=str(cache))
    again.fit(mnist.train.x, mnist.train.y, model=predict, dataset="mnist5k")
    assert "cached" in again.meta["uddn"] and "cached" in again.meta["uddn"]["adversarials"]
    for k, v in fitted.arrays().items():
        assert np.array_equal(again.arrays()[k], v), k


def test_training_is_deterministic_for_a_seed(mnist, predict):
    kw = {**TINY, "num_train": 48, "epochs": 1, "seed": 3}
    a = UddnDetector(**kw).fit(mnist.train.x, mnist.train.y, model=predict)
    b = UddnDetector(**kw).fit(mnist.train.x, mnist.train.y, model=predict)
    for k, v in a.arrays().items():
        assert np.array_equal(b.arrays()[k], v), k


def test_save_load_round_trip_gives_identical_scores(fitted, artifact, predict, mnist):
    loaded = Detector.load(artifact)
    assert isinstance(loaded, UddnDetector) and loaded.config() == fitted.config()
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["config"]["attacks"] == "fgsm"
    loaded.model = predict
    batch = make_batch(mnist.test.x[:64], predict)
    a, b = fitted.score(batch), loaded.score(batch)
    assert np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.corrected, b.corrected)
    # without the logits: the model runs on x and D(x) together, same scores
    c = loaded.score(Batch(batch.inputs, None, batch.labels))
    np.testing.assert_allclose(c.scores, a.scores, rtol=1e-5)


def test_score_is_the_logit_change_plus_the_label_change_offset(fitted, predict, mnist):
    batch = make_batch(mnist.test.x[:200], predict)
    l1, changed, denoised_label = fitted.parts(batch)
    fd = predict(fitted.denoise(batch.inputs))
    np.testing.assert_allclose(l1, np.abs(fd - batch.logits).sum(1), rtol=1e-4, atol=1e-4)
    assert np.array_equal(denoised_label, fd.argmax(1))
    out = fitted.score(batch)
    assert np.array_equal(out.corrected, denoised_label)
    np.testing.assert_allclose(out.scores, l1 + LABEL_CHANGED * changed)
    assert np.array_equal(changed, denoised_label != batch.labels)
    empty = fitted.score(Batch(batch.inputs[:0], batch.logits[:0], batch.labels[:0]))
    assert empty.scores.shape == (0,) and empty.corrected.shape == (0,)


def test_calibrate_gives_the_target_fpr(fitted, predict, mnist):
    cal = make_batch(mnist.calibration.x, predict)
    scores = fitted.score(cal).scores
    for fpr in (0.01, 0.05):
        fitted.calibrate(cal, fpr)
        # split-conformal: all but the k = ceil((n + 1)(1 - fpr)) lowest are flagged
        assert fitted.flag(scores).sum() == len(cal) - conformal_rank(len(cal), fpr)
        assert fitted.meta["calibration"]["measured_fpr"] <= fpr
    changed = fitted.meta["calibration"]["label_changed"]
    assert changed == np.mean(scores >= LABEL_CHANGED) and changed < 0.1
    in_band = fitted.threshold > LABEL_CHANGED
    assert fitted.meta["calibration"]["threshold_in_changed_band"] == in_band
    assert in_band == (changed > 0.05)
    assert fitted.score(cal).scores is not scores  # the method again, after calibrating
    assert "score" not in vars(fitted)


def test_scores_fgsm_above_clean_and_its_label_beats_the_models(fitted, predict, fgsm):
    clean, adv = fgsm  # FGSM eps 0.3 on the test split, successful ones only
    y = predict(clean).argmax(1)  # the example model was right on these
    c, a = fitted.score(make_batch(clean, predict)), fitted.score(make_batch(adv, predict))
    labels = np.r_[np.zeros(len(c.scores)), np.ones(len(a.scores))]
    assert roc_auc_score(labels, np.r_[c.scores, a.scores]) > 0.9
    assert np.median(a.scores) > np.quantile(c.scores, 0.95)
    model_acc = float(np.mean(predict(adv).argmax(1) == y))
    denoised_acc = float(np.mean(a.corrected == y))
    assert model_acc < 0.05 and denoised_acc > model_acc + 0.3
    assert np.mean(c.corrected == y) > 0.9  # clean inputs keep their label


def test_trained_through_the_train_command_path(tmp_path, cache, example_model, mnist):
    from controller.training.train import build_artifacts

    paths = build_artifacts(
        ["uddn"],
        tmp_path / "out",
        model_path=example_model,
        cache=cache,
        options={"uddn": TINY},
    )
    det = Detector.load(paths[0])
    assert isinstance(det, UddnDetector) and det.threshold is not None
    assert "cached" in det.meta["uddn"]  # the same settings and cache folder as above


# -- the offline distillation ----------------------------------------------------------------


def test_distillation_loss_by_hand():
    from controller.training.distill import distillation_loss

    t = torch.tensor([[2.0, 0.0, -1.0]])
    assert distillation_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor([[0.0, 0.0, 0.0]])
    pt = torch.softmax(t, 1)
    kl1 = float((pt * (pt.log() - np.log(1 / 3))).sum())
    pt2 = torch.softmax(t / 2, 1)
    kl2 = float((pt2 * (pt2.log() - np.log(1 / 3))).sum())
    assert distillation_loss(s, t, 2.0, lam=0.5).item() == pytest.approx(kl1 + 0.5 * 4 * kl2)


def test_distill_writes_a_loadable_student_and_prints_accuracies(
    artifact, example_model, cache, tmp_path, capsys, mnist
):
    """The offline command on a tiny setting (~20 s): 1 epoch, FGSM/PGD on 100 images."""
    from controller.training import distill

    out = tmp_path / "student.pt"
    argv = ["--model", str(example_model), "--uddn", str(artifact), "--out", str(out)]
    argv += ["--epochs", "1", "--num-test", "100", "--eps", "0.3", "--cache", str(cache)]
    assert distill.main(argv) == 0
    printed = capsys.readouterr().out
    for row in ("clean", "FGSM@0.3 white-box", "PGD@0.3 white-box", "UDDN-denoised"):
        assert row in printed
    student, teacher = load_model(out), load_model(example_model)
    x = torch.from_numpy(mnist.test.x[:200].copy())
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert s.shape == (200, 10) and not torch.equal(s, t)  # trained, not a copy
    assert np.mean(s.argmax(1).numpy() == mnist.test.y[:200]) > 0.85
    report = json.loads(out.with_suffix(".json").read_text())
    acc = report["accuracy"]
    assert set(acc["clean"]) == {"teacher", "student"} and report["num_test"] == 100
    assert acc["FGSM@0.3 white-box"]["teacher"] < acc["clean"]["teacher"]
    assert report["adversarials"].get("cached")  # the UDDN's own training adversarials


def test_distill_refuses_another_detectors_artifact(tmp_path, capsys, mnist, predict):
    from controller.detectors.margin import MarginDetector
    from controller.training import distill

    MarginDetector().fit(mnist.train.x[:50], mnist.train.y[:50], model=predict).save(
        tmp_path / "margin"
    )
    argv = ["--uddn", str(tmp_path / "margin"), "--out", str(tmp_path / "s.pt")]
    assert distill.main(argv) == 1
    assert "not uddn" in capsys.readouterr().err
