"""Per-detector shares of the fused FPR budget (controller/detectors/fusion.py,
``Pipeline(..., shares=)``; ``--fpr-shares`` of ``train`` and ``openexample-bench
detection``): validation, each detector calibrated at its own share (conformal rank), the
union bound on unseen clean scores, what the artifacts record, and one-line CLI refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.cli import main as bench_main
from controller.cli import main as controller_main
from controller.detectors.base import Batch, Detector, Scores, conformal_rank
from controller.detectors.fusion import Pipeline, check_shares
from controller.pipeline import _recorded_shares
from controller.training.train import (
    HARDENED_DETECTORS,
    HARDENED_SHARES,
    HARDENED_SHARES_RIGHT,
    artifacts_folder,
    calibrate_on_for,
    detector_set,
    parse_fpr_shares,
)


class Column(Detector):
    """Scores are one column of the inputs: several detectors on synthetic scores."""

    name = "column"

    def __init__(self, column: int, name: str) -> None:
        super().__init__()
        self.column = column
        self.name = name  # type: ignore[misc] - per instance, for distinct report keys

    def score(self, batch: Batch) -> Scores:
        return Scores(np.asarray(batch.inputs, np.float64)[:, self.column], None)


def _batch(scores: np.ndarray) -> Batch:
    return Batch(np.asarray(scores), None, np.zeros(len(scores), np.int64))


def _dets() -> list[Detector]:
    return [Column(0, "robust"), Column(1, "desvig"), Column(2, "margin")]


@pytest.mark.parametrize(
    ("shares", "expect"),
    [
        ((0.5, 0.5), r"2 given for 3 detectors \(robust, desvig, margin\)"),
        ((0.6, 0.0, 0.4), r"fpr share of detector 'desvig': must be positive, got 0\.0"),
        ((1.2, 0.2, -0.4), r"fpr share of detector 'margin': must be positive"),
        ((float("nan"), 0.5, 0.5), r"fpr share of detector 'robust': must be positive"),
        ((0.6, 0.2, "x"), r"fpr share of detector 'margin': not a number"),
        ((0.6, 0.3, 0.3), r"must sum to 1, got 1\.2 \(robust=0\.6, desvig=0\.3, margin=0\.3\)"),
    ],
)
def test_bad_shares_are_refused_naming_the_detector(shares, expect) -> None:
    with pytest.raises(ValueError, match=expect):
        Pipeline(_dets(), 0.01, shares)


def test_shares_within_the_tolerance_are_taken_and_the_default_is_even() -> None:
    assert Pipeline(_dets(), 0.01, (0.6, 0.2, 0.2 + 1e-12)).shares[2] == pytest.approx(0.2)
    even = Pipeline(_dets(), 0.03)
    assert even.shares == pytest.approx((1 / 3,) * 3)
    assert even.detector_fprs == pytest.approx({"robust": 0.01, "desvig": 0.01, "margin": 0.01})


def test_each_detector_is_calibrated_at_its_share() -> None:
    rng = np.random.default_rng(3)
    n, fpr, shares = 600, 0.05, (0.6, 0.2, 0.2)
    cal = rng.standard_normal((n, 3))
    pipe = Pipeline(_dets(), fpr, shares)
    thresholds = pipe.calibrate(_batch(cal))
    for j, (d, share) in enumerate(zip(pipe.detectors, shares, strict=True)):
        k = conformal_rank(n, fpr * share)
        ranked = np.sort(cal[:, j])
        assert d.fpr == pytest.approx(fpr * share)
        assert d.meta["calibration"]["rank"] == k
        assert d.meta["fpr_share"] == share  # saved in the manifest
        # just above the k-th smallest: n - k calibration scores flagged
        assert ranked[k - 1] < thresholds[d.name] <= np.nextafter(ranked[k - 1], np.inf) + 1e-9
        assert int((cal[:, j] >= d.threshold).sum()) == n - k
    assert pipe.detectors[0].threshold < pipe.detectors[1].threshold  # 3% below 1%
    report = pipe.calibration_report(_batch(cal))
    assert report["fpr_shares"] == {"robust": 0.6, "desvig": 0.2, "margin": 0.2}
    assert report["detectors"]["robust"]["target_fpr"] == pytest.approx(0.03)
    assert report["per_detector_target_fpr"] == pytest.approx(0.01)  # the smallest share
    assert _recorded_shares(pipe.detectors) == shares  # what serving reads back


def test_the_calibration_size_is_checked_against_the_smallest_share() -> None:
    # 1% split 0.8 / 0.2: 0.2% needs 499 items (0.5% each, even, would need 199)
    pipe = Pipeline(_dets()[:2], 0.01, (0.8, 0.2))
    with pytest.raises(ValueError, match=r"detector 'desvig': 300 clean .* at least 499"):
        pipe.calibrate(_batch(np.zeros((300, 2))))
    assert all(d.threshold is None for d in pipe.detectors)  # refused before any moved
    pipe.calibrate(_batch(np.random.default_rng(0).standard_normal((499, 2))))


def test_union_bound_holds_on_unseen_clean_scores_with_uneven_shares() -> None:
    """Many calibration sets, each pipeline judged on fresh scores of the same
    distribution: each detector's mean FPR is at most fpr x its share and the fused
    (OR) mean FPR at most fpr. Independent scores: the bound is nearly tight."""
    rng = np.random.default_rng(11)
    n, fpr, shares, trials = 300, 0.1, (0.6, 0.2, 0.2), 300
    fused, per = [], []
    for _ in range(trials):
        pipe = Pipeline(_dets(), fpr, shares)
        pipe.calibrate(_batch(rng.standard_normal((n, 3))))
        ev = pipe.evaluate(_batch(rng.standard_normal((1000, 3))))
        fused.append(ev.flagged.mean())
        per.append(ev.flags.mean(axis=1))
    se = np.std(fused) / np.sqrt(trials)
    assert np.mean(fused) <= fpr + 2 * se
    assert np.mean(fused) > 0.8 * fpr  # not wastefully conservative
    per_mean, per_se = np.mean(per, axis=0), np.std(per, axis=0) / np.sqrt(trials)
    assert (per_mean <= fpr * np.array(shares) + 2 * per_se).all()
    assert per_mean[0] > 2 * per_mean[1]  # the larger share flags more


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("robust=0.6,desvig=0.2", "no share for margin: name every detector once"),
        ("robust=0.6,desvig=0.2,margin=0.1,magnet=0.1", "'magnet' is not one of the detectors"),
        ("robust=0.6,robust=0.2,margin=0.2", "'robust' is named twice"),
        ("robust=0.6,desvig=a,margin=0.2", "desvig: share 'a' is not a number"),
        ("robust:0.6", "'robust:0.6' is not NAME=SHARE"),
        ("robust=6,desvig=2,margin=2", "fpr shares must sum to 1, got 10"),
        ("robust=0.6,desvig=-0.2,margin=0.6", "'desvig': must be positive"),
    ],
)
def test_parse_fpr_shares_refusals(spec, expect) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_fpr_shares(spec, ("robust", "desvig", "margin"))
    assert expect in str(info.value)


def test_parse_fpr_shares_follows_the_set_order() -> None:
    names = ("robust", "desvig", "margin")
    assert parse_fpr_shares("margin=0.2, desvig=0.2, robust=0.6", names) == (0.6, 0.2, 0.2)
    check_shares(names, parse_fpr_shares("robust=0.6,desvig=0.2,margin=0.2", names))


def test_uneven_shares_get_their_own_artifact_folder(tmp_path) -> None:
    names = ("robust", "desvig", "margin")
    even = artifacts_folder(names, cache=tmp_path)
    assert even.name == "robust+desvig+margin"
    assert artifacts_folder(names, cache=tmp_path, shares=(0.6, 0.2, 0.2)).name == (
        "robust+desvig+margin%0.6-0.2-0.2"
    )
    assert artifacts_folder(names, cache=tmp_path, shares=(1 / 3,) * 3) == even


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("robust=0.6,desvig=0.2,margin=0.3", "--fpr-shares: fpr shares must sum to 1, got 1.1"),
        ("robust=0.6,desvig=0.4", "--fpr-shares: no share for margin"),
    ],
)
def test_train_refuses_bad_shares_in_one_line(tmp_path, capsys, spec, expect) -> None:
    out_dir = tmp_path / "out"
    rc = controller_main(
        ["train", "robust,desvig,margin", "--fpr-shares", spec, "--out", str(out_dir)]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("openexample-controller train: ") and expect in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not Path(out_dir).exists()  # nothing was trained


def test_named_sets_bring_their_detectors_and_shares() -> None:
    assert detector_set(None) == (("desvig", "margin"), None)
    assert detector_set("default") == (("desvig", "margin"), None)
    assert detector_set("hardened", None, "all") == (HARDENED_DETECTORS, HARDENED_SHARES)
    check_shares(HARDENED_DETECTORS, HARDENED_SHARES)  # they sum to 1, each positive
    # under --calibrate-on right, its own split: one a model 90% right on mnist5k's
    # 1,000 calibration inputs can calibrate (the smallest share's conformal rank)
    right = detector_set("hardened", None, "right")
    assert right == (HARDENED_DETECTORS, HARDENED_SHARES_RIGHT)
    # ... which is hardened's own basis when none is given
    assert detector_set("hardened") == right
    check_shares(HARDENED_DETECTORS, HARDENED_SHARES_RIGHT)
    conformal_rank(900, 0.01 * min(HARDENED_SHARES_RIGHT))
    assert detector_set("default", None, "right") == (("desvig", "margin"), None)
    with pytest.raises(ValueError, match="calibrate_on must be one of all, right"):
        detector_set("hardened", None, "most")
    assert HARDENED_DETECTORS[0] == "robust"  # its label first for CORRECT
    # --fpr-shares given: it wins over the named set's own, in the set's order
    spec = "magnet=0.25,margin=0.25,desvig=0.25,robust=0.25"
    assert detector_set("hardened", spec) == (HARDENED_DETECTORS, (0.25,) * 4)
    assert detector_set(" desvig , margin ") == (("desvig", "margin"), None)
    with pytest.raises(ValueError, match="no share for magnet"):
        detector_set("hardened", "robust=0.5,desvig=0.2,margin=0.3")


def test_table_iv_defences_keep_each_named_sets_own_split() -> None:
    from bench.cli import build_parser
    from bench.detection import table_iv_defences

    parse = build_parser().parse_args
    got = table_iv_defences(parse(["detection", "--table-iv", "hardened; default;magnet"]))
    assert got == [
        (HARDENED_DETECTORS, HARDENED_SHARES),
        (("desvig", "margin"), None),
        (("magnet",), None),
    ]
    run = ["detection", "--detectors", "robust,margin", "--fpr-shares", "robust=0.7,margin=0.3"]
    assert table_iv_defences(parse(run)) == [(("robust", "margin"), (0.7, 0.3))]
    right = parse(["detection", "--table-iv", "hardened", "--calibrate-on", "right"])
    assert table_iv_defences(right) == [(HARDENED_DETECTORS, HARDENED_SHARES_RIGHT)]
    from bench.detection import _shares

    assert _shares(parse(["detection", "--detectors", "hardened", "--calibrate-on", "right"])) == (
        HARDENED_SHARES_RIGHT
    )
    # the run's basis: --calibrate-on, else the --detectors set's own (hardened: right)
    assert _shares(parse(["detection", "--detectors", "hardened"])) == HARDENED_SHARES_RIGHT
    assert _shares(parse(["detection", "--detectors", "hardened", "--calibrate-on", "all"])) == (
        HARDENED_SHARES
    )
    both = parse(["detection", "--detectors", "hardened", "--table-iv", "hardened;default"])
    assert table_iv_defences(both) == [(HARDENED_DETECTORS, HARDENED_SHARES_RIGHT), got[1]]


def test_each_set_has_its_calibration_basis_unless_one_is_given() -> None:
    from bench.cli import build_parser
    from bench.detection import _calibrate_on
    from controller.cli import build_parser as controller_parser

    assert calibrate_on_for("hardened") == calibrate_on_for(" hardened ") == "right"
    for spec in (None, "default", "desvig,margin", "robust,desvig,margin,magnet"):
        assert calibrate_on_for(spec) == "all", spec
    assert calibrate_on_for("hardened", "all") == "all"
    assert calibrate_on_for("default", "right") == "right"
    with pytest.raises(ValueError, match="calibrate_on must be one of all, right"):
        calibrate_on_for("hardened", "most")
    parse = build_parser().parse_args
    assert _calibrate_on(parse(["detection", "--detectors", "hardened"])) == "right"
    assert _calibrate_on(parse(["detection"])) == "all"
    args = controller_parser().parse_args(["train", "hardened", "--out", "x"])
    assert args.calibrate_on is None  # resolved by the set (train_command)


def test_train_and_bench_refuse_a_named_set_with_shares_that_do_not_fit(tmp_path, capsys) -> None:
    out_dir = tmp_path / "out"
    rc = controller_main(["train", "hardened", "--fpr-shares", "robust=1", "--out", str(out_dir)])
    _, err = capsys.readouterr()
    assert rc == 2 and "--fpr-shares: no share for desvig" in err, err
    assert not out_dir.exists()
    rc = bench_main(["detection", "--detectors", "hardened", "--fpr-shares", "robust=1"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--fpr-shares: no share for desvig" in err, err
    for spec, expect in (
        ("desvig,nonesuch", "unknown detector 'nonesuch'"),
        ("hardened,margin", "'hardened' is a named set: give it alone"),
    ):
        rc = bench_main(["detection", "--detectors", spec])
        _, err = capsys.readouterr()
        assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
        rc = controller_main(["train", spec, "--out", str(out_dir)])
        _, err = capsys.readouterr()
        assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


@pytest.mark.parametrize("adaptive", [[], ["--adaptive"]])
def test_bench_detection_refuses_bad_shares_in_one_line(capsys, adaptive) -> None:
    rc = bench_main(
        ["detection", *adaptive, "--detectors", "desvig,margin", "--fpr-shares", "desvig=1"]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("openexample-bench detection: --fpr-shares: no share for margin"), err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(("fpr", "warned"), [(0.01, False), (0.02, True)])
def test_serving_takes_the_recorded_split_and_warns_only_on_another_target(
    tmp_path, caplog, fpr, warned
) -> None:
    """Artifacts of a set trained with shares 0.75 / 0.25: the controller serves their
    thresholds as saved (no recalibration), its pipeline knows the split, and the
    mismatch warning fires only when the configured fused target is another one."""
    from controller import config, detectors
    from controller.pipeline import load_scorers

    rng = np.random.default_rng(5)
    x = rng.random((400, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 400)
    logits = rng.standard_normal((400, 3)).astype(np.float32)
    dets = [detectors.get(n)().fit(x[:60], y[:60]) for n in ("margin", "phash_prototype")]
    Pipeline(dets, 0.01, (0.75, 0.25)).calibrate(Batch(x, logits, logits.argmax(1)))
    for d in dets:
        d.save(tmp_path / d.name)
    cfg = {"detectors": [str(tmp_path / d.name) for d in dets], "fpr": fpr}
    with caplog.at_level("WARNING"):
        scorer = load_scorers(config.from_mapping({"models": {"m": cfg}}))["m"]
    assert scorer.pipeline.shares == (0.75, 0.25)
    assert [d.threshold for d in scorer.pipeline.detectors] == [d.threshold for d in dets]
    assert ("calibrated at fpr" in caplog.text) is warned, caplog.text


def test_a_score_with_an_atom_at_its_median_keeps_fused_margins_finite() -> None:
    """The robust model scores 0 wherever it agrees: at a loose FPR its threshold lands
    one float above 0, the median, and a spread of 5e-324 made every flagged margin inf
    (numpy's overflow warning in the 5% pipeline of the detection bench)."""
    rng = np.random.default_rng(5)
    clean = np.c_[
        np.where(rng.random(1000) < 0.97, 0.0, rng.exponential(2.0, 1000)),  # an atom at 0
        rng.normal(size=1000),
        rng.normal(size=1000),
    ]
    pipe = Pipeline(_dets(), 0.15)
    pipe.calibrate(_batch(clean))
    assert 0.0 < pipe.detectors[0].threshold < 1e-300  # the degenerate case itself
    probe = np.array([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0], [0.0, 9.0, 0.0]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        fused = pipe.evaluate(_batch(probe))
    assert np.isfinite(fused.score).all(), fused.score
    assert list(fused.flagged) == [False, True, True]
    assert fused.score[1] > 0 > fused.score[0]  # still above and below the line
