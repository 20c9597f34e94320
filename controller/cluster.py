"""Several controllers: the replicated vigilance state and the peers' workload, sans-I/O.

:class:`ClusterState` is what one controller knows of the cluster. The MQTT shell
(controller/bus.py) feeds it what arrives on the east-west bus with ``now`` (unix
seconds: expiries cross machines, so they are wall-clock times) and publishes what it
returns; the daemon (controller/server.py) hands it the RT entries and blocks its core
made, and applies the :class:`Changes` a merge returns through
:meth:`controller.core.ControllerCore.apply_remote`. No sockets, clocks or threads.

**What is replicated.** ADVERSARIAL RT entries (swift vigilance, with their perceptual
``near_key``) and the sources source tracing blocked, keyed by ``("rt", model_id,
fingerprint, label)`` and ``("block", agent_id, source_id)``.

**How it merges** (an observed-remove set with expiries, a CRDT):

- Every add made on a controller gets a tag unique in the cluster: (origin identity, its
  run's generation, a counter). The state is the union of every add seen and every
  tombstone seen; a tombstone names the tag it removes.
- A key is present while at least one of its adds is neither tombstoned nor expired.
  Its value is the add with the **latest expiry** (0 on the wire: never; ties by tag), so
  a key blocked on two controllers stays blocked until the later of the two expiries.
- A removal (an operator's unblock) tombstones the tags its controller has seen for that
  key. An add it had not seen (made elsewhere, e.g. while the two were cut off) survives:
  add wins over a concurrent removal, which is the safe side for a block.
- Union and max are commutative, associative and idempotent, and expiry is a fixed
  instant, so replicas that have seen the same messages, in any order and any number of
  times, agree. Adds and tombstones are dropped once their expiry passes (a late copy of
  an expired add is expired too); a tombstone of an add that never expires is kept.

Each controller publishes its new adds and removals as a **delta** (not retained) and,
when it (re)connects and after changes, its whole merged state as a retained
**snapshot**. A controller that was cut off gets every peer's snapshot when it
subscribes again and merges them, and they merge its own: cut-off controllers converge
when the broker comes back. Its own snapshot of an earlier run is merged too (a
restarted controller gets back the cluster's RT).

**Trust.** The topic names the publishing controller and the broker's ACL lets each
controller write only under its own identity; :meth:`ClusterState.receive` refuses a
message whose ``sender`` is not the identity in its topic, and a delta carrying adds of
another origin (a snapshot relays others' adds; a delta only its own). Only ADVERSARIAL
entries are accepted: a BENIGN entry would let an input through everywhere.

**Workload** (Table III): each controller publishes W, W0 and its measured service time,
retained, with a last will saying it is down; :attr:`ClusterState.peers` is the table.
A peer counts as up (:meth:`ClusterState.peers_up`) while its last load says so and came
less than ``PEER_SILENT_S`` ago: the load is published at least every ``HEARTBEAT_S``,
so a peer silent for longer is gone even if no goodbye or last will said so (a retained
"up" outliving its controller).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from openexample.identity import valid_name
from openexample.limits import FINGERPRINT_BYTES, MAX_ID_BYTES
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb

VERSION = 1
PREFIX = "openexample/v1/cluster"
SUBSCRIPTION = f"{PREFIX}/#"
DELTA, STATE, LOAD = "delta", "state", "load"
ROLE, RULES = "role", "rules"  # mastership (controller/mastership.py reads them)
_BODY = {DELTA: "delta", STATE: "snapshot", LOAD: "workload", ROLE: "role", RULES: "rules"}
NEVER = math.inf
HEARTBEAT_S = 10.0  # a controller publishes its load at least this often
PEER_SILENT_S = 3 * HEARTBEAT_S  # a peer heard from less recently is not counted up

Tag = tuple[str, int, int]  # (origin identity, generation, n)
RtKey = tuple[str, bytes, int]  # (model_id, fingerprint, label)
BlockKey = tuple[str, str]  # (agent_id, source_id)
Key = tuple  # ("rt", *RtKey) or ("block", *BlockKey)
_ACTIONS = (pb.VERDICT_ACTION_DROP, pb.VERDICT_ACTION_CORRECT)


def topic(identity: str, leaf: str) -> str:
    """``openexample/v1/cluster/<identity>/<leaf>`` (identity ``controller/<name>``)."""
    return f"{PREFIX}/{identity}/{leaf}"


def topic_identity(name: str) -> tuple[str, str] | None:
    """(identity, leaf) of a bus topic; None when it is not one."""
    parts = name.split("/")
    if (
        len(parts) != 6
        or "/".join(parts[:3]) != PREFIX
        or parts[3] != "controller"
        or not valid_name(parts[4])
        or parts[5] not in _BODY
    ):
        return None
    return f"controller/{parts[4]}", parts[5]


def _expiry(wire: float) -> float:
    return NEVER if wire == 0 else wire


def _wire(expires_at: float) -> float:
    return 0.0 if expires_at == NEVER else expires_at


@dataclass(frozen=True, slots=True)
class _Add:
    key: Key
    expires_at: float  # unix seconds; NEVER
    entry: pb.LabelEntry | None = None  # RT adds: the entry (ttl_s unused)

    def rank(self) -> tuple[float, bytes]:
        """Two copies of one tag that differ (never from an honest controller): the one
        kept is the same on every replica."""
        data = b"" if self.entry is None else self.entry.SerializeToString(deterministic=True)
        return (self.expires_at, data)


@dataclass(slots=True)
class Changes:
    """What a merge changed in the effective state, for the core (times: unix seconds;
    None: never expires)."""

    rt: list[tuple[str, pb.LabelEntry, float | None]] = field(default_factory=list)
    rt_removed: list[RtKey] = field(default_factory=list)
    blocks: list[tuple[BlockKey, float | None]] = field(default_factory=list)
    unblocked: list[BlockKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rt or self.rt_removed or self.blocks or self.unblocked)


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """A peer's last workload message."""

    identity: str
    up: bool
    workload: int  # W
    max_workload: int  # W0
    service_s: float  # scoring seconds per item (moving average)
    sent_at: float  # unix seconds, the peer's clock
    generation: int
    heard_at: float = 0.0  # when it arrived here (unix seconds, this controller's clock)

    def counted_up(self, now: float, silent_s: float = PEER_SILENT_S) -> bool:
        """Whether its last load said up and arrived less than ``silent_s`` ago."""
        return self.up and now - self.heard_at < silent_s


