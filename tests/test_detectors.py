"""Detectors, their registry and artifacts, the fused pipeline, and the example model.

One example model is trained per session (cached in a tmp dir); FGSM images are made
from it with a few lines of autograd.
"""

import copy
import importlib.metadata
import json
import logging
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import controller.detectors as detectors
from controller.detectors import Batch, Detector, Scores, hashing, make_batch
from controller.detectors.base import conformal_rank
from controller.detectors.feature_squeezing import FeatureSqueezingDetector
from controller.detectors.fusion import Pipeline
from controller.detectors.margin import MarginDetector
from controller.detectors.phash_prototype import PhashPrototypeDetector, choose_prototypes
from controller.training import datasets
from controller.training import example_model as cnn

FGSM_EPS = 0.3
GROUP = detectors.ENTRY_POINT_GROUP


@pytest.fixture(scope="session")
def splits():
    return datasets.load("mnist5k").split()


@pytest.fixture(scope="session")
def model_path(example_model):
    return example_model  # trained once per cache (tests/conftest.py)


@pytest.fixture(scope="session")
def model_fn(model_path):
    net = cnn.load_model(model_path)

    def fn(x):
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    fn.net = net
    return fn


@pytest.fixture(scope="session")
def batches(splits, model_fn):
    """Clean calibration / test batches and FGSM (eps 0.3) versions of the test images."""
    x = torch.from_numpy(np.ascontiguousarray(splits.test.x)).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model_fn.net(x), torch.from_numpy(splits.test.y))
    loss.backward()
    adv = (x + FGSM_EPS * x.grad.sign()).clamp(0, 1).detach().numpy()
    test = make_batch(splits.test.x, model_fn)
    fgsm = make_batch(adv, model_fn)
    # successful attacks on correctly classified images: what a detector must catch
    success = (test.labels == splits.test.y) & (fgsm.labels != splits.test.y)
    return {
        "cal": make_batch(splits.calibration.x, model_fn),
        "test": test,
        "fgsm": fgsm,
        "success": success,
    }


@pytest.fixture(scope="session")
def fitted(splits, model_fn):
    fit = {"dataset": "mnist5k", "class_names": splits.train.class_names, "model": model_fn}
    return {
        "margin": MarginDetector().fit(splits.train.x, splits.train.y, **fit),
        "phash_prototype": PhashPrototypeDetector().fit(splits.train.x, splits.train.y, **fit),
    }


# -- the example model ------------------------------------------------------------------------


def test_example_model_accuracy_and_metadata(model_path, splits):
    meta = json.loads(model_path.with_name("model.json").read_text())
    assert meta["dataset"] == "mnist5k" and meta["input_shape"] == [1, 28, 28]
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["torch_version"] == torch.__version__
    assert meta["accuracy"] >= 0.95
    assert cnn.accuracy(cnn.load_model(model_path), splits.test) == meta["accuracy"]


def test_example_model_is_cached(model_path):
    before = model_path.stat().st_mtime_ns
    start = time.perf_counter()
    assert cnn.ensure_example_model(model_path.parent.parent) == model_path
    assert time.perf_counter() - start < 1.0 and model_path.stat().st_mtime_ns == before


def test_training_is_deterministic_and_torchscript_round_trips(tmp_path):
    small = datasets.load("digits").subset(np.arange(300))
    a = cnn.train_classifier(small, epochs=1, seed=5, progress=False)
    b = cnn.train_classifier(small, epochs=1, seed=5, progress=False)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    x = torch.from_numpy(small.x[:16].copy())
    cnn.save_torchscript(a, tmp_path / "m.pt", x[:1])
    loaded = cnn.load_model(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), a(x))


# -- registry ---------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """The detector registry as a copy a test may add ad-hoc detectors to (restored after)."""
    reg = dict(detectors._detectors())
    monkeypatch.setattr(detectors, "_registry", reg)
    return reg


@pytest.fixture
def entry_points(monkeypatch):
    """Replace the installed entry points: ``entry_points(*eps)`` makes the registry read
    these instead (afresh); returns the groups it was asked for."""
    seen = []

    def use(*eps):
        def fake_entry_points(*, group):
            seen.append(group)
            return list(eps)

        monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
        monkeypatch.setattr(detectors, "_registry", None)
        return seen

    return use


def _ep(name, value):
    return importlib.metadata.EntryPoint(name, value, GROUP)


def test_registry_lookup_and_unknown_name():
    assert detectors.get("margin") is MarginDetector
    assert detectors.get("phash_prototype") is PhashPrototypeDetector
    assert {"margin", "phash_prototype"} <= set(detectors.available())
    with pytest.raises(ValueError, match=r"unknown detector 'nope'.*margin.*phash_prototype"):
        detectors.get("nope")


