"""RT / FT label tables (DeSVig, Table II) and the TABLE_MOD that changes them.

RT: authenticated verdicts by (input fingerprint, label), so a repeated input is decided
locally; the controller pushes ADVERSARIAL ones to every agent of the model ("swift
vigilance"). FT: inputs sent to the controller whose verdict is not back yet; an identical
concurrent input joins the pending entry instead of being sent again. Pure code: calls
take ``now`` (seconds on one monotonic clock chosen by the caller).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

import numpy as np

from openexample.errors import table_mod_failed
from openexample.limits import FINGERPRINT_BYTES, MAX_ID_BYTES
from openexample.perceptual import NearIndex
from openexample.v1 import openexample_pb2 as pb

Key = tuple[str, bytes, int]  # (model_id, fingerprint, label)
V = TypeVar("V")

_VERDICTS = (pb.VERDICT_BENIGN, pb.VERDICT_ADVERSARIAL)
_ACTIONS = (pb.VERDICT_ACTION_RELEASE, pb.VERDICT_ACTION_DROP, pb.VERDICT_ACTION_CORRECT)
_COMMANDS = (pb.TABLE_MOD_COMMAND_ADD, pb.TABLE_MOD_COMMAND_DELETE, pb.TABLE_MOD_COMMAND_CLEAR)
_bad_entry = partial(table_mod_failed, pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY)


def fingerprint(arr: np.ndarray, key: bytes = b"") -> bytes:
    """16-byte blake2b digest of one sample's dtype, shape and C-order bytes. A ``key``
    (deployment secret, <= 64 bytes) keeps outsiders from confirming fingerprints."""
    arr = np.asarray(arr)
    if arr.dtype.hasobject:  # its bytes would be pointers, not data
        raise TypeError("cannot fingerprint an object array")
    h = hashlib.blake2b(digest_size=FINGERPRINT_BYTES, key=key)
    # dtype.str (byte order, item size) never contains "(": the header is unambiguous.
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    flat = np.ascontiguousarray(arr).reshape(-1)  # no copy when already C-contiguous
    h.update(memoryview(flat.view(np.uint8)))  # uint8 view: any dtype exports a buffer
    return h.digest()


def fingerprint_batch(arr: np.ndarray, key: bytes = b"") -> list[bytes]:
    """One fingerprint per sample along axis 0 (equal to ``fingerprint(arr[i])``)."""
    arr = np.ascontiguousarray(arr)  # one copy at most; then every row is contiguous
    return [fingerprint(row, key) for row in arr]


# --- RT: authenticated results ---
@dataclass(slots=True)
class ResultEntry:
    verdict: int  # pb.VERDICT_BENIGN / pb.VERDICT_ADVERSARIAL
    action: int  # pb.VERDICT_ACTION_*
    corrected_label: int | None
    score: float
    expires_at: float | None  # same clock as `now`; None = until evicted
    near_key: int | None = None  # ADVERSARIAL only: the input's perceptual key
    near_sketch: bytes = b""  # ... and the thumbnail it comes from

    @classmethod
    def from_pb(cls, entry: pb.LabelEntry, now: float, default_ttl_s: float = 0.0) -> ResultEntry:
        """Entry for a received LabelEntry; ttl_s 0 uses ``default_ttl_s`` (0: never expires)."""
        ttl = entry.ttl_s if entry.ttl_s > 0 else default_ttl_s
        corrected = entry.corrected_label if entry.HasField("corrected_label") else None
        expires_at = now + ttl if ttl > 0 else None
        near = entry.near_key if entry.HasField("near_key") else None
        if entry.verdict != pb.VERDICT_ADVERSARIAL:
            near = None  # near-copies are only ever refused, never released
        sketch = entry.near_sketch if near is not None else b""
        return cls(entry.verdict, entry.action, corrected, entry.score, expires_at, near, sketch)

    def to_pb(self, fingerprint: bytes, label: int, now: float | None = None) -> pb.LabelEntry:
        """Wire form. ttl_s is the remaining lifetime when ``now`` is given; without
        it an expiring entry gets the minimum (1 s) so a resync never extends it."""
        ttl_s = 0
        if self.expires_at is not None:
            remaining = 1 if now is None else math.ceil(self.expires_at - now)
            ttl_s = min(max(remaining, 1), 0xFFFFFFFF)  # uint32 on the wire
        return pb.LabelEntry(
            fingerprint=fingerprint,
            label=label,
            verdict=self.verdict,
            action=self.action,
            corrected_label=self.corrected_label,
            score=self.score,
            ttl_s=ttl_s,
            near_key=self.near_key,
            near_sketch=self.near_sketch,
        )

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class _Table(Generic[V]):
    """Bounded insertion-ordered map Key -> V with the counters TableStats reports."""

    name = ""

    def __init__(self, max_entries: int = 10_000) -> None:  # default: FT's
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._items: OrderedDict[Key, V] = OrderedDict()  # front = next to evict
        self.lookup_count = self.hit_count = self.eviction_count = 0

    def _insert(self, key: Key, value: V) -> None:
        """Insert a new key at the back, evicting from the front when full."""
        if len(self._items) >= self.max_entries:
            self._items.popitem(last=False)
            self.eviction_count += 1
        self._items[key] = value

    def clear(self, model_id: str | None = None) -> None:
        """Drop every entry, or only those of ``model_id``."""
        if model_id is None:
            self._items.clear()
        else:
            for key in [k for k in self._items if k[0] == model_id]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> pb.TableStats:
        return pb.TableStats(
            table=self.name,
            active_count=len(self._items),
            max_entries=self.max_entries,
            lookup_count=self.lookup_count,
            hit_count=self.hit_count,
            eviction_count=self.eviction_count,
        )


class ResultTable(_Table[ResultEntry]):
    """RT: LRU-bounded Key -> ResultEntry. Expired entries are dropped lazily on get."""

    name = "rt"

    def __init__(self, max_entries: int = 100_000, default_ttl_s: float = 0.0) -> None:
        super().__init__(max_entries)
        self.default_ttl_s = default_ttl_s  # for ADD entries with ttl_s 0; 0 = never

    def get(self, key: Key, now: float) -> ResultEntry | None:
        self.lookup_count += 1
        entry = self._items.get(key)
        if entry is None:
            return None
        if entry.expired(now):
            del self._items[key]
            return None
        self._items.move_to_end(key)  # most recently used goes last
        self.hit_count += 1
        return entry

    def put(self, key: Key, entry: ResultEntry) -> None:
        """Insert or replace; a full table evicts its least recently used entry."""
        self._items.pop(key, None)  # a replaced key never evicts another
        self._insert(key, entry)

    def delete(self, key: Key) -> bool:
        return self._items.pop(key, None) is not None

    def entries(self, model_id: str, now: float | None = None) -> list[pb.LabelEntry]:
        """The model's entries, least recently used first (for resync after a
        reconnect). With ``now``, expired entries are left out and ttl_s is what remains."""
        return [
            entry.to_pb(fp, label, now)
            for (mid, fp, label), entry in self._items.items()
            if mid == model_id and (now is None or not entry.expired(now))
        ]


# --- FT: pending verdicts ---
@dataclass(slots=True)
class Pending:
    xid: int  # xid of the PKG_IN that carries the input
    since: float
    waiters: int


class PendingTable(_Table[Pending]):
    """FT: Key -> Pending, oldest first. Never raises: a full table evicts its
    oldest entry, whose waiters then time out on their own budgets."""

    name = "ft"

    def begin(self, key: Key, xid: int, now: float) -> Pending | None:
        """None: newly registered, the caller sends the PKG_IN. Otherwise the
        existing Pending, which the caller joins (waiters is already incremented)."""
        self.lookup_count += 1
        pending = self._items.get(key)
        if pending is not None:
            self.hit_count += 1
            pending.waiters += 1
            return pending
        self._insert(key, Pending(xid=xid, since=now, waiters=1))
        return None

    def resolve(self, key: Key) -> Pending | None:
        return self._items.pop(key, None)

    def oldest_since(self) -> float | None:
        """When the oldest pending entry began (None: empty), for the next expiry."""
        for pending in self._items.values():
            return pending.since
        return None

    def expire(self, now: float, max_age_s: float) -> list[Key]:
        """Drop entries with ``now - since >= max_age_s``: no answer is coming."""
        expired: list[Key] = []
        # Entries are in `since` order (now is monotonic), so stop at the first young one.
        for key, pending in self._items.items():
            if now - pending.since < max_age_s:
                break
            expired.append(key)
        for key in expired:
            del self._items[key]
        return expired


# --- Both tables and TABLE_MOD ---
class LabelTables:
    """An agent's RT and FT, changed by the controller through TABLE_MOD, and the index
    of the RT's ADVERSARIAL entries by perceptual key (``near_radius`` 0: none)."""

    def __init__(
        self,
        rt: ResultTable | None = None,
        ft: PendingTable | None = None,
        near_radius: int = 0,
    ) -> None:
        self.rt = rt if rt is not None else ResultTable()
        self.ft = ft if ft is not None else PendingTable()
        self.near = NearIndex(near_radius, self.rt.max_entries) if near_radius > 0 else None

    def stats(self) -> list[pb.TableStats]:
        return [self.rt.stats(), self.ft.stats()]

    def put_rt(self, key: Key, entry: ResultEntry) -> None:
        """An RT entry, indexed by its perceptual key when it has one."""
        self.rt.put(key, entry)
        if self.near is not None and entry.near_key is not None:
            self.near.add(key[0], key[2], entry.near_key, entry.near_sketch, key)

    def near_copy(
        self, model_id: str, label: int, x: np.ndarray, now: float
    ) -> tuple[ResultEntry, int] | None:
        """The ADVERSARIAL RT entry whose input ``x`` is a near-copy of (same model and
        label, perceptual keys within the radius) and the distance; None if none. The
        key is computed only when the model and label have such entries."""
        near = self.near
        if near is None:
            return None
        found = near.find_input(model_id, label, x)
        if found is None:
            return None
        key, distance = found
        entry = self.rt.get(key, now)  # type: ignore[arg-type]
        if entry is None or entry.verdict != pb.VERDICT_ADVERSARIAL:
            near.remove(key)  # evicted, expired or replaced in the RT since
            return None
        return entry, distance

    def apply(self, mod: pb.TableMod, now: float) -> None:
        """Carry out one TABLE_MOD, or raise ProtocolError TABLE_MOD_FAILED and
        change nothing (everything is validated before the first change)."""
        if mod.table not in (pb.LABEL_TABLE_RT, pb.LABEL_TABLE_FT):
            raise table_mod_failed(pb.TABLE_MOD_FAILED_CODE_BAD_TABLE, f"table {mod.table}")
        if mod.command not in _COMMANDS:
            raise table_mod_failed(pb.TABLE_MOD_FAILED_CODE_BAD_COMMAND, f"command {mod.command}")
        clear = mod.command == pb.TABLE_MOD_COMMAND_CLEAR
        if mod.table == pb.LABEL_TABLE_FT and not clear:
            # FT is agent-local state; the controller may only flush it.
            raise table_mod_failed(pb.TABLE_MOD_FAILED_CODE_EPERM, "FT accepts only CLEAR")
        size = len(mod.model_id.encode())  # protobuf strings are always valid UTF-8
        if size > MAX_ID_BYTES or (size == 0 and not clear):
            raise _bad_entry(f"model_id of {size} bytes (1..{MAX_ID_BYTES})")
        if clear:  # an empty model_id clears every model
            table = self.ft if mod.table == pb.LABEL_TABLE_FT else self.rt
            table.clear(mod.model_id or None)
            if table is self.rt and self.near is not None:
                self.near.clear(mod.model_id or None)
            return
        add = mod.command == pb.TABLE_MOD_COMMAND_ADD
        for i, e in enumerate(mod.entries):
            _check_entry(i, e, full=add)  # DELETE reads only fingerprint and label
        for e in mod.entries:
            key = (mod.model_id, e.fingerprint, e.label)
            if add:
                self.put_rt(key, ResultEntry.from_pb(e, now, self.rt.default_ttl_s))
            else:
                self.rt.delete(key)
                if self.near is not None:
                    self.near.remove(key)


