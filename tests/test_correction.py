"""The CORRECT action: a model's policy turns an ADVERSARIAL verdict's DROP into CORRECT
only when enough purifying detectors agree on the corrected label; agents then hand
out that label."""

from __future__ import annotations

import numpy as np
import pytest

from controller import config
from controller.correction import CorrectionPolicy
from controller.detectors.base import Batch, Detector, Scores
from controller.detectors.fusion import Pipeline
from controller.pipeline import load_scorers
from controller.reference_model import model_fn
from openexample.errors import ConfigError
from openexample.v1 import openexample_pb2 as pb
from tests.conftest import MODEL_ID

DROP, CORRECT = pb.VERDICT_ACTION_DROP, pb.VERDICT_ACTION_CORRECT


@pytest.mark.parametrize(
    ("policy", "corrected", "fixes", "want"),
    [
        (CorrectionPolicy("drop"), 3, [3, 3], DROP),  # the default never corrects
        (CorrectionPolicy("correct", 2), 3, [3, 3], CORRECT),
        (CorrectionPolicy("correct", 2), 3, [3, 5], DROP),  # one purifier is not enough
        (CorrectionPolicy("correct", 2), 3, [3, None, 3], CORRECT),  # None: not a purifier
        (CorrectionPolicy("correct", 1), 3, [3, 5], CORRECT),
        (CorrectionPolicy("correct", 1), -1, [None], DROP),  # no corrected label at all
        (CorrectionPolicy("correct", 3), 3, [3, 3], DROP),
        # the claim (9) has backers too: the correction needs more than it has
        (CorrectionPolicy("correct", 2), 3, [3, 3, 9], CORRECT),
        (CorrectionPolicy("correct", 2), 3, [3, 3, 9, 9], DROP),
        (CorrectionPolicy("correct", 1), 3, [3, 9], DROP),
        (CorrectionPolicy("correct", 2), 3, [3, 3, 3, 9, 9], CORRECT),
        (CorrectionPolicy("correct", 1), 9, [9, 9], DROP),  # "correcting" to the claim
    ],
)
def test_the_policy_corrects_only_on_agreement(policy, corrected, fixes, want):
    assert policy.action(corrected, fixes, 9) == want


def test_a_policy_the_set_cannot_meet_is_refused_naming_the_set():
    CorrectionPolicy("correct", 2).check("models.m", ["desvig", "margin"])
    with pytest.raises(ConfigError, match=r"2 purifiers must agree, the set has 1 \(desvig\)"):
        CorrectionPolicy("correct", 2).check("models.m", ["desvig"])
    CorrectionPolicy("drop", 2).check("models.m", [])  # drop needs no purifier


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"on_adversarial": "fix"}, "models.m.on_adversarial: one of drop, correct, got 'fix'"),
        ({"correct_min_agree": 0}, "models.m.correct_min_agree: must be >= 1, got 0"),
        ({"correct_min_agree": "2"}, "models.m.correct_min_agree: expected int"),
    ],
)
def test_bad_policy_config_is_refused_by_name(raw, message):
    with pytest.raises(ConfigError) as e:
        config.from_mapping({"models": {"m": {"detectors": [], **raw}}})
    assert str(e.value).startswith(message)


def test_fused_scorer_corrects_flagged_items_when_its_purifiers_agree(
    artifacts, example_model, fgsm
):
    """The default set (DeSVig + margin, both purifiers) under ``correct``: every flagged
    FGSM item is CORRECT exactly when the two detectors' corrected labels (its evidence)
    agree with the fused one and outnumber those that give the claim, DROP otherwise;
    clean verdicts stay RELEASE."""
    model_cfg = {"detectors": [str(p) for p in artifacts], "on_adversarial": "correct"}
    scorer = load_scorers(config.from_mapping({"models": {MODEL_ID: model_cfg}}))[MODEL_ID]
    model = model_fn(example_model)
    clean, adv = fgsm
    x = np.concatenate([clean[:40], adv[:40]])
    logits = model(x)
    items = scorer.score(x, logits, logits.argmax(1))
    seen = set()
    for item, claimed in zip(items, logits.argmax(1).tolist(), strict=True):
        if item.verdict == pb.VERDICT_BENIGN:
            assert item.action == pb.VERDICT_ACTION_RELEASE
            continue
        fixes = [e.corrected_label for e in item.evidence]
        agree = item.HasField("corrected_label") and fixes.count(item.corrected_label) >= 2
        agree = agree and fixes.count(item.corrected_label) > fixes.count(claimed)
        assert item.action == (CORRECT if agree else DROP)
        seen.add(item.action)
    assert seen == {CORRECT, DROP}  # both happen on FGSM eps 0.3 (measured: ~1/3 agree)