@dataclass(slots=True)
class Received:
    """What one bus message did. ``refused``: why it was refused ("" when accepted),
    ``reason`` its short name for the metric (topic, decode, version, sender, body,
    entry)."""

    kind: str = ""  # delta, state, load
    sender: str = ""
    sent_at: float = 0.0  # when the sender built it (unix seconds, its clock)
    changes: Changes = field(default_factory=Changes)
    peer: PeerLoad | None = None  # the load table changed
    refused: str = ""
    reason: str = ""


def _refuse(reason: str, text: str, kind: str = "", sender: str = "") -> Received:
    return Received(kind=kind, sender=sender, refused=text, reason=reason)


def _tag(t: cpb.ReplicaTag) -> Tag:
    return (t.origin, t.generation, t.n)


def _tag_pb(tag: Tag) -> cpb.ReplicaTag:
    return cpb.ReplicaTag(origin=tag[0], generation=tag[1], n=tag[2])


def _bad_id(value: str) -> bool:
    return not 0 < len(value.encode()) <= MAX_ID_BYTES


def _check_tag(t: cpb.ReplicaTag, origin: str | None) -> str:
    kind, _, name = t.origin.partition("/")
    if kind != "controller" or not valid_name(name):
        return f"tag origin {t.origin!r} is not a controller identity"
    if origin is not None and t.origin != origin:
        return f"a delta of {origin} carries an add of {t.origin}"
    return ""