class Impostor(MarginDetector):
    name = "margin"


class Nameless(Detector):
    def score(self, batch):
        raise NotImplementedError


def test_registry_refuses_a_taken_name_and_a_missing_one(entry_points, caplog):
    entry_points(
        _ep("margin", "controller.detectors.margin:MarginDetector"),
        _ep("margin", f"{__name__}:Impostor"),
        _ep("nameless", f"{__name__}:Nameless"),
    )
    with caplog.at_level(logging.ERROR, logger="openexample.controller"):
        assert detectors.get("margin") is MarginDetector
        assert detectors.available() == ["margin"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("Impostor" in m for m in logged) and any("Nameless" in m for m in logged)


def test_contract_is_declared_on_the_class():
    for flag in ("needs_model", "needs_activations", "can_purify"):
        assert getattr(Detector, flag) is False
        for name in detectors.available():
            assert isinstance(getattr(detectors.get(name), flag), bool)
    assert FeatureSqueezingDetector.needs_model and not MarginDetector.needs_model
    assert MarginDetector.can_purify and not FeatureSqueezingDetector.can_purify


class ConstantDetector(Detector):
    """A plugin as a third party would ship it (registered through an entry point only)."""

    name = "test_constant"

    def score(self, batch: Batch) -> Scores:
        return Scores(np.zeros(len(batch)), None)


def test_plugins_come_from_the_entry_point_group(entry_points, caplog):
    broken = _ep("broken", "no_such_module_xyz:Thing")
    seen = entry_points(broken, _ep("test_constant", f"{__name__}:ConstantDetector"))
    with caplog.at_level(logging.ERROR, logger="openexample.controller"):
        assert detectors.get("test_constant") is ConstantDetector  # the broken one is skipped
        assert "broken" not in detectors.available()
        with pytest.raises(ValueError, match="unknown detector 'broken'"):
            detectors.get("broken")
    assert seen == [GROUP]  # the group is read once
    assert sum("'broken'" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_an_ad_hoc_detector_through_the_registry_fixture(registry, tmp_path):
    registry["test_constant"] = ConstantDetector
    assert detectors.get("test_constant") is ConstantDetector
    ConstantDetector().save(tmp_path / "c")
    assert type(detectors.load_artifact(tmp_path / "c")) is ConstantDetector
    assert type(Detector.load(tmp_path / "c")) is ConstantDetector


# -- margin -----------------------------------------------------------------------------------


def test_margin_scores_and_runner_up_by_hand():
    logits = np.array([[4.0, 1.0, 0.0], [0.0, 0.1, 0.0], [2.0, 5.0, 3.0]], np.float32)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.sort(p, axis=1)[:, ::-1]
    s = MarginDetector().score(Batch(np.zeros((3, 1, 2, 2)), logits, np.array([0, 1, 1])))
    assert np.allclose(s.scores, -(top[:, 0] - top[:, 1]))
    assert s.corrected.tolist() == [1, 0, 2]
    # a claimed label that is not the arg-max: corrected is still "the best other class"
    s2 = MarginDetector().score(Batch(np.zeros((1, 1, 2, 2)), logits[2:], np.array([2])))
    assert s2.corrected.tolist() == [1]
    # a label that is not a class masks nothing: corrected is the arg-max
    s3 = MarginDetector().score(Batch(np.zeros((3, 1, 2, 2)), logits, np.array([-1, 9, 1])))
    assert s3.corrected.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(s3.scores, s.scores)


def test_margin_uses_the_reference_model_without_logits(splits, model_fn, batches):
    det = MarginDetector().fit(splits.train.x[:10], splits.train.y[:10], model=model_fn)
    bare = Batch(batches["test"].inputs[:20], None, batches["test"].labels[:20])
    with_logits = Batch(bare.inputs, batches["test"].logits[:20], bare.labels)
    assert np.allclose(det.score(bare).scores, det.score(with_logits).scores, atol=1e-6)
    with pytest.raises(ValueError, match="logits"):
        MarginDetector().score(bare)


# -- phash_prototype --------------------------------------------------------------------------


def test_choose_prototypes_is_deterministic_and_bounded(splits):
    h = hashing.pack(hashing.average_hash(splits.train.x[splits.train.y == 3]))
    a, b = choose_prototypes(h, 16), choose_prototypes(h, 16)
    assert np.array_equal(a, b) and 0 < len(a) <= 16 and len(np.unique(h[a])) == len(a)
    assert len(choose_prototypes(h, 0)) == len(np.unique(h))  # k <= 0: every distinct hash


def test_phash_prototype_hard_min_matches_brute_force(splits, batches):
    det = PhashPrototypeDetector(k=8, temperature=0).fit(splits.train.x, splits.train.y)
    assert np.bincount(det.proto_labels, minlength=10).max() <= 8
    batch = Batch(batches["fgsm"].inputs[:25], None, batches["fgsm"].labels[:25])
    got = det.score(batch)
    h = hashing.pack(hashing.average_hash(batch.inputs))
    for i in range(25):
        d = [int(hashing.hamming(h[i], p)) for p in det.prototypes]
        per_class = [
            min(dd for dd, c in zip(d, det.proto_labels, strict=True) if c == k) for k in range(10)
        ]
        claimed = per_class[batch.labels[i]]
        other = min(v for k, v in enumerate(per_class) if k != batch.labels[i])
        assert got.scores[i] == claimed - other
        assert per_class[got.corrected[i]] == min(per_class)


def test_phash_prototype_rejects_bad_options():
    with pytest.raises(ValueError):
        PhashPrototypeDetector(hash="md5")
    with pytest.raises(ValueError):
        PhashPrototypeDetector(temperature=0.01)
    with pytest.raises(RuntimeError):
        PhashPrototypeDetector().score(Batch(np.zeros((1, 1, 28, 28)), None, np.zeros(1, int)))


# -- behaviour on clean and adversarial inputs ------------------------------------------------


@pytest.mark.parametrize("name", ["margin", "phash_prototype"])
def test_fgsm_scores_higher_than_clean(name, fitted, batches):
    det = fitted[name]
    clean = det.score(batches["test"]).scores
    adv = det.score(batches["fgsm"]).scores[batches["success"]]
    assert batches["success"].mean() > 0.5  # the attack works, so the comparison means something
    assert adv.mean() > clean.mean()
    auc = roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv])
    assert auc > 0.75, f"{name}: ROC-AUC {auc:.3f} against FGSM {FGSM_EPS}"


