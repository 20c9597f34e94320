"""Tests for openexample/tables.py: fingerprints, RT, FT and TABLE_MOD."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from openexample.errors import ProtocolError
from openexample.limits import FINGERPRINT_BYTES, MAX_ID_BYTES
from openexample.tables import (
    LabelTables,
    Pending,
    PendingTable,
    ResultEntry,
    ResultTable,
    fingerprint,
    fingerprint_batch,
    label_entry,
    rt_push,
)
from openexample.v1 import openexample_pb2 as pb

FP_A = bytes(range(16))
FP_B = bytes(range(1, 17))
ADV, BENIGN = pb.VERDICT_ADVERSARIAL, pb.VERDICT_BENIGN
RELEASE, DROP = pb.VERDICT_ACTION_RELEASE, pb.VERDICT_ACTION_DROP
CORRECT = pb.VERDICT_ACTION_CORRECT


def entry(expires_at=None, verdict=ADV, action=DROP, score=0.5):
    return ResultEntry(verdict, action, None, score, expires_at)


# --- fingerprints ---


def test_fingerprint_is_16_bytes_and_stable():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    fp = fingerprint(a)
    assert isinstance(fp, bytes) and len(fp) == FINGERPRINT_BYTES
    assert fingerprint(a) == fp
    assert fingerprint(a.copy()) == fp
    assert fingerprint(np.arange(12, dtype=np.float32).reshape(3, 4)) == fp


def test_fingerprint_changes_with_any_single_element():
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    seen = {fingerprint(a)}
    for idx in np.ndindex(a.shape):
        b = a.copy()
        b[idx] = 1
        seen.add(fingerprint(b))
    assert len(seen) == a.size + 1


def test_fingerprint_changes_with_dtype_and_shape():
    a = np.arange(6, dtype=np.uint8)
    # Same raw bytes, other dtype / other shape.
    assert fingerprint(a) != fingerprint(a.view(np.int8))
    assert fingerprint(a) != fingerprint(a.reshape(2, 3))
    assert fingerprint(a.reshape(2, 3)) != fingerprint(a.reshape(3, 2))
    # Same values, other dtype; 0-d vs 1-d of one element.
    assert fingerprint(a.astype(np.float32)) != fingerprint(a.astype(np.float64))
    assert fingerprint(np.float32(1.0)) != fingerprint(np.array([1.0], dtype=np.float32))
    # Byte order is part of the dtype.
    assert fingerprint(a.astype("<u2")) != fingerprint(a.astype(">u2"))


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a[::-1],
    ],
)
def test_fingerprint_of_non_contiguous_equals_contiguous_copy(view):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    v = view(a)
    assert fingerprint(v) == fingerprint(np.ascontiguousarray(v))


def test_keyed_fingerprint():
    a = np.arange(5, dtype=np.int16)
    plain, k1, k2 = fingerprint(a), fingerprint(a, key=b"secret-1"), fingerprint(a, key=b"secret-2")
    assert len({plain, k1, k2}) == 3
    assert fingerprint(a, key=b"secret-1") == k1
    assert len(k1) == FINGERPRINT_BYTES


def test_fingerprint_rejects_object_arrays():
    with pytest.raises(TypeError):
        fingerprint(np.array([object()], dtype=object))


def test_fingerprint_batch_matches_per_sample():
    batch = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    fps = fingerprint_batch(batch)
    assert fps == [fingerprint(batch[i]) for i in range(5)]
    assert len(set(fps)) == 5
    # A non-contiguous batch gives the same as its contiguous copy.
    strided = batch[::2, :, :, ::-1]
    assert fingerprint_batch(strided) == fingerprint_batch(np.ascontiguousarray(strided))
    assert fingerprint_batch(batch, key=b"k") == [fingerprint(x, key=b"k") for x in batch]


_arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int8, np.float16, np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
)


@settings(max_examples=150, deadline=None)
@given(_arrays, _arrays)
def test_fingerprint_equal_iff_dtype_shape_and_bytes_equal(a, b):
    same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert (fingerprint(a) == fingerprint(b)) == same


# --- RT ---


def test_rt_miss_then_hit_counts():
    rt = ResultTable()
    k = ("m", FP_A, 3)
    assert rt.get(k, now=0.0) is None
    e = entry()
    rt.put(k, e)
    assert rt.get(k, now=1.0) is e
    assert rt.get(("m", FP_A, 4), now=1.0) is None  # other label
    assert rt.get(("n", FP_A, 3), now=1.0) is None  # other model
    s = rt.stats()
    assert (s.table, s.active_count, s.max_entries) == ("rt", 1, 100_000)
    assert (s.lookup_count, s.hit_count, s.eviction_count) == (4, 1, 0)


def test_rt_ttl_expiry_is_a_miss_and_drops_the_entry():
    rt = ResultTable()
    k = ("m", FP_A, 0)
    rt.put(k, entry(expires_at=10.0))
    assert rt.get(k, now=9.999) is not None
    assert rt.get(k, now=10.0) is None
    assert len(rt) == 0
    assert rt.get(k, now=5.0) is None  # dropped, not merely hidden
    assert rt.stats().hit_count == 1


def test_rt_lru_eviction_order_and_count():
    rt = ResultTable(max_entries=3)
    a, b, c, d, e = (("m", FP_A, i) for i in range(5))
    for k in (a, b, c):
        rt.put(k, entry())
    assert rt.get(a, now=0.0) is not None  # a becomes most recent: b is now LRU
    rt.put(d, entry())
    assert rt.get(b, now=0.0) is None
    assert [rt.get(k, now=0.0) is not None for k in (a, c, d)] == [True, True, True]
    rt.put(e, entry())  # LRU is a now (a, c, d were read in that order)
    assert rt.get(a, now=0.0) is None
    assert len(rt) == 3
    assert rt.stats().eviction_count == 2


def test_rt_replace_does_not_evict_and_refreshes_position():
    rt = ResultTable(max_entries=2)
    a, b, c = (("m", FP_A, i) for i in range(3))
    rt.put(a, entry(score=0.1))
    rt.put(b, entry())
    rt.put(a, entry(score=0.9))  # replace: a is most recent, nothing evicted
    assert rt.stats().eviction_count == 0
    rt.put(c, entry())  # evicts b
    assert rt.get(b, now=0.0) is None
    got = rt.get(a, now=0.0)
    assert got is not None and got.score == 0.9


def test_rt_delete_and_clear_per_model():
    rt = ResultTable()
    for m in ("m1", "m2"):
        for i in range(3):
            rt.put((m, FP_A, i), entry())
    assert rt.delete(("m1", FP_A, 0)) is True
    assert rt.delete(("m1", FP_A, 0)) is False
    rt.clear("m1")
    assert len(rt) == 3
    assert rt.entries("m1") == []
    assert [e.label for e in rt.entries("m2")] == [0, 1, 2]
    rt.clear()
    assert len(rt) == 0


def test_rt_entries_for_resync():
    rt = ResultTable()
    rt.put(("m", FP_A, 1), ResultEntry(ADV, CORRECT, 7, 0.75, None))
    rt.put(("m", FP_B, 2), ResultEntry(BENIGN, RELEASE, None, 0.25, 100.0))
    rt.put(("m", FP_B, 3), ResultEntry(BENIGN, RELEASE, None, 0.25, 10.0))
    rt.put(("other", FP_A, 1), entry())
    first, second, third = rt.entries("m")
    assert first == pb.LabelEntry(
        fingerprint=FP_A, label=1, verdict=ADV, action=CORRECT, corrected_label=7, score=0.75
    )
    assert (second.fingerprint, second.label, second.ttl_s) == (FP_B, 2, 1)  # no now: minimum
    assert third.ttl_s == 1
    assert not second.HasField("corrected_label")
    # With now: the remaining ttl (rounded up) and expired entries left out.
    live = rt.entries("m", now=20.5)
    assert [(e.label, e.ttl_s) for e in live] == [(1, 0), (2, 80)]


def test_result_entry_pb_round_trip():
    e = label_entry(FP_A, 4, ADV, corrected_label=2, score=0.5, ttl_s=30)
    r = ResultEntry.from_pb(e, now=100.0)
    assert r == ResultEntry(ADV, CORRECT, 2, 0.5, 130.0)
    assert r.to_pb(FP_A, 4, now=100.0) == e
    assert ResultEntry.from_pb(label_entry(FP_A, 4, ADV), now=1.0).expires_at is None
    assert ResultEntry.from_pb(label_entry(FP_A, 4, ADV), 1.0, default_ttl_s=5).expires_at == 6.0


def test_tables_reject_zero_capacity():
    with pytest.raises(ValueError):
        ResultTable(max_entries=0)
    with pytest.raises(ValueError):
        PendingTable(max_entries=0)


# --- FT ---


def test_ft_dedupe_joins_pending():
    ft = PendingTable()
    k = ("m", FP_A, 1)
    assert ft.begin(k, xid=7, now=1.0) is None  # caller sends the PKG_IN
    joined = ft.begin(k, xid=8, now=1.5)
    assert joined == Pending(xid=7, since=1.0, waiters=2)
    assert ft.begin(("m", FP_A, 2), xid=9, now=1.5) is None  # other label: own entry
    s = ft.stats()
    assert (s.table, s.active_count, s.lookup_count, s.hit_count) == ("ft", 2, 3, 1)


def test_ft_resolve():
    ft = PendingTable()
    k = ("m", FP_A, 1)
    ft.begin(k, xid=7, now=0.0)
    ft.begin(k, xid=8, now=0.0)
    assert ft.resolve(k) == Pending(xid=7, since=0.0, waiters=2)
    assert ft.resolve(k) is None
    assert len(ft) == 0
    assert ft.begin(k, xid=9, now=1.0) is None  # a later input asks again


def test_ft_evicts_oldest_when_full_without_raising():
    ft = PendingTable(max_entries=2)
    a, b, c = (("m", FP_A, i) for i in range(3))
    ft.begin(a, 1, now=0.0)
    ft.begin(b, 2, now=1.0)
    ft.begin(a, 3, now=2.0)  # joining does not make it younger
    assert ft.begin(c, 4, now=3.0) is None
    assert len(ft) == 2
    assert ft.resolve(a) is None  # the oldest went
    assert ft.resolve(b) is not None and ft.resolve(c) is not None
    assert ft.stats().eviction_count == 1


def test_ft_expire_and_clear():
    ft = PendingTable()
    keys = [("m", FP_A, i) for i in range(4)]
    for i, k in enumerate(keys):
        ft.begin(k, xid=i, now=float(i))
    assert ft.expire(now=3.0, max_age_s=2.0) == keys[:2]  # ages 3 and 2
    assert len(ft) == 2
    assert ft.expire(now=3.0, max_age_s=2.0) == []
    ft.begin(("n", FP_A, 0), xid=9, now=3.0)
    ft.clear("m")
    assert len(ft) == 1
    ft.clear()
    assert len(ft) == 0


# --- TABLE_MOD ---


def test_table_mod_add_ttl_and_default_ttl():
    t = LabelTables(rt=ResultTable(default_ttl_s=50.0))
    t.apply(
        rt_push(
            "m",
            [label_entry(FP_A, 1, ADV, ttl_s=10), label_entry(FP_B, 2, BENIGN, score=0.1)],
        ),
        now=100.0,
    )
    a = t.rt.get(("m", FP_A, 1), now=100.0)
    b = t.rt.get(("m", FP_B, 2), now=100.0)
    assert a == ResultEntry(ADV, DROP, None, 0.0, 110.0)
    assert b is not None and (b.verdict, b.action, b.expires_at) == (BENIGN, RELEASE, 150.0)
    assert t.rt.get(("m", FP_A, 1), now=110.0) is None

    no_default = LabelTables()
    no_default.apply(rt_push("m", [label_entry(FP_A, 1, ADV)]), now=0.0)
    got = no_default.rt.get(("m", FP_A, 1), now=1e9)
    assert got is not None and got.expires_at is None


def test_table_mod_add_replaces_same_key():
    t = LabelTables()
    t.apply(rt_push("m", [label_entry(FP_A, 1, BENIGN)]), now=0.0)
    t.apply(rt_push("m", [label_entry(FP_A, 1, ADV, score=0.9)]), now=0.0)
    assert len(t.rt) == 1
    got = t.rt.get(("m", FP_A, 1), now=0.0)
    assert got is not None and (got.verdict, got.score) == (ADV, pytest.approx(0.9))


def test_table_mod_delete_reads_only_fingerprint_and_label():
    t = LabelTables()
    t.apply(rt_push("m", [label_entry(FP_A, 1, ADV), label_entry(FP_A, 2, ADV)]), now=0.0)
    t.apply(
        pb.TableMod(
            table=pb.LABEL_TABLE_RT,
            command=pb.TABLE_MOD_COMMAND_DELETE,
            model_id="m",
            entries=[pb.LabelEntry(fingerprint=FP_A, label=1), pb.LabelEntry(fingerprint=FP_B)],
        ),
        now=0.0,
    )
    assert t.rt.get(("m", FP_A, 1), now=0.0) is None
    assert t.rt.get(("m", FP_A, 2), now=0.0) is not None


def test_table_mod_clear_rt_per_model_and_all():
    t = LabelTables()
    for m in ("m1", "m2"):
        t.apply(rt_push(m, [label_entry(FP_A, 1, ADV)]), now=0.0)
    clear = pb.TableMod(table=pb.LABEL_TABLE_RT, command=pb.TABLE_MOD_COMMAND_CLEAR)
    t.apply(pb.TableMod(table=clear.table, command=clear.command, model_id="m1"), now=0.0)
    assert t.rt.entries("m1") == [] and len(t.rt.entries("m2")) == 1
    t.apply(clear, now=0.0)
    assert len(t.rt) == 0


def test_table_mod_clear_ft():
    t = LabelTables()
    t.ft.begin(("m1", FP_A, 1), 1, now=0.0)
    t.ft.begin(("m2", FP_A, 1), 2, now=0.0)
    ft_clear = {"table": pb.LABEL_TABLE_FT, "command": pb.TABLE_MOD_COMMAND_CLEAR}
    t.apply(pb.TableMod(model_id="m1", **ft_clear), now=0.0)
    assert len(t.ft) == 1 and t.ft.resolve(("m2", FP_A, 1)) is not None
    t.ft.begin(("m3", FP_A, 1), 3, now=0.0)
    t.apply(pb.TableMod(**ft_clear), now=0.0)
    assert len(t.ft) == 0


def _mod(table=pb.LABEL_TABLE_RT, command=pb.TABLE_MOD_COMMAND_ADD, model_id="m", entries=None):
    if entries is None:
        entries = [label_entry(FP_A, 1, ADV)]
    return pb.TableMod(table=table, command=command, model_id=model_id, entries=entries)


_ERROR_CASES = {
    "table unspecified": (
        _mod(table=pb.LABEL_TABLE_UNSPECIFIED),
        pb.TABLE_MOD_FAILED_CODE_BAD_TABLE,
    ),
    "table unknown": (_mod(table=9), pb.TABLE_MOD_FAILED_CODE_BAD_TABLE),
    "command unspecified": (
        _mod(command=pb.TABLE_MOD_COMMAND_UNSPECIFIED),
        pb.TABLE_MOD_FAILED_CODE_BAD_COMMAND,
    ),
    "command unknown": (_mod(command=9), pb.TABLE_MOD_FAILED_CODE_BAD_COMMAND),
    "ft add": (_mod(table=pb.LABEL_TABLE_FT), pb.TABLE_MOD_FAILED_CODE_EPERM),
    "ft delete": (
        _mod(table=pb.LABEL_TABLE_FT, command=pb.TABLE_MOD_COMMAND_DELETE),
        pb.TABLE_MOD_FAILED_CODE_EPERM,
    ),
    "add no model": (_mod(model_id=""), pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY),
    "delete no model": (
        _mod(model_id="", command=pb.TABLE_MOD_COMMAND_DELETE),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "model too long": (
        _mod(model_id="é" * (MAX_ID_BYTES // 2 + 1)),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "clear model too long": (
        _mod(model_id="x" * (MAX_ID_BYTES + 1), command=pb.TABLE_MOD_COMMAND_CLEAR),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "fingerprint short": (
        _mod(entries=[label_entry(FP_A[:15], 1, ADV)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "fingerprint long": (
        _mod(entries=[label_entry(FP_A + b"x", 1, ADV)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "fingerprint empty": (
        _mod(entries=[label_entry(b"", 1, ADV)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "delete bad fingerprint": (
        _mod(command=pb.TABLE_MOD_COMMAND_DELETE, entries=[pb.LabelEntry(fingerprint=b"ab")]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "verdict unspecified": (
        _mod(entries=[label_entry(FP_A, 1, pb.VERDICT_UNSPECIFIED, action=DROP)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "verdict unknown-verdict": (
        _mod(entries=[label_entry(FP_A, 1, pb.VERDICT_UNKNOWN, action=DROP)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "verdict out of enum": (
        _mod(entries=[label_entry(FP_A, 1, 42, action=DROP)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "action unspecified": (
        _mod(entries=[label_entry(FP_A, 1, ADV, action=pb.VERDICT_ACTION_UNSPECIFIED)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "action unknown": (
        _mod(entries=[label_entry(FP_A, 1, ADV, action=9)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
    "correct without label": (
        _mod(entries=[label_entry(FP_A, 1, ADV, action=CORRECT)]),
        pb.TABLE_MOD_FAILED_CODE_BAD_ENTRY,
    ),
}


@pytest.mark.parametrize("case", sorted(_ERROR_CASES))
def test_table_mod_errors(case):
    mod, code = _ERROR_CASES[case]
    t = LabelTables()
    with pytest.raises(ProtocolError) as info:
        t.apply(mod, now=0.0)
    assert info.value.error_type == pb.ERROR_TYPE_TABLE_MOD_FAILED
    assert info.value.code == code, info.value.name
    assert len(t.rt) == 0


def test_table_mod_boundaries_accepted():
    t = LabelTables()
    t.apply(_mod(model_id="x" * MAX_ID_BYTES), now=0.0)
    # corrected_label 0 is a real label: presence, not truthiness, counts.
    t.apply(_mod(entries=[label_entry(FP_A, 1, ADV, action=CORRECT, corrected_label=0)]), now=0.0)
    got = t.rt.get(("m", FP_A, 1), now=0.0)
    assert got is not None and (got.action, got.corrected_label) == (CORRECT, 0)
    t.apply(_mod(model_id="", command=pb.TABLE_MOD_COMMAND_CLEAR, entries=[]), now=0.0)
    assert len(t.rt) == 0


def _snapshot(t, models=("m", "other")):
    return (
        [t.rt.entries(m) for m in models],
        t.rt.stats(),
        t.ft.stats(),
    )


def test_failed_table_mod_leaves_tables_unchanged():
    t = LabelTables()
    t.apply(rt_push("m", [label_entry(FP_A, 1, ADV), label_entry(FP_A, 2, BENIGN)]), now=0.0)
    t.ft.begin(("m", FP_B, 0), 1, now=0.0)
    before = _snapshot(t)
    bad_add = rt_push(
        "m",
        [label_entry(FP_B, 5, ADV), label_entry(FP_A, 1, BENIGN), label_entry(b"short", 6, ADV)],
    )
    bad_delete = _mod(
        command=pb.TABLE_MOD_COMMAND_DELETE,
        entries=[pb.LabelEntry(fingerprint=FP_A, label=1), pb.LabelEntry(fingerprint=b"x")],
    )
    for mod in (bad_add, bad_delete):
        with pytest.raises(ProtocolError):
            t.apply(mod, now=1.0)
        assert _snapshot(t) == before


def test_builders():
    assert label_entry(FP_A, 1, ADV).action == DROP
    assert label_entry(FP_A, 1, BENIGN).action == RELEASE
    e = label_entry(FP_A, 1, ADV, corrected_label=3)
    assert (e.action, e.corrected_label) == (CORRECT, 3)
    assert label_entry(FP_A, 1, ADV, action=RELEASE).action == RELEASE
    assert not label_entry(FP_A, 1, ADV).HasField("corrected_label")
    mod = rt_push("m", [e])
    assert (mod.table, mod.command, mod.model_id) == (
        pb.LABEL_TABLE_RT,
        pb.TABLE_MOD_COMMAND_ADD,
        "m",
    )
    assert list(mod.entries) == [e]
    # Survives the wire.
    t = LabelTables()
    t.apply(pb.TableMod.FromString(mod.SerializeToString()), now=0.0)
    assert t.rt.get(("m", FP_A, 1), now=0.0) == ResultEntry(ADV, CORRECT, 3, 0.0, None)


# --- properties ---

_keys = st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([FP_A, FP_B]), st.integers(0, 2))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _keys, st.none() | st.floats(0.5, 5.0)),
        st.tuples(st.just("get"), _keys),
        st.tuples(st.just("delete"), _keys),
        st.tuples(st.just("clear"), st.none() | st.sampled_from(["a", "b"])),
        st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), _ops)
def test_result_table_matches_reference(max_entries, ops):
    rt = ResultTable(max_entries=max_entries)
    ref: dict = {}
    order: list = []  # least recently used first
    lookups = hits = evictions = 0
    now = 0.0
    for n, op in enumerate(ops):
        if op[0] == "put":
            _, key, ttl = op
            e = ResultEntry(ADV, DROP, None, float(n), None if ttl is None else now + ttl)
            rt.put(key, e)
            if key in ref:
                order.remove(key)
            elif len(ref) >= max_entries:
                del ref[order.pop(0)]
                evictions += 1
            ref[key] = e
            order.append(key)
        elif op[0] == "get":
            key = op[1]
            lookups += 1
            want = ref.get(key)
            if want is not None and want.expires_at is not None and now >= want.expires_at:
                del ref[key]
                order.remove(key)
                want = None
            elif want is not None:
                hits += 1
                order.remove(key)
                order.append(key)
            assert rt.get(key, now) is want
        elif op[0] == "delete":
            key = op[1]
            assert rt.delete(key) == (key in ref)
            if key in ref:
                del ref[key]
                order.remove(key)
        elif op[0] == "clear":
            rt.clear(op[1])
            for key in [k for k in order if op[1] is None or k[0] == op[1]]:
                del ref[key]
                order.remove(key)
        else:
            now += op[1]
        assert len(rt) == len(ref)
        for m in ("a", "b"):
            got = [(e.fingerprint, e.label) for e in rt.entries(m)]
            assert got == [(k[1], k[2]) for k in order if k[0] == m]
        s = rt.stats()
        assert (s.lookup_count, s.hit_count, s.eviction_count) == (lookups, hits, evictions)


def _mutated(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


_entries = st.builds(
    pb.LabelEntry,
    fingerprint=st.sampled_from([FP_A, FP_B, b"", FP_A[:15], FP_A + b"x"]),
    label=st.integers(0, 3),
    verdict=st.integers(0, 4),
    action=st.integers(0, 4),
    corrected_label=st.none() | st.integers(0, 3),
    score=st.floats(allow_nan=True, width=32),
    ttl_s=st.integers(0, 2**32 - 1),
)
_mods = st.builds(
    pb.TableMod,
    table=st.integers(0, 3),
    command=st.integers(0, 4),
    model_id=st.sampled_from(["", "m", "other", "é" * 200]),
    entries=st.lists(_entries, max_size=4),
)
_wire = st.one_of(
    st.binary(max_size=200),
    st.builds(
        _mutated,
        _mods.map(lambda m: m.SerializeToString()),
        st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=3),
    ),
)


def _fresh_tables() -> LabelTables:
    t = LabelTables(rt=ResultTable(max_entries=64), ft=PendingTable(max_entries=8))
    t.apply(rt_push("m", [label_entry(FP_A, 0, ADV), label_entry(FP_B, 1, BENIGN)]), now=0.0)
    t.ft.begin(("m", FP_A, 3), 1, now=0.0)
    return t


@settings(max_examples=300, deadline=None)
@given(_wire)
def test_apply_on_arbitrary_bytes_raises_only_protocol_error(data):
    try:
        mod = pb.TableMod.FromString(data)
    except DecodeError:
        return
    t = _fresh_tables()
    before = _snapshot(t)
    try:
        t.apply(mod, now=1.0)
    except ProtocolError as err:
        assert err.error_type == pb.ERROR_TYPE_TABLE_MOD_FAILED
        assert _snapshot(t) == before


@settings(max_examples=300, deadline=None)
@given(_mods)
def test_apply_is_all_or_nothing(mod):
    t = _fresh_tables()
    before = _snapshot(t)
    try:
        t.apply(mod, now=1.0)
    except ProtocolError as err:
        assert err.error_type == pb.ERROR_TYPE_TABLE_MOD_FAILED
        assert _snapshot(t) == before
        return
    if mod.table == pb.LABEL_TABLE_RT and mod.command == pb.TABLE_MOD_COMMAND_ADD:
        last = {(e.fingerprint, e.label): e for e in mod.entries}  # last one wins
        for (fp, label), e in last.items():
            got = t.rt.get((mod.model_id, fp, label), now=1.0)
            assert got is not None and got.verdict == e.verdict and got.action == e.action
            assert got.expires_at == (1.0 + e.ttl_s if e.ttl_s else None)
            assert math.isnan(got.score) or got.score == pytest.approx(e.score)