def _check_expiry(value: float) -> str:
    return "" if math.isfinite(value) and value >= 0 else f"expires_at {value!r}"


def check_set(vs: cpb.VigilanceSet, origin: str | None) -> str:
    """Why ``vs`` is refused ("" when it is fine). ``origin``: a delta's sender, whose
    adds must all be its own."""
    for i, r in enumerate(vs.rt):
        e = r.entry
        problem = (
            _check_tag(r.tag, origin)
            or _check_expiry(r.expires_at)
            or ("bad model_id" if _bad_id(r.model_id) else "")
            or ("fingerprint" if len(e.fingerprint) != FINGERPRINT_BYTES else "")
            or ("not ADVERSARIAL" if e.verdict != pb.VERDICT_ADVERSARIAL else "")
            or (f"action {e.action}" if e.action not in _ACTIONS else "")
            or (
                "CORRECT without corrected_label"
                if e.action == pb.VERDICT_ACTION_CORRECT and not e.HasField("corrected_label")
                else ""
            )
        )
        if problem:
            return f"rt[{i}]: {problem}"
    for i, b in enumerate(vs.blocks):
        problem = (
            _check_tag(b.tag, origin)
            or _check_expiry(b.expires_at)
            or ("bad agent_id" if not valid_name(b.agent_id) else "")
            or ("bad source_id" if _bad_id(b.source_id) else "")
        )
        if problem:
            return f"blocks[{i}]: {problem}"
    for i, t in enumerate(vs.removed):
        kind = t.WhichOneof("key")
        problem = (
            _check_tag(t.tag, None)
            or _check_expiry(t.expires_at)
            or ("no key" if kind is None else "")
            or (
                "bad rt key"
                if kind == "rt"
                and (_bad_id(t.rt.model_id) or len(t.rt.entry.fingerprint) != FINGERPRINT_BYTES)
                else ""
            )
            or (
                "bad block key"
                if kind == "block"
                and (not valid_name(t.block.agent_id) or _bad_id(t.block.source_id))
                else ""
            )
        )
        if problem:
            return f"removed[{i}]: {problem}"
    return ""