@pytest.mark.parametrize("name", ["margin", "phash_prototype"])
@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_calibrated_fpr_holds_on_held_out_clean_data(name, fpr, fitted, batches):
    det = fitted[name]
    threshold = det.calibrate(batches["cal"], fpr)
    assert det.threshold == threshold and det.fpr == fpr
    cal = det.meta["calibration"]
    # split-conformal: k = ceil((n + 1)(1 - fpr)) of the n calibration scores stay under
    assert cal["method"] == "split-conformal/1" and cal["rank"] == conformal_rank(cal["n"], fpr)
    assert fpr - 2 / cal["n"] <= cal["measured_fpr"] <= fpr
    held_out = det.flag(det.score(batches["test"]).scores).mean()
    assert held_out <= 2 * fpr, f"{name}: {held_out:.3f} false positives at target {fpr}"


def test_flag_needs_calibration():
    with pytest.raises(RuntimeError, match="not calibrated"):
        MarginDetector().flag(np.zeros(3))
    with pytest.raises(ValueError):
        MarginDetector().calibrate(Batch(np.zeros((2, 1)), np.zeros((2, 2)), np.zeros(2, int)), 0)


# -- artifacts --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["margin", "phash_prototype"])
def test_save_load_round_trip_gives_identical_scores(name, fitted, batches, tmp_path):
    det = fitted[name]
    det.calibrate(batches["cal"], 0.02)
    det.save(tmp_path / name)
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    assert manifest["name"] == name and manifest["threshold"] == det.threshold
    assert manifest["fpr"] == 0.02 and manifest["dataset"] == "mnist5k"
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["input_shape"] == [1, 28, 28]
    assert {"numpy", "python"} <= set(manifest["versions"])
    assert manifest["calibration"]["n"] == len(batches["cal"])
    for loaded in (detectors.load_artifact(tmp_path / name), Detector.load(tmp_path / name)):
        assert type(loaded) is type(det) and loaded.threshold == det.threshold
        before, after = det.score(batches["fgsm"]), loaded.score(batches["fgsm"])
        assert np.array_equal(before.scores, after.scores)
        assert np.array_equal(before.corrected, after.corrected)
        assert loaded.config() == det.config()


def test_loading_into_the_wrong_class_fails(fitted, tmp_path):
    fitted["margin"].save(tmp_path / "m")
    with pytest.raises(ValueError, match="margin"):
        PhashPrototypeDetector.load(tmp_path / "m")


# -- fusion -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pipeline(fitted, batches):
    # copies: other tests recalibrate the shared detectors
    p = Pipeline([copy.deepcopy(fitted[n]) for n in ("margin", "phash_prototype")], fpr=0.05)
    p.calibrate(batches["cal"])
    return p


def test_pipeline_splits_the_fpr_budget(pipeline):
    assert pipeline.per_detector_fpr == pytest.approx(0.025)
    assert all(d.fpr == pytest.approx(0.025) for d in pipeline.detectors)