@pytest.mark.integration
def test_agents_hand_out_the_corrected_label(controller, artifacts, example_model, fgsm):
    from agents import attach

    models = {MODEL_ID: {"detectors": [str(p) for p in artifacts], "on_adversarial": "correct"}}
    proc = controller(models=models)
    g = attach(
        str(example_model),
        controller=proc.address,
        model_id=MODEL_ID,
        input_shape=(1, 28, 28),
        connect_timeout_s=20,
        **proc.agent_tls("line-1"),
    )
    try:
        assert g.connected
        clean, adv = fgsm
        results = [g(a) for a in adv[:40]]
        corrected = [r for r in results if r.verdict == "adversarial" and r.released]
        dropped = [r for r in results if r.verdict == "adversarial" and not r.released]
        assert corrected and dropped
        for r in corrected:  # released with the corrected label, not the model's
            assert r.label != r.model_label and r.decided_by == "controller"
        assert g(clean[0]).label == g(clean[0]).model_label
    finally:
        g.close()


class _Column(Detector):
    """Scores are one column of the inputs; corrected labels the claim, as DeSVig's are
    below its own threshold; ``relabel`` gives ``fill`` (None: not at all)."""

    can_purify = True

    def __init__(self, name: str, column: int, fill: int | None) -> None:
        super().__init__()
        self.name, self.column, self.fill = name, column, fill  # type: ignore[misc]
        self.asked: list[int] = []

    def score(self, batch: Batch) -> Scores:
        s = np.asarray(batch.inputs, np.float64)[:, self.column]
        return Scores(s, np.asarray(batch.labels, np.int64).copy())

    def relabel(self, batch: Batch) -> np.ndarray | None:
        self.asked.append(len(batch))
        return None if self.fill is None else np.full(len(batch), self.fill, np.int64)


def test_purifiers_label_what_another_detector_flagged_and_only_that() -> None:
    """Item 0 flagged by a only, 1 by b only, 2 by both, 3 by neither: each detector is
    asked to relabel just the flagged items it did not flag itself, and its own labels
    stand elsewhere; a detector without labels to give (None) keeps its own."""
    a, b, c = _Column("a", 0, 7), _Column("b", 1, 8), _Column("c", 2, None)
    for d in (a, b, c):
        d.threshold, d.fpr = 0.5, 0.01
    x = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], np.float64)
    claimed = np.array([1, 2, 3, 4])
    fused = Pipeline([a, b, c], 0.03).evaluate(Batch(x, None, claimed))
    assert fused.flagged.tolist() == [True, True, True, False]
    got = [s.corrected.tolist() for s in fused.per_detector]
    assert got == [[1, 7, 3, 4], [8, 2, 3, 4], [1, 2, 3, 4]]
    assert (a.asked, b.asked, c.asked) == ([1], [1], [3])
    # the fused label: the first flagged detector's that differs, else the first at all
    assert fused.corrected.tolist() == [8, 7, -1, -1]


def test_desvig_gives_its_closest_copy_label_for_what_margin_flagged(artifacts, fgsm):
    """The default set, DeSVig's threshold moved out of reach and margin's to the first
    half's scores: where margin flags, DeSVig's label in the evidence is its closest
    class copy's (``class_distances``), not the claim; elsewhere it stays the claim."""
    dets = [Detector.load(p) for p in artifacts]
    j = [d.name for d in dets].index("desvig")
    desvig, margin = dets[j], dets[1 - j]
    _, adv = fgsm
    x = adv[:20]
    logits = model_fn(str(desvig.meta["model"]))(x)
    batch = Batch(x, logits, logits.argmax(1))
    desvig.threshold = 1e12  # finite: an inf one makes the fused margin inf / inf
    margin.threshold = float(np.median(margin.score(batch).scores))
    fused = Pipeline(dets, 0.01).evaluate(batch)
    assert fused.flagged.any() and not fused.flagged.all() and not fused.flags[j].any()
    want = desvig.class_distances(x[fused.flagged]).argmin(axis=1)
    labels = fused.per_detector[j].corrected
    assert labels[fused.flagged].tolist() == want.tolist()
    assert (labels[~fused.flagged] == batch.labels[~fused.flagged]).all()
    assert (want != batch.labels[fused.flagged]).any()  # it does correct something
