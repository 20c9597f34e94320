"""What a decision produces (Result) and what waits for one (Ticket, PKG_IN items).

Plain data with ``__slots__``: one of each is made per inference on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.privacy import PrivacyNoise
from openexample import tensor
from openexample.v1 import openexample_pb2 as pb

STANDALONE, SECURE = pb.FAIL_MODE_STANDALONE, pb.FAIL_MODE_SECURE
_RELEASE, _DROP, _CORRECT = (
    pb.VERDICT_ACTION_RELEASE,
    pb.VERDICT_ACTION_DROP,
    pb.VERDICT_ACTION_CORRECT,
)

# Who decided (Result.decided_by).
RULE, RT, CONTROLLER, TIMEOUT, DISCONNECTED = "rule", "rt", "controller", "timeout", "disconnected"
# Result.verdict.
BENIGN, ADVERSARIAL, UNKNOWN = "benign", "adversarial", "unknown"
VERDICT_NAMES = {pb.VERDICT_BENIGN: BENIGN, pb.VERDICT_ADVERSARIAL: ADVERSARIAL}


@dataclass(frozen=True)
class ModelInfo:
    """What FEATURES_REPLY declares about one model, plus its privacy noise."""

    model_id: str
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    input_dtype: Any = np.float32  # anything np.dtype() takes
    framework: str = "callable"
    model_digest: str = ""
    privacy: PrivacyNoise | None = None

    def descriptor(self) -> pb.ModelDescriptor:
        return pb.ModelDescriptor(
            model_id=self.model_id,
            input_shape=list(self.input_shape),
            input_dtype=tensor.dtype_code(self.input_dtype),
            class_names=list(self.class_names),
            privacy=self.privacy.to_pb() if self.privacy else None,
            model_digest=self.model_digest,
            framework=self.framework,
        )


class Result:
    """What the caller gets for one inference.

    ``output`` is the logits row or None when withheld; ``label`` is the label handed
    out (the corrected one on CORRECT); ``model_label`` what the model said.
    ``retraction`` marks a late verdict that overrides an earlier timeout decision.
    """

    __slots__ = (
        "confidence",
        "decided_by",
        "label",
        "latency_s",
        "model_id",
        "model_label",
        "output",
        "reason",
        "released",
        "retraction",
        "score",
        "source_id",
        "verdict",
    )

    def __init__(
        self,
        model_id: str,
        source_id: str,
        output: np.ndarray | None,
        label: int,
        model_label: int,
        confidence: float,
        verdict: str,
        decided_by: str,
        released: bool,
        latency_s: float,
        score: float | None = None,
        retraction: bool = False,
        reason: str = "",
    ) -> None:
        self.model_id = model_id
        self.source_id = source_id
        self.output = output
        self.label = label
        self.model_label = model_label
        self.confidence = confidence
        self.verdict = verdict
        self.decided_by = decided_by
        self.released = released
        self.latency_s = latency_s
        self.score = score
        self.retraction = retraction
        # Why the verdict is "unknown" when the controller said so ("overloaded", ...).
        self.reason = reason

    def __repr__(self) -> str:
        extra = ", retraction" if self.retraction else ""
        return (
            f"Result(label={self.label}, verdict={self.verdict!r}, decided_by="
            f"{self.decided_by!r}, released={self.released}, "
            f"latency_us={self.latency_s * 1e6:.1f}{extra})"
        )


class Ticket:
    """An inference waiting for the controller. ``wake`` (set by the shell under the
    lock) is called once when ``result`` is first set."""

    __slots__ = (
        "confidence",
        "deadline",
        "fail_mode",
        "label",
        "logits",
        "model_id",
        "result",
        "source_id",
        "started",
        "waiter",
        "wake",
    )

    def __init__(
        self,
        model_id: str,
        source_id: str,
        logits: np.ndarray,
        label: int,
        confidence: float,
        fail_mode: int,
        started: float,
        deadline: float,
    ) -> None:
        self.model_id = model_id
        self.source_id = source_id
        self.logits = logits
        self.label = label
        self.confidence = confidence
        self.fail_mode = fail_mode
        self.started = started
        self.deadline = deadline
        self.result: Result | None = None
        self.wake: Callable[[], object] | None = None
        self.waiter: object = None  # the shell's lock or future behind ``wake``


class Item:
    """One PKG_IN item and the tickets (FT waiters) its verdict answers."""

    __slots__ = (
        "budget_us",
        "confidence",
        "cookie",
        "fp",
        "label",
        "logits",
        "reason",
        "source_id",
        "started",
        "tickets",
        "x",
    )

    def __init__(
        self,
        x: np.ndarray,
        logits: np.ndarray,
        label: int,
        confidence: float,
        source_id: str,
        reason: int,
        cookie: int,
        fp: bytes,
        budget_us: int,
        started: float,
    ) -> None:
        self.x = x
        self.logits = logits
        self.label = label
        self.confidence = confidence
        self.source_id = source_id
        self.reason = reason
        self.cookie = cookie
        self.fp = fp
        self.budget_us = budget_us
        self.started = started  # the core's clock; PKG_IN carries it as wall time
        self.tickets: list[Ticket] = []


class Batch:
    __slots__ = ("items", "model_id", "sent_at", "xid")

    def __init__(self, xid: int, model_id: str) -> None:
        self.xid = xid
        self.model_id = model_id
        self.items: list[Item] = []
        self.sent_at = 0.0


def outcome(
    verdict: int, action: int, corrected: int | None, fail_mode: int, label: int
) -> tuple[str, bool, int]:
    """(verdict name, released, label handed out) for a controller or RT verdict."""
    name = VERDICT_NAMES.get(verdict)
    if name is None:  # UNKNOWN (or garbage): the rule's fail mode decides
        return UNKNOWN, fail_mode == STANDALONE, label
    if action == _CORRECT and corrected is not None:
        return name, True, corrected
    if action == _RELEASE:
        return name, True, label
    if action == _DROP:
        return name, False, label
    return name, verdict == pb.VERDICT_BENIGN, label  # no usable action: go by the verdict