class ClusterState:
    """One controller's view of the cluster: the replicated set and the peers' load.

    ``identity``: this controller's (``controller/<name>``); ``generation``: this run's
    (unix milliseconds at its start: a restart must get a larger one). ``max_adds``
    bounds memory: past it the adds that expire soonest are dropped (replicas may then
    differ on those until they expire).
    """

    def __init__(self, identity: str, generation: int, *, max_adds: int = 200_000) -> None:
        self.identity = identity
        self.generation = generation
        self.max_adds = max_adds
        self._seq = 0
        self._n = 0
        self._adds: dict[Tag, _Add] = {}
        self._removed: dict[Tag, _Add] = {}  # tag -> the removed add (key and expiry)
        self._by_key: dict[Key, set[Tag]] = {}
        self.peers: dict[str, PeerLoad] = {}
        self._load_seen: dict[str, tuple[int, int]] = {}  # peer -> (generation, seq)
        self.evicted = 0
        self.version = 0  # grows with every change to the set (adds, tombstones)

    # --- reading ---

    def peers_up(self, now: float, silent_s: float = PEER_SILENT_S) -> list[PeerLoad]:
        """The other controllers counted up: their last load said up and arrived less
        than ``silent_s`` ago."""
        return [
            p
            for p in self.peers.values()
            if p.identity != self.identity and p.counted_up(now, silent_s)
        ]

    def __len__(self) -> int:
        return len(self._adds)

    def effective(self, now: float) -> dict[Key, tuple[float, bytes]]:
        """Every present key with its expiry and value (the RT entry's bytes): what the
        replicas must agree on (tests compare it)."""
        out = {}
        for key in self._by_key:
            best = self._best(key, now)
            if best is not None:
                out[key] = best[1].rank()
        return out

    def _best(self, key: Key, now: float) -> tuple[Tag, _Add] | None:
        best: tuple[Tag, _Add] | None = None
        for tag in self._by_key.get(key, ()):
            add = self._adds[tag]
            if add.expires_at <= now:
                continue
            if best is None or (add.expires_at, tag) > (best[1].expires_at, best[0]):
                best = (tag, add)
        return best

    # --- changes made here ---

    def _message(self, now: float, **body: object) -> cpb.BusMessage:
        self._seq += 1
        return cpb.BusMessage(
            version=VERSION,
            sender=self.identity,
            generation=self.generation,
            seq=self._seq,
            sent_at=now,
            **body,
        )

    def message(self, now: float, **body: object) -> cpb.BusMessage:
        """A message from this controller with ``body`` (work and answers: overflow.py)."""
        return self._message(now, **body)

    def _new_tag(self) -> Tag:
        self._n += 1
        return (self.identity, self.generation, self._n)

    def local(
        self,
        now: float,
        *,
        rt: Iterable[tuple[str, pb.LabelEntry, float | None]] = (),
        blocks: Iterable[tuple[BlockKey, float | None]] = (),
        unblocked: Iterable[BlockKey] = (),
        rt_removed: Iterable[RtKey] = (),
    ) -> cpb.BusMessage | None:
        """What this controller's core did (RT entries made, sources blocked or
        unblocked; expiries in unix seconds, None: never), merged here; returns the delta
        to publish (None: nothing to say)."""
        delta = cpb.VigilanceSet()
        for model_id, entry, until in rt:
            expires = NEVER if until is None else until
            if expires <= now:
                continue
            stored = pb.LabelEntry()
            stored.CopyFrom(entry)
            stored.ttl_s = 0  # the expiry is absolute: expires_at
            tag = self._new_tag()
            self._put(tag, _Add(("rt", model_id, entry.fingerprint, entry.label), expires, stored))
            delta.rt.append(
                cpb.ReplicatedRt(
                    tag=_tag_pb(tag), model_id=model_id, entry=stored, expires_at=_wire(expires)
                )
            )
        for (agent_id, source_id), until in blocks:
            expires = NEVER if until is None else until
            if expires <= now:
                continue
            tag = self._new_tag()
            self._put(tag, _Add(("block", agent_id, source_id), expires))
            delta.blocks.append(
                cpb.ReplicatedBlock(
                    tag=_tag_pb(tag),
                    agent_id=agent_id,
                    source_id=source_id,
                    expires_at=_wire(expires),
                )
            )
        for key in [("block", *k) for k in unblocked] + [("rt", *k) for k in rt_removed]:
            delta.removed.extend(self._remove(key))
        self._bound(now)
        if not (delta.rt or delta.blocks or delta.removed):
            return None
        return self._message(now, delta=delta)

    def _put(self, tag: Tag, add: _Add) -> None:
        self.version += 1
        self._adds[tag] = add
        self._by_key.setdefault(add.key, set()).add(tag)

    def _drop(self, tag: Tag) -> _Add | None:
        add = self._adds.pop(tag, None)
        if add is not None:
            self.version += 1
            tags = self._by_key[add.key]
            tags.discard(tag)
            if not tags:
                del self._by_key[add.key]
        return add

    def _remove(self, key: Key) -> list[cpb.Tombstone]:
        out = []
        for tag in sorted(self._by_key.get(key, ())):
            add = self._drop(tag)
            assert add is not None
            self._removed[tag] = add
            self.version += 1
            out.append(_tombstone(tag, add))
        return out

    # --- what this controller publishes besides deltas ---

    def snapshot(self, now: float) -> cpb.BusMessage:
        """The whole merged state (expired parts dropped first), to publish retained."""
        self.expire(now)
        vs = cpb.VigilanceSet()
        for tag, add in sorted(self._adds.items()):
            if add.key[0] == "rt":
                vs.rt.append(
                    cpb.ReplicatedRt(
                        tag=_tag_pb(tag),
                        model_id=add.key[1],
                        entry=add.entry,
                        expires_at=_wire(add.expires_at),
                    )
                )
            else:
                vs.blocks.append(
                    cpb.ReplicatedBlock(
                        tag=_tag_pb(tag),
                        agent_id=add.key[1],
                        source_id=add.key[2],
                        expires_at=_wire(add.expires_at),
                    )
                )
        for tag, add in sorted(self._removed.items()):
            vs.removed.append(_tombstone(tag, add))
        return self._message(now, snapshot=vs)

    def workload(
        self, now: float, workload: int, max_workload: int, service_s: float, *, up: bool = True
    ) -> cpb.BusMessage:
        """This controller's load (retained); ``up=False`` when it stops."""
        body = cpb.Workload(
            up=up, workload=workload, max_workload=max_workload, service_s=service_s
        )
        return self._message(now, workload=body)

    def will(self, now: float) -> cpb.BusMessage:
        """The last will the broker publishes (retained) if this controller vanishes:
        seq 0, down."""
        return cpb.BusMessage(
            version=VERSION,
            sender=self.identity,
            generation=self.generation,
            seq=0,
            sent_at=now,
            workload=cpb.Workload(up=False),
        )

    def expire(self, now: float) -> None:
        """Drop the adds and tombstones whose expiry has passed."""
        for tag in [t for t, a in self._adds.items() if a.expires_at <= now]:
            self._drop(tag)
        for tag in [t for t, a in self._removed.items() if a.expires_at <= now]:
            del self._removed[tag]

    # --- what arrives ---

    def receive(self, name: str, payload: bytes, now: float) -> Received:
        """One message from the bus: its topic and payload."""
        where = topic_identity(name)
        if where is None:
            return _refuse("topic", f"not a bus topic: {name!r}")
        ident, leaf = where
        if leaf in (ROLE, RULES):
            return _refuse("topic", f"not a vigilance or load topic: {name!r}", leaf, ident)
        try:
            msg = cpb.BusMessage.FromString(payload)
        except DecodeError as exc:
            return _refuse("decode", f"undecodable on {name}: {exc}", leaf, ident)
        if msg.version != VERSION:
            return _refuse("version", f"version {msg.version} on {name}", leaf, ident)
        if msg.sender != ident:
            return _refuse(
                "sender",
                f"sender {msg.sender!r} on the topic of {ident} ({name})",
                leaf,
                msg.sender,
            )
        body = msg.WhichOneof("body")
        if body != _BODY[leaf]:
            return _refuse("body", f"{body or 'no body'} on {name}", leaf, ident)
        if leaf == LOAD:
            return self._on_load(ident, msg, now)
        if ident == self.identity and msg.generation == self.generation:
            return Received(kind=leaf, sender=ident)  # our own, back from the broker
        vs = getattr(msg, body)
        problem = check_set(vs, ident if leaf == DELTA else None)
        if problem:
            return _refuse("entry", f"{leaf} of {ident}: {problem}", leaf, ident)
        return Received(kind=leaf, sender=ident, sent_at=msg.sent_at, changes=self.merge(vs, now))

    def merge(self, vs: cpb.VigilanceSet, now: float) -> Changes:
        """Merge a (checked) delta or snapshot; returns what changed in the effective
        state (keys that appeared, went, or whose expiry or value changed)."""
        before: dict[Key, tuple[Tag, _Add] | None] = {}

        def touch(key: Key) -> None:
            if key not in before:
                before[key] = self._best(key, now)

        named: set[Key] = set()  # keys of tombstones new here
        for t in vs.removed:
            tag, gone = _tag(t.tag), _removed_add(t)
            if gone.expires_at <= now:
                continue
            touch(gone.key)
            add = self._adds.get(tag)
            if add is not None:
                touch(add.key)
                self._drop(tag)
            old = self._removed.get(tag)
            if old is None or old.rank() < gone.rank():
                self._removed[tag] = gone
                self.version += 1
                named.add(gone.key)
        incoming: list[tuple[Tag, _Add]] = []
        for r in vs.rt:
            key = ("rt", r.model_id, r.entry.fingerprint, r.entry.label)
            incoming.append((_tag(r.tag), _Add(key, _expiry(r.expires_at), r.entry)))
        for b in vs.blocks:
            key = ("block", b.agent_id, b.source_id)
            incoming.append((_tag(b.tag), _Add(key, _expiry(b.expires_at))))
        for tag, add in incoming:
            if add.expires_at <= now or tag in self._removed:
                continue
            old = self._adds.get(tag)
            if old is not None and old.rank() >= add.rank():
                continue
            touch(add.key)
            if old is not None:
                touch(old.key)
                self._drop(tag)
            self._put(tag, add)
        self._bound(now)
        changes = Changes()
        for key, was in before.items():
            now_best = self._best(key, now)
            # A key gone here, or named by a new tombstone and absent: the core lifts it
            # (it may hold it from before a restart, from its own store).
            if _same(was, now_best) and not (now_best is None and key in named):
                continue
            if now_best is None:
                if key[0] == "rt":
                    changes.rt_removed.append(key[1:])
                else:
                    changes.unblocked.append(key[1:])
                continue
            add = now_best[1]
            until = None if add.expires_at == NEVER else add.expires_at
            if key[0] == "rt":
                assert add.entry is not None
                changes.rt.append((key[1], add.entry, until))
            else:
                changes.blocks.append((key[1:], until))
        return changes

    def _bound(self, now: float) -> None:
        if len(self._adds) <= self.max_adds:
            return
        self.expire(now)
        extra = len(self._adds) - self.max_adds
        if extra > 0:
            doomed = sorted(self._adds.items(), key=lambda kv: (kv[1].expires_at, kv[0]))
            for tag, _ in doomed[:extra]:
                self._drop(tag)
            self.evicted += extra

    def _on_load(self, ident: str, msg: cpb.BusMessage, now: float) -> Received:
        if ident == self.identity:
            return Received(kind=LOAD, sender=ident)  # ours (or our last run's will)
        w = msg.workload
        seen = self._load_seen.get(ident)
        will = msg.seq == 0 and not w.up
        fresh = (
            seen is None
            or msg.generation > seen[0]
            or (msg.generation == seen[0] and (msg.seq > seen[1] or will))
        )
        if not fresh:
            return Received(kind=LOAD, sender=ident)  # older than what we have
        same_run = seen is not None and seen[0] == msg.generation
        self._load_seen[ident] = (msg.generation, max(msg.seq, seen[1]) if same_run else msg.seq)
        peer = PeerLoad(
            identity=ident,
            up=w.up,
            workload=w.workload,
            max_workload=w.max_workload,
            service_s=w.service_s,
            sent_at=msg.sent_at,
            generation=msg.generation,
            heard_at=now,
        )
        self.peers[ident] = peer
        return Received(kind=LOAD, sender=ident, peer=peer)


def _tombstone(tag: Tag, add: _Add) -> cpb.Tombstone:
    t = cpb.Tombstone(tag=_tag_pb(tag), expires_at=_wire(add.expires_at))
    if add.key[0] == "rt":
        _, model_id, fp, label = add.key
        t.rt.model_id = model_id
        t.rt.entry.fingerprint = fp
        t.rt.entry.label = label
    else:
        t.block.agent_id, t.block.source_id = add.key[1], add.key[2]
    return t


def _removed_add(t: cpb.Tombstone) -> _Add:
    """The add a (checked) tombstone removes: its key and expiry."""
    if t.WhichOneof("key") == "rt":
        key: Key = ("rt", t.rt.model_id, t.rt.entry.fingerprint, t.rt.entry.label)
    else:
        key = ("block", t.block.agent_id, t.block.source_id)
    return _Add(key, _expiry(t.expires_at))


def _same(a: tuple[Tag, _Add] | None, b: tuple[Tag, _Add] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[1].rank() == b[1].rank()
