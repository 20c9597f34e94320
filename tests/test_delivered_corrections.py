"""The detection bench's delivered corrections (bench/detection.py
``delivered_corrections``): what ``on_adversarial: correct`` hands out, decided by the
controller's own ``CorrectionPolicy``: only flagged items whose fused corrected label at
least two purifiers give, and more than give the claimed label, and how many of those
labels are right."""

from __future__ import annotations

import numpy as np

from bench.detection import delivered_corrections
from controller.detectors.base import Scores
from controller.detectors.fusion import Fused


def _fused(flagged, corrected, *fixes) -> Fused:
    n = len(flagged)
    per = tuple(Scores(np.zeros(n), None if f is None else np.asarray(f)) for f in fixes)
    zeros = np.zeros((len(fixes), n))
    return Fused(
        np.asarray(flagged), np.zeros(n), np.asarray(corrected), per, zeros > 0, zeros, zeros
    )


def test_only_agreed_labels_are_delivered_and_scored_against_the_truth() -> None:
    # items: 0 agreed and right, 1 agreed and wrong, 2 one purifier only (dropped),
    # 3 no corrected label (dropped), 4 not flagged (not counted), 5 two agree but two
    # others side with the claim (dropped)
    ev = _fused(
        [True, True, True, True, False, True],
        [3, 5, 7, -1, 2, 6],
        [3, 5, 7, 1, 2, 6],  # robust
        [3, 5, 0, 1, 2, 6],  # desvig
        [0, 0, 0, 0, 0, 9],  # magnet
        [1, 1, 1, 1, 1, 9],  # margin
        None,  # a detector that does not purify
    )
    claimed = np.array([8, 8, 8, 8, 8, 9])
    got = delivered_corrections(ev, claimed, np.array([3, 4, 7, 1, 2, 6]))
    assert got == {"corrected_delivered": 0.4, "delivered_accuracy": 0.5}


def test_nothing_flagged_or_nothing_delivered_is_none_not_zero() -> None:
    ev = _fused([False, False], [1, 1], [1, 1], [1, 1])
    assert delivered_corrections(ev, np.array([0, 0]), np.array([1, 1])) == {
        "corrected_delivered": None,
        "delivered_accuracy": None,
    }
    ev = _fused([True], [4], [4], [0])  # one purifier gives it: dropped
    assert delivered_corrections(ev, np.array([0]), np.array([4])) == {
        "corrected_delivered": 0.0,
        "delivered_accuracy": None,
    }
