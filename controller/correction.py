"""What an ADVERSARIAL verdict tells the agent to do: DROP, or CORRECT with a label.

A model's policy (config ``models.ID.on_adversarial``) is ``drop`` (the default: the
output is withheld) or ``correct``: the agent hands out the corrected label instead,
but only when it is trustworthy. Trust here is agreement: at least ``min_agree`` of the
set's purifying detectors (``Detector.can_purify``: DeSVig's closest class copy,
Defed's, MagNet's and ISMN's purified inputs, the margin's runner-up) give the
same label as the fused corrected label. One purifier alone is a guess on the inputs
it was fooled by; two different mechanisms agreeing is evidence. Below the agreement
the verdict stays DROP, so ``correct`` never releases more than ``drop`` would
without a corrected label behind it.

Plain code: lists in, actions out (controller/pipeline.py calls it per PKG_OUT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openexample.errors import ConfigError
from openexample.v1 import openexample_pb2 as pb

POLICIES = ("drop", "correct")
_DROP, _CORRECT = pb.VERDICT_ACTION_DROP, pb.VERDICT_ACTION_CORRECT


@dataclass(frozen=True)
class CorrectionPolicy:
    on_adversarial: str = "drop"
    min_agree: int = 2

    def check(self, where: str, purifiers: Sequence[str]) -> None:
        """ConfigError when this detector set cannot meet the policy (the values
        themselves are checked where the config is read, controller/config.py)."""
        if self.on_adversarial == "correct" and len(purifiers) < self.min_agree:
            have = ", ".join(purifiers) or "none"
            raise ConfigError(
                f"{where}.correct_min_agree: {self.min_agree} purifiers must agree, the set"
                f" has {len(purifiers)} ({have}); add a purifying detector or lower it"
            )

    def action(self, corrected: int, fixes: Sequence[int | None]) -> int:
        """The action for one flagged item: its fused corrected label (-1: none) and
        each detector's corrected label (None: the detector does not purify)."""
        if self.on_adversarial != "correct" or corrected < 0:
            return _DROP
        agree = sum(1 for f in fixes if f == corrected)
        return _CORRECT if agree >= self.min_agree else _DROP
