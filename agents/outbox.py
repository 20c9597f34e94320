"""PKG_IN batches on their way: queued ones filling up, sent ones awaiting PKG_OUT.

Part of the agent's sans-I/O core (no clock, no threads): the core adds items under the
shell's lock, the shell's I/O thread takes the queued batches and builds their PKG_IN
outside it (:func:`build_pkg_in` touches only the batch and the noise RNG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from agents.results import Batch, Item, ModelInfo
from openexample import tensor
from openexample.limits import Limits
from openexample.v1 import openexample_pb2 as pb


class Outbox:
    def __init__(self, max_batch_items: int) -> None:
        self.max_batch_items = max_batch_items
        self._queued: list[Batch] = []
        self._open: dict[str, Batch] = {}  # model id -> the batch still taking items
        self._sent: dict[int, Batch] = {}  # xid -> batch awaiting PKG_OUT, oldest first
        self._scheduled = False  # a flush is due (the shell was told)

    def batch_for(self, model_id: str, new_xid: Callable[[], int]) -> Batch:
        """The model's open batch, or a new one when there is none or it is full."""
        batch = self._open.get(model_id)
        if batch is None or len(batch.items) >= self.max_batch_items:
            batch = self._open[model_id] = Batch(new_xid(), model_id)
            self._queued.append(batch)
        return batch

    def add(self, batch: Batch, item: Item) -> bool:
        """Queue ``item``; True when the shell must schedule a flush (first since one)."""
        batch.items.append(item)
        if self._scheduled:
            return False
        self._scheduled = True
        return True

    def take(self, now: float) -> list[Batch]:
        """The queued batches, now marked sent at ``now``."""
        self._scheduled = False
        batches = [b for b in self._queued if b.items]
        self._queued = []
        self._open.clear()
        for b in batches:
            b.sent_at = now
            self._sent[b.xid] = b
        return batches

    def answered(self, xid: int) -> Batch | None:
        """The sent batch that PKG_OUT (or an ERROR) with ``xid`` answers, if any."""
        return self._sent.pop(xid, None)

    def expire(self, now: float, late_window_s: float) -> list[Batch]:
        """Sent batches unanswered for ``late_window_s``: no answer will count any more."""
        late: list[Batch] = []
        while self._sent:  # oldest first
            xid, batch = next(iter(self._sent.items()))
            if now - batch.sent_at < late_window_s:
                break
            del self._sent[xid]
            late.append(batch)
        return late

    def next_expiry(self, late_window_s: float) -> float | None:
        for batch in self._sent.values():
            return batch.sent_at + late_window_s
        return None

    def clear(self) -> list[Batch]:
        """Every batch, sent or not (the stream is gone: their xids die with it)."""
        waiting = [*self._sent.values(), *self._queued]
        self._sent.clear()
        self._queued = []
        self._open.clear()
        self._scheduled = False
        return waiting


def items_that_fit(info: ModelInfo, activations: Sequence[str], limits: Limits) -> int:
    """The most items (at least 1) one PKG_IN of ``info``'s model can carry with these
    activations within the session's limits: each tensor's elements, and the message's
    bytes (an eighth kept for the items' other fields)."""
    shapes = info.declared_activations()
    sizes = [math.prod(shapes[n]) for n in activations]
    elements = max([math.prod(info.input_shape), *sizes])
    item_bytes = (
        np.dtype(info.input_dtype).itemsize * math.prod(info.input_shape)
        + np.dtype(info.activations_dtype).itemsize * sum(sizes)
        + 4 * len(info.class_names)
    )
    by_bytes = limits.max_message_bytes * 7 // 8 // max(1, item_bytes)
    return max(1, min(limits.max_tensor_elements // max(1, elements), by_bytes))


def _saturated(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` in ``dtype`` without inf or NaN: past its range saturated, NaN as 0. Sent as
    they are, one caller's inf or NaN would make the controller refuse the whole PKG_IN
    (NOT_FINITE), every other caller's item in the batch with it."""
    big = float(np.finfo(dtype).max)
    a = np.clip(np.nan_to_num(a, nan=0.0, posinf=big, neginf=-big), -big, big)
    return np.ascontiguousarray(a, dtype=dtype)


def build_pkg_in(
    batch: Batch,
    info: ModelInfo,
    rng: np.random.Generator,
    *,
    version: int,
    wall_offset_s: float,
    activations: Sequence[str] = (),
) -> pb.Envelope:
    """The PKG_IN of a taken batch: privacy noise, one inputs and one logits tensor, and
    per item what the controller needs. ``inferred_at_ns`` is wall time (the core's
    clock + ``wall_offset_s``).

    With privacy noise (openexample/privacy.py) the inputs are noised, the logits sent
    as its ``logits`` mode says (raw, none, or noised; the confidence then 0 or the
    noised logits'), and no fingerprint goes up: it would identify the raw input, and
    the controller could not check it against the noised one (it stays in FT/RT here).

    ``activations``: the names the controller asked for (FEATURES_REQUEST) among those
    ``info`` declares; computed here, for these items only, and sent in their dtype."""
    items = batch.items
    xs = np.stack([it.x for it in items]).astype(info.input_dtype, copy=False)
    logits: np.ndarray | None = np.stack([it.logits for it in items]).astype(np.float32, copy=False)
    if not np.isfinite(logits).all():
        # A caller's input past the model's range (finite, ~3e38) gives NaN or infinite
        # logits: that item's go up saturated, NaN as 0 (no margin between the classes);
        # the controller still judges it.
        logits = _saturated(logits, np.dtype(np.float32))
    privacy = info.privacy
    confs: list[float] | None = None
    acts: list[tuple[str, np.ndarray]] = []
    if privacy is not None:
        xs = privacy.apply(xs, rng)
        if privacy.logits == "label":
            logits, confs = None, [0.0] * len(items)
        elif privacy.logits == "noised":
            logits = privacy.noise_logits(logits, rng)
            top = logits.max(axis=1, keepdims=True)
            confs = (1.0 / np.exp(logits - top).sum(axis=1)).tolist()  # softmax of the top
    if activations and info.activations is not None:  # never noised: AgentConfig refuses both
        got = info.activations(xs)
        # a caller's input whose activations pass float16's 65504 (or the model's range)
        for name in activations:
            acts.append((name, _saturated(got[name], info.activations_dtype)))
    hide_fp = privacy is not None and privacy.on
    env = pb.Envelope(version=version, xid=batch.xid)
    body = env.pkg_in  # filled in place: no copy of the tensors into the envelope
    body.model_id = batch.model_id
    tensor.encode(xs, body.inputs)
    if logits is not None:
        tensor.encode(logits, body.logits)
    for name, a in acts:
        tensor.encode(a, body.activations.add(name=name).tensor)
    for i, it in enumerate(items):
        conf = it.confidence if confs is None else confs[i]
        body.items.add(
            label=it.label,
            confidence=conf if 0.0 <= conf <= 1.0 else 0.0,  # NaN would void the batch
            source_id=it.source_id,
            reason=it.reason,
            rule_cookie=it.cookie,
            fingerprint=b"" if hide_fp else it.fp,
            budget_us=it.budget_us,
            inferred_at_ns=max(0, int((it.started + wall_offset_s) * 1e9)),
        )
    return env