def _check_entry(i: int, e: pb.LabelEntry, *, full: bool) -> None:
    if len(e.fingerprint) != FINGERPRINT_BYTES:
        raise _bad_entry(f"entry {i}: fingerprint is {len(e.fingerprint)} bytes")
    if not full:
        return
    if e.verdict not in _VERDICTS:
        raise _bad_entry(f"entry {i}: verdict {e.verdict} is not BENIGN or ADVERSARIAL")
    if e.action not in _ACTIONS:
        raise _bad_entry(f"entry {i}: action {e.action}")
    if e.action == pb.VERDICT_ACTION_CORRECT and not e.HasField("corrected_label"):
        raise _bad_entry(f"entry {i}: action CORRECT without corrected_label")


# --- Builders (controller side) ---
def rt_push(model_id: str, entries: list[pb.LabelEntry]) -> pb.TableMod:
    """TABLE_MOD that adds ``entries`` to every receiving agent's RT (swift vigilance)."""
    table, command = pb.LABEL_TABLE_RT, pb.TABLE_MOD_COMMAND_ADD
    return pb.TableMod(table=table, command=command, model_id=model_id, entries=entries)


def label_entry(
    fingerprint: bytes,
    label: int,
    verdict: int,
    *,
    action: int | None = None,
    corrected_label: int | None = None,
    score: float = 0.0,
    ttl_s: int = 0,
    near_key: int | None = None,
    near_sketch: bytes = b"",
) -> pb.LabelEntry:
    """One RT entry. ``action`` defaults to CORRECT when a corrected label is given,
    else DROP for ADVERSARIAL and RELEASE otherwise."""
    if action is None and corrected_label is not None:
        action = pb.VERDICT_ACTION_CORRECT
    elif action is None:
        adversarial = verdict == pb.VERDICT_ADVERSARIAL
        action = pb.VERDICT_ACTION_DROP if adversarial else pb.VERDICT_ACTION_RELEASE
    return pb.LabelEntry(
        fingerprint=fingerprint,
        label=label,
        verdict=verdict,
        action=action,
        corrected_label=corrected_label,
        score=score,
        ttl_s=ttl_s,
        near_key=near_key,
        near_sketch=near_sketch,
    )
