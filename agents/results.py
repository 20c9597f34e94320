"""What a decision produces (Result) and what waits for one (Ticket, PKG_IN items).

Plain data with ``__slots__``: one of each is made per inference on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

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
    # Layer activations this agent can send (AgentConfig.activations): their names and
    # shapes (one item's), declared in FEATURES with their dtype on the wire, and the
    # function that computes them for the items sent (inputs [N, ...] -> {name: [N, ...]}).
    activation_names: tuple[str, ...] = ()
    activations: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None
    activations_dtype: Any = np.float16
    activation_shapes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.privacy is not None:  # its default clip and centre, for this input shape
            object.__setattr__(self, "privacy", self.privacy.resolved(self.input_shape))

    def declared_activations(self) -> dict[str, tuple[int, ...]]:
        """{name: one item's shape} of the activations declared (those with a shape)."""
        return dict(zip(self.activation_names, self.activation_shapes, strict=False))

    def descriptor(self) -> pb.ModelDescriptor:
        return pb.ModelDescriptor(
            model_id=self.model_id,
            input_shape=list(self.input_shape),
            input_dtype=tensor.dtype_code(self.input_dtype),
            class_names=list(self.class_names),
            privacy=self.privacy.to_pb() if self.privacy else None,
            model_digest=self.model_digest,
            framework=self.framework,
            activation_names=list(self.activation_names),  # deprecated, for older controllers
            activations=[
                pb.ActivationDescriptor(
                    name=n, shape=list(shape), dtype=tensor.dtype_code(self.activations_dtype)
                )
                for n, shape in self.declared_activations().items()
            ],
        )


class ControllerTimings(NamedTuple):
    """A PKG_OUT's ``Timings`` (the controller's stages, microseconds), decoded once per
    PKG_OUT and shared by the results it answers."""

    queue_us: int
    score_us: int
    reply_us: int
    controller_us: int
    batch_items: int
    detectors: tuple[tuple[str, int], ...]

    @classmethod
    def from_pb(cls, t: pb.Timings) -> ControllerTimings:
        return cls(
            t.queue_us,
            t.score_us,
            t.reply_us,
            t.controller_us,
            t.batch_items,
            tuple((d.detector, d.us) for d in t.detectors),
        )


_NO_TIMINGS = ControllerTimings(0, 0, 0, 0, 0, ())


class Stages:
    """Where the latency of one controller-decided inference went, in microseconds.

    In the order the inference meets them:

    - ``before_send``: decided to inspect -> its PKG_IN taken for sending
      (``Ticket.started`` -> ``Batch.sent_at``): the handoff to the I/O thread (none on
      the native channel without TLS: the caller sends) and ``batch_window_us``.
    - ``wire``: the round trip (``sent_at`` -> PKG_OUT arrival) minus the controller's
      own ``controller_us``. Out and back are one figure: telling them apart needs
      synchronized clocks. It holds PKG_IN building and serializing, both transports,
      decoding on both sides, and PKG_OUT serializing and writing.
    - ``controller_queue``: PKG_IN received -> its batch's scoring started.
    - ``detectors``: the scoring call (every detector, fusion, PKG_OUT items);
      ``per_detector`` splits out each detector's share.
    - ``controller_reply``: scoring done -> PKG_OUT built and handed on
      (``controller_us - queue_us - score_us``).
    - ``after``: PKG_OUT arrival -> the caller has its Result (waking the waiter);
      None until the guard hands the result over (:meth:`finish`).

    They add up exactly to ``total``, which is ``Result.latency_s`` in whole
    microseconds: every boundary is rounded from the inference's start, not every
    span. From a controller that sends no ``Timings`` (an older one, or an answer given
    at once such as UNKNOWN/OVERLOADED) the controller stages are 0 and ``wire`` is the
    whole round trip. An inference that joined an input already sent (FT) has no
    stages: it waited for part of the trip only.
    """

    __slots__ = ("_arrived", "_ctl", "_done", "_sent", "_started")

    def __init__(
        self, started: float, sent_at: float, arrived: float, ctl: ControllerTimings | None
    ) -> None:
        self._started = started
        self._sent = sent_at
        self._arrived = arrived
        self._ctl = ctl
        self._done: float | None = None

    def finish(self, now: float) -> None:
        """The caller has the Result at ``now`` (the guard's clock = the core's)."""
        self._done = now

    def _at(self, t: float) -> int:
        return round((t - self._started) * 1e6)

    @property
    def timings(self) -> ControllerTimings:
        return self._ctl or _NO_TIMINGS

    @property
    def before_send(self) -> int:
        return self._at(self._sent)

    @property
    def round_trip(self) -> int:
        """PKG_IN taken for sending -> PKG_OUT arrival (wire + controller)."""
        return self._at(self._arrived) - self._at(self._sent)

    @property
    def wire(self) -> int:
        return self.round_trip - self.timings.controller_us

    @property
    def controller(self) -> int:
        return self.timings.controller_us

    @property
    def controller_queue(self) -> int:
        return self.timings.queue_us

    @property
    def detectors(self) -> int:
        return self.timings.score_us

    @property
    def controller_reply(self) -> int:
        t = self.timings
        return t.controller_us - t.queue_us - t.score_us

    @property
    def per_detector(self) -> dict[str, int]:
        return dict(self.timings.detectors)

    @property
    def batch_items(self) -> int:
        """Items the controller scored together with this one (0: not reported)."""
        return self.timings.batch_items

    @property
    def after(self) -> int | None:
        return None if self._done is None else self._at(self._done) - self._at(self._arrived)

    @property
    def total(self) -> int | None:
        """Decided -> the caller has the Result; None before :meth:`finish`."""
        return None if self._done is None else self._at(self._done)

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in STAGE_NAMES}

    def __repr__(self) -> str:
        return "Stages(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


# Stages fields, in order; the first six add up to ``total``.
STAGE_NAMES = (
    "before_send",
    "wire",
    "controller_queue",
    "detectors",
    "controller_reply",
    "after",
    "total",
    "batch_items",
)


class Result:
    """What the caller gets for one inference.

    ``output`` is the logits row or None when withheld; ``label`` is the label handed
    out (the corrected one on CORRECT); ``model_label`` what the model said.
    ``retraction`` marks a late verdict that overrides an earlier timeout decision.
    ``stages`` (:class:`Stages`) says where the latency went when the controller
    decided; None otherwise.
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
        "stages",
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
        stages: Stages | None = None,
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
        self.stages = stages

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
