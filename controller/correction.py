"""What an ADVERSARIAL verdict tells the agent to do: DROP, or CORRECT with a label.

A model's policy (config ``models.ID.on_adversarial``) is ``drop`` (the default: the
output is withheld) or ``correct``: the agent hands out the corrected label instead,
but only when it is trustworthy. Trust here is agreement: at least ``min_agree`` of the
set's purifying detectors (``Detector.can_purify``: DeSVig's closest class copy,
Defed's, MagNet's and ISMN's purified inputs, the margin's runner-up) give the
same label as the fused corrected label. One purifier alone is a guess on the inputs
it was fooled by; two different mechanisms agreeing is evidence. A purifier whose label
is the claimed one is evidence the other way, so the corrected label must also have more
purifiers behind it than the claim has. That dissent rule is for confident attacks
(C&W kappa 20, mean L2 7-8): the perturbation really moves the digit, the robust model,
DeSVig and MagNet's reformer mostly side with the claim, and the label that two others
agreed on was wrong nine times in ten. With the rule, the share of flagged kappa-20
inputs given a wrong label fell from 21% to 7% (example CNN; 9% to 4.5% on a user's
MLP), and L-inf/DeepFool/C&W inputs lost 0-4 points of delivery (``openexample-bench
detection --detectors hardened``, README "Delivered under on_adversarial: correct").
Below either bar the verdict stays DROP, so ``correct`` never releases more than
``drop`` would without a corrected label behind it.

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

    def action(self, corrected: int, fixes: Sequence[int | None], claimed: int) -> int:
        """The action for one flagged item: its fused corrected label (-1: none), each
        detector's corrected label (None: the detector does not purify) and the label
        the model claimed."""
        if self.on_adversarial != "correct" or corrected < 0 or corrected == claimed:
            return _DROP
        agree = sum(1 for f in fixes if f == corrected)
        dissent = sum(1 for f in fixes if f == claimed)
        return _CORRECT if agree >= self.min_agree and agree > dissent else _DROP