def test_pipeline_fused_fpr_on_held_out_clean_data(pipeline, batches):
    report = pipeline.calibration_report(batches["test"])
    assert report["n"] == len(batches["test"]) and report["target_fpr"] == 0.05
    assert report["fused_fpr"] <= 2 * 0.05
    per = [v["fpr"] for v in report["detectors"].values()]
    assert max(per) <= report["fused_fpr"] <= sum(per)  # an OR of the two


def test_pipeline_decisions(pipeline, batches):
    batch = batches["fgsm"]
    decisions = pipeline.decide(batch)
    assert len(decisions) == len(batch)
    flagged = np.array([d.flagged for d in decisions])
    assert flagged[batches["success"]].mean() > flagged[~batches["success"]].mean()
    for d, label in zip(decisions, batch.labels, strict=True):
        assert d.label == label and [e.detector for e in d.evidence] == pipeline.names
        assert d.flagged == any(e.flagged for e in d.evidence) == (d.score >= 0)
        for e, det in zip(d.evidence, pipeline.detectors, strict=True):
            assert e.threshold == det.threshold and e.flagged == (e.score >= e.threshold)
        # the first flagged detector's label that differs from the claim; else the
        # first that differs at all; none on an item nothing flagged
        differs = [e for e in d.evidence if e.corrected is not None and e.corrected != label]
        first = next((e.corrected for e in differs if e.flagged), None)
        first = first if first is not None else next((e.corrected for e in differs), None)
        assert d.corrected == (first if d.flagged else None)


def test_pipeline_evaluate_is_the_per_detector_arithmetic(pipeline, batches):
    # the vectorised fusion against the module doc's definition, one detector at a time
    batch = batches["fgsm"]
    fused = pipeline.evaluate(batch)
    corrected = np.full(len(batch), -1)
    for j, (d, s) in enumerate(zip(pipeline.detectors, fused.per_detector, strict=True)):
        np.testing.assert_array_equal(fused.scores[j], s.scores)
        np.testing.assert_array_equal(fused.flags[j], d.flag(s.scores))
        median = d.meta["calibration"]["median"]
        np.testing.assert_array_equal(
            fused.margins[j],
            (np.asarray(s.scores, np.float64) - d.threshold) / (d.threshold - median),
        )
    claimed = np.asarray(batch.labels)
    for i in range(len(batch)):
        if not fused.flags[:, i].any():
            continue  # nothing flagged it: no corrected label
        order = range(len(pipeline.detectors))
        fixes = [(j, fused.per_detector[j].corrected) for j in order]
        differs = [(j, int(c[i])) for j, c in fixes if c is not None and c[i] != claimed[i]]
        mine = [c for j, c in differs if fused.flags[j, i]]
        corrected[i] = (mine or [c for _, c in differs] or [-1])[0]
    np.testing.assert_array_equal(fused.corrected, corrected)
    assert (fused.corrected[fused.flagged] != claimed[fused.flagged]).all()
    np.testing.assert_array_equal(fused.flagged, fused.flags.any(axis=0))
    np.testing.assert_array_equal(fused.score, fused.margins.max(axis=0))
    assert fused.flagged.any() and not fused.flagged.all()


def test_pipeline_rejects_bad_configuration(fitted):
    with pytest.raises(ValueError):
        Pipeline([], fpr=0.01)
    with pytest.raises(ValueError):
        Pipeline([fitted["margin"]], fpr=1.5)


# -- speed (printed, not asserted) ------------------------------------------------------------


def test_report_score_latency(fitted, batches, capsys):
    lines = []
    for name, det in fitted.items():
        for n in (1, 64):
            b = Batch(
                batches["test"].inputs[:n], batches["test"].logits[:n], batches["test"].labels[:n]
            )
            det.score(b)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20):
                    det.score(b)
                best = min(best, (time.perf_counter() - t0) / 20)
            lines.append(f"{name:16s} batch {n:2d}: {best / n * 1e6:7.2f} us/sample")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_margin_small_batches_agree_with_the_numpy_path() -> None:
    """Up to margin.SMALL items the rows are scored in Python floats: same scores (to the
    last bits) and the same corrected labels as the vectorised path, ties included."""
    from controller.detectors import margin

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (300, 10)).astype(np.float32)
    logits[::7, 3] = logits[::7, 5]  # tied classes
    logits[::11] = 0.0  # all tied
    labels = rng.integers(-1, 11, 300)  # some not a class
    assert margin.SMALL >= 3  # the parts below take the small path
    det = MarginDetector()
    whole = det.score(Batch(np.zeros((300, 1)), logits, labels))  # > SMALL: numpy
    for i in range(0, 300, 3):
        part = det.score(Batch(np.zeros((3, 1)), logits[i : i + 3], labels[i : i + 3]))
        np.testing.assert_allclose(part.scores, whole.scores[i : i + 3], rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(part.corrected, whole.corrected[i : i + 3])
