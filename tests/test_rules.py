"""Tests for openexample.rules: unit tests, then property tests against a naive model."""

import math

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openexample import rules as R
from openexample.errors import ProtocolError
from openexample.limits import MAX_ID_BYTES, MAX_PRIORITY
from openexample.v1 import openexample_pb2 as pb

C = pb.VigilanceModFailedCode
MISS = R.RuleActions.from_pb([R.inspect(350)])
NAN = float("nan")


def table(**kw):
    return R.RuleTable(MISS, **kw)


def mod(command, **kw):
    if command in ("add", "modify", "modify_strict") and "actions" not in kw:
        kw["actions"] = [R.drop()]
    return R.vigilance_mod(command, **kw)


def add(t, now=0.0, **kw):
    return t.apply(mod("add", **kw), now)


def m(**kw):
    return pb.Match(**kw)


def refused(t, a_mod, now=0.0):
    """The code a refused mod gets, after checking it left the table unchanged."""
    before = full_state(t)
    with pytest.raises(ProtocolError) as e:
        t.apply(a_mod, now)
    assert e.value.error_type == pb.ERROR_TYPE_VIGILANCE_MOD_FAILED
    assert full_state(t) == before
    return e.value.code


def full_state(t):
    """Everything observable about a table, rule by rule, in lookup order."""
    rows = [
        (
            r.priority,
            r.match,
            r.actions,
            r.cookie,
            r.flags,
            r.idle_timeout_s,
            r.hard_timeout_s,
            r.installed_at,
            r.last_matched_at,
            r.match_count,
        )
        for r in t
    ]
    return rows, t.table_stats().SerializeToString()


def config(t):
    """What a snapshot is meant to carry: no counters, no timers."""
    return [
        (r.priority, r.match, r.actions, r.cookie, r.flags, r.idle_timeout_s, r.hard_timeout_s)
        for r in t
    ]


def look(t, model="a", source="x", label=0, conf=0.5, now=0.0):
    return t.lookup(model, source, label, conf, now)


# --- matching ------------------------------------------------------------------------


def test_fresh_table_holds_only_the_table_miss():
    t = table(max_rules=10)
    assert len(t) == 1
    (miss,) = list(t)
    assert miss.is_table_miss and miss.actions == MISS and miss.match == R.WILDCARD
    assert look(t, "anything", "", 7, NAN) is miss
    ts = t.table_stats()
    assert (ts.table, ts.active_count, ts.max_entries) == ("rules", 1, 11)
    assert (ts.lookup_count, ts.hit_count, ts.eviction_count) == (1, 0, 0)


def test_higher_priority_wins():
    t = table()
    add(t, match=m(model_id="a"), priority=10, actions=[R.drop()])
    add(t, match=m(model_id="a"), priority=20, actions=[R.allow()])
    add(t, match=m(model_id="a"), priority=15, actions=[R.mirror()])
    assert look(t, "a").priority == 20
    assert look(t, "b").is_table_miss
    assert [r.priority for r in t] == [20, 15, 10, 0]


def test_equal_priority_first_installed_wins_and_replace_reinstalls():
    t = table()
    add(t, match=m(model_id="a"), priority=5, cookie=1)
    add(t, match=m(label=0), priority=5, cookie=2)
    assert look(t, "a", label=0).cookie == 1
    # Re-ADD of the first one: a new install, so it now comes second.
    add(t, match=m(model_id="a"), priority=5, cookie=3)
    assert look(t, "a", label=0).cookie == 2
    assert [r.cookie for r in t] == [2, 3, 0]


def test_priority_zero_rule_is_not_shadowed_by_the_table_miss():
    t = table()
    add(t, match=m(model_id="a"), priority=0, actions=[R.allow()])
    assert look(t, "a").actions.verdict_source == R.ALLOW
    assert look(t, "b").is_table_miss
    assert list(t)[-1].is_table_miss


@pytest.mark.parametrize(
    ("field", "value", "hit", "miss"),
    [
        ("model_id", "a", {"model": "a"}, {"model": "b"}),
        ("source_id", "x", {"source": "x"}, {"source": "y"}),
        ("label", 3, {"label": 3}, {"label": 4}),
    ],
)
def test_each_exact_field_filters_only_itself(field, value, hit, miss):
    t = table()
    add(t, match=m(**{field: value}), priority=1, actions=[R.allow()])
    base = {"model": "q", "source": "w", "label": 9, "conf": 0.5}
    for other in ({"conf": 0.0}, {"conf": NAN}, {"conf": -5.0}, {}):
        assert look(t, **{**base, **other, **hit}).priority == 1
    assert look(t, **{**base, **miss}).is_table_miss


def test_confidence_bounds_are_inclusive():
    t = table()
    add(t, match=m(confidence_min=0.25, confidence_max=0.75), priority=1)
    for c in (0.25, 0.5, 0.75):
        assert look(t, conf=c).priority == 1, c
    for c in (0.2499, 0.7501, -math.inf, math.inf):
        assert look(t, conf=c).is_table_miss, c


def test_half_open_confidence_ranges():
    lo = R.RuleMatch.from_pb(m(confidence_min=0.5))
    hi = R.RuleMatch.from_pb(m(confidence_max=0.5))
    assert lo.matches("a", "x", 0, 1e9) and not lo.matches("a", "x", 0, 0.49)
    assert hi.matches("a", "x", 0, -1e9) and not hi.matches("a", "x", 0, 0.51)
    assert lo.matches("a", "x", 0, 0.5) and hi.matches("a", "x", 0, 0.5)


def test_nan_confidence_never_matches_a_ranged_rule():
    t = table()
    add(t, match=m(confidence_min=0.0), priority=3)
    add(t, match=m(confidence_max=1.0), priority=2)
    add(t, match=m(confidence_min=0.0, confidence_max=1.0), priority=1)
    assert look(t, conf=NAN).is_table_miss
    assert look(t, conf=0.5).priority == 3
    add(t, match=m(model_id="a"), priority=1)  # unranged: NaN is fine
    assert look(t, "a", conf=NAN).priority == 1


def test_covers_and_overlaps():
    def rm(**kw):
        return R.RuleMatch.from_pb(m(**kw))

    wide, a = rm(), rm(model_id="a")
    a0, a_lo = rm(model_id="a", label=0), rm(model_id="a", confidence_max=0.5)
    assert wide.covers(a) and a.covers(a0) and a.covers(a_lo) and a.covers(a)
    assert not a.covers(wide) and not a0.covers(a) and not a_lo.covers(a)
    assert not rm(model_id="b").covers(a)
    assert not rm(confidence_min=0.0, confidence_max=1.0).covers(rm(confidence_min=0.5))
    assert rm(confidence_min=0.0).covers(rm(confidence_min=0.5, confidence_max=0.6))
    assert a.overlaps(rm(label=3)) and a.overlaps(wide) and not a.overlaps(rm(model_id="b"))
    assert rm(confidence_max=0.5).overlaps(rm(confidence_min=0.5))  # touching: 0.5 is in both
    assert not rm(confidence_max=0.25).overlaps(rm(confidence_min=0.5))
    assert not a0.overlaps(rm(label=1))


@pytest.mark.parametrize(
    "bad",
    [
        m(confidence_min=NAN),
        m(confidence_max=NAN),
        m(confidence_min=math.inf),
        m(confidence_max=-math.inf),
        m(confidence_min=0.6, confidence_max=0.5),
        m(model_id="a" * (MAX_ID_BYTES + 1)),
        m(source_id="é" * (MAX_ID_BYTES // 2 + 1)),  # short in chars, long in utf-8
    ],
)
def test_bad_matches_are_refused(bad):
    t = table()
    assert refused(t, mod("add", match=bad)) == C.Value("VIGILANCE_MOD_FAILED_CODE_BAD_MATCH")
    assert refused(t, mod("delete", match=bad)) == C.Value("VIGILANCE_MOD_FAILED_CODE_BAD_MATCH")


def test_edge_matches_are_accepted_and_round_trip():
    for good in (
        m(model_id="a" * MAX_ID_BYTES, source_id="é" * (MAX_ID_BYTES // 2)),
        m(confidence_min=0.5, confidence_max=0.5),
        m(label=0, confidence_min=-3.0),
        m(),
    ):
        rm = R.RuleMatch.from_pb(good)
        assert rm.to_pb() == good
        assert hash(rm) == hash(R.RuleMatch.from_pb(good))


# --- actions -------------------------------------------------------------------------

SECURE = pb.FAIL_MODE_SECURE


@pytest.mark.parametrize(
    "actions",
    [
        [],
        [pb.Action()],
        [R.allow(), R.drop()],
        [R.inspect(350), R.allow()],
        [R.inspect(350), R.mirror()],
        [R.inspect(350), R.sample(0.5)],
        [R.mirror(), R.sample(0.5)],
        [R.allow(), R.allow()],
        [R.mirror(), R.mirror()],
        [R.inspect(0)],
        [R.inspect(R.MAX_BUDGET_US + 1)],
        [R.inspect(350, pb.FAIL_MODE_UNSPECIFIED)],
        [R.inspect(350, 7)],
        [R.sample(0.0)],
        [R.sample(-0.25)],
        [R.sample(1.5)],
        [R.sample(NAN)],
        [R.sample(math.inf)],
    ],
)
def test_bad_actions_are_refused(actions):
    t = table()
    add(t, match=m(model_id="a"), priority=1)
    bad = C.Value("VIGILANCE_MOD_FAILED_CODE_BAD_ACTION")
    assert refused(t, mod("add", actions=actions)) == bad
    assert refused(t, mod("modify", actions=actions)) == bad
    strict = mod("modify_strict", match=m(model_id="a"), priority=1, actions=actions)
    assert refused(t, strict) == bad


@pytest.mark.parametrize(
    ("actions", "expected"),
    [
        ([R.allow()], R.RuleActions(R.ALLOW)),
        ([R.drop()], R.RuleActions(R.DROP)),
        ([R.mirror()], R.RuleActions(R.ALLOW, mirror=True)),
        ([R.allow(), R.mirror()], R.RuleActions(R.ALLOW, mirror=True)),
        ([R.sample(0.5)], R.RuleActions(R.ALLOW, sample_p=0.5)),
        ([R.sample(1.0), R.drop()], R.RuleActions(R.DROP, sample_p=1.0)),
        ([R.mirror(), R.drop()], R.RuleActions(R.DROP, mirror=True)),
        ([R.inspect(R.MAX_BUDGET_US, "secure")], R.RuleActions(R.INSPECT, R.MAX_BUDGET_US, SECURE)),
        ([R.inspect(1)], R.RuleActions(R.INSPECT, 1, pb.FAIL_MODE_STANDALONE)),
    ],
)
def test_actions_compile_and_round_trip(actions, expected):
    compiled = R.RuleActions.from_pb(actions)
    assert compiled == expected
    assert R.RuleActions.from_pb(compiled.to_pb()) == compiled


def test_table_canonicalizes_and_validates_its_miss_actions():
    t = R.RuleTable(R.RuleActions(R.ALLOW, sample_p=0.1))
    assert t.miss_actions.sample_p == pytest.approx(0.1) and t.miss_actions.sample_p != 0.1
    with pytest.raises(ProtocolError):
        R.RuleTable(R.RuleActions(R.INSPECT, budget_us=0))


def test_builders():
    assert R.parse_fail_mode("Secure") == SECURE
    assert R.parse_fail_mode(" FAIL_MODE_STANDALONE ") == pb.FAIL_MODE_STANDALONE
    with pytest.raises(ProtocolError):
        R.parse_fail_mode("open")
    assert R.inspect(9, "secure").inspect == pb.Inspect(budget_us=9, fail_mode=SECURE)
    vm = R.vigilance_mod("modify_strict", match=R.RuleMatch(label=2), cookie=5, flags=1)
    assert vm.command == pb.VIGILANCE_MOD_COMMAND_MODIFY_STRICT
    assert vm.priority == R.DEFAULT_PRIORITY and vm.match.label == 2 and vm.cookie == 5
    assert R.vigilance_mod(pb.VIGILANCE_MOD_COMMAND_DELETE).command == 4
    with pytest.raises(ProtocolError):
        R.vigilance_mod("explode")


# --- ADD -----------------------------------------------------------------------------


def test_add_replace_keeps_counters_and_takes_new_fields():
    t = table()
    add(t, now=1.0, match=m(model_id="a"), priority=4, cookie=1, idle_timeout_s=9)
    for _ in range(3):
        look(t, "a", now=2.0)
    notices = add(
        t,
        now=5.0,
        match=m(model_id="a"),
        priority=4,
        cookie=2,
        hard_timeout_s=7,
        flags=R.SEND_REMOVED,
        actions=[R.allow()],
    )
    assert notices == []  # a replaced entry sends no notice, even with SEND_REMOVED
    assert len(t) == 2
    r = next(iter(t))
    assert (r.cookie, r.idle_timeout_s, r.hard_timeout_s, r.flags) == (2, 0, 7, R.SEND_REMOVED)
    assert r.actions == R.RuleActions(R.ALLOW) and r.installed_at == 5.0 and r.match_count == 3


def test_add_replace_with_reset_counts_clears_them():
    t = table()
    add(t, match=m(model_id="a"), priority=4)
    look(t, "a")
    add(t, match=m(model_id="a"), priority=4, flags=R.RESET_COUNTS)
    assert next(iter(t)).match_count == 0
    # Same match at another priority is a different entry, not a replacement.
    add(t, match=m(model_id="a"), priority=5)
    assert len(t) == 3


def test_check_overlap():
    t = table()
    add(t, match=m(model_id="a"), priority=4, cookie=1)
    overlap = C.Value("VIGILANCE_MOD_FAILED_CODE_OVERLAP")
    assert refused(t, mod("add", match=m(label=1), priority=4, flags=R.CHECK_OVERLAP)) == overlap
    # Not refused: other priority, disjoint match, identical match (a replace), no flag.
    add(t, match=m(label=1), priority=5, flags=R.CHECK_OVERLAP)
    add(t, match=m(model_id="b"), priority=4, flags=R.CHECK_OVERLAP)
    add(t, match=m(model_id="a"), priority=4, cookie=2, flags=R.CHECK_OVERLAP)
    add(t, match=m(label=1), priority=4)
    assert [r.cookie for r in t if r.priority == 4] == [0, 2, 0]  # b, a (re-added), label
    # The table-miss overlaps every priority-0 rule.
    assert (
        refused(t, mod("add", match=m(model_id="z"), priority=0, flags=R.CHECK_OVERLAP)) == overlap
    )


def test_table_full_counts_rules_but_not_the_table_miss():
    t = table(max_rules=2)
    add(t, match=m(label=1), priority=1)
    add(t, match=m(label=2), priority=1)
    full = C.Value("VIGILANCE_MOD_FAILED_CODE_TABLE_FULL")
    assert refused(t, mod("add", match=m(label=3), priority=1)) == full
    add(t, match=m(label=2), priority=1, cookie=9)  # replacing is fine when full
    add(t, priority=0, actions=[R.drop()])  # so is replacing the table-miss
    assert len(t) == 3 and t.table_stats().active_count == 3
    t.apply(mod("delete", match=m(label=1)), 0.0)
    add(t, match=m(label=3), priority=1)
    assert R.RuleTable(MISS, max_rules=0).apply(mod("add", priority=0), 0.0) == []


# --- MODIFY --------------------------------------------------------------------------


def _three():
    t = table()
    add(t, now=1.0, match=m(model_id="a"), priority=1, cookie=0x11, hard_timeout_s=50)
    add(t, now=1.0, match=m(model_id="a", label=1), priority=2, cookie=0x12, flags=R.SEND_REMOVED)
    add(t, now=1.0, match=m(model_id="b"), priority=3, cookie=0x21)
    look(t, "a", label=1)
    look(t, "a", label=2)
    return t


def _verdicts(t):
    return {r.cookie: r.actions.verdict_source for r in t}


def test_modify_changes_actions_of_every_covered_entry_only():
    t = _three()
    before = full_state(t)[0]
    assert t.apply(mod("modify", match=m(model_id="a"), priority=999, actions=[R.allow()]), 9) == []
    assert _verdicts(t) == {0x11: R.ALLOW, 0x12: R.ALLOW, 0x21: R.DROP, 0: R.INSPECT}
    after = full_state(t)[0]
    # Only the actions changed: cookie, flags, timeouts, installed_at, counters kept.
    for b, a in zip(before, after, strict=True):
        assert b[:2] + b[3:] == a[:2] + a[3:]
    assert [r.match_count for r in t] == [0, 1, 1, 0]


def test_modify_with_reset_counts_and_cookie_filter():
    t = _three()
    t.apply(
        mod(
            "modify",
            match=m(model_id="a"),
            cookie=0x02,
            cookie_mask=0x0F,
            actions=[R.mirror()],
            flags=R.RESET_COUNTS,
        ),
        0,
    )
    assert _verdicts(t)[0x12] == R.ALLOW and _verdicts(t)[0x11] == R.DROP
    assert {r.cookie: r.match_count for r in t}[0x12] == 0
    assert {r.cookie: r.match_count for r in t}[0x11] == 1


def test_modify_without_a_target_adds_nothing():
    t = _three()
    before = full_state(t)
    t.apply(mod("modify", match=m(model_id="zzz")), 0)
    t.apply(mod("modify_strict", match=m(model_id="a"), priority=7), 0)
    assert full_state(t) == before


def test_modify_strict_needs_exact_match_and_priority():
    t = _three()
    t.apply(mod("modify_strict", match=m(model_id="a"), priority=2, actions=[R.allow()]), 0)
    assert _verdicts(t)[0x11] == R.DROP
    t.apply(
        mod(
            "modify_strict",
            match=m(model_id="a"),
            priority=1,
            cookie=0x99,
            cookie_mask=0xFF,
            actions=[R.allow()],
        ),
        0,
    )
    assert _verdicts(t)[0x11] == R.DROP  # cookie filter applies to strict too
    t.apply(mod("modify_strict", match=m(model_id="a"), priority=1, actions=[R.allow()]), 0)
    assert _verdicts(t) == {0x11: R.ALLOW, 0x12: R.DROP, 0x21: R.DROP, 0: R.INSPECT}


def test_modify_of_everything_reaches_the_table_miss():
    t = _three()
    t.apply(mod("modify", actions=[R.allow()]), 0)
    assert set(_verdicts(t).values()) == {R.ALLOW}
    t.apply(mod("modify_strict", priority=0, actions=[R.drop()]), 0)
    assert list(t)[-1].actions == R.RuleActions(R.DROP)


# --- DELETE --------------------------------------------------------------------------


def test_delete_covered_entries_with_cookie_mask_and_notices():
    t = _three()
    out = t.apply(mod("delete", match=m(model_id="a"), cookie=0x10, cookie_mask=0xF0), 4.5)
    assert [r.cookie for r in t] == [0x21, 0]
    # Only the SEND_REMOVED entry (cookie 0x12) reports, with its details.
    (n,) = out
    assert n.reason == pb.REMOVED_REASON_DELETE and n.cookie == 0x12 and n.priority == 2
    assert n.match == m(model_id="a", label=1) and n.duration_s == 3.5 and n.match_count == 1
    assert (n.idle_timeout_s, n.hard_timeout_s) == (0, 0)


def test_delete_cookie_mask_excludes_mismatches():
    t = _three()
    assert t.apply(mod("delete", cookie=0x20, cookie_mask=0xF0), 0) == []
    assert [r.cookie for r in t] == [0x12, 0x11, 0]
    assert t.apply(mod("delete", cookie=0x01, cookie_mask=0x0F), 0) == []
    assert [r.cookie for r in t] == [0x12, 0]


def test_delete_strict_needs_exact_match_and_priority():
    t = _three()
    assert t.apply(mod("delete_strict", match=m(model_id="a"), priority=2), 0) == []
    assert t.apply(mod("delete_strict", match=m(model_id="a", label=1), priority=3), 0) == []
    assert len(t) == 4
    (n,) = t.apply(mod("delete_strict", match=m(model_id="a", label=1), priority=2), 0)
    assert n.cookie == 0x12 and len(t) == 3


def test_delete_all_resets_the_table_miss_silently():
    t = table()
    add(t, now=1.0, priority=0, cookie=7, flags=R.SEND_REMOVED, actions=[R.drop()])
    add(t, now=1.0, match=m(label=1), priority=3, flags=R.SEND_REMOVED)
    look(t, "a", label=5)
    out = t.apply(mod("delete"), 2.0)
    assert [n.priority for n in out] == [3]
    (miss,) = list(t)
    assert miss.is_table_miss and miss.actions == MISS and miss.cookie == 0 and miss.flags == 0
    assert (miss.match_count, miss.installed_at) == (0, 2.0)
    add(t, priority=0, actions=[R.allow()])
    assert t.apply(mod("delete_strict", priority=0), 3.0) == []
    assert next(iter(t)).actions == MISS


def test_table_miss_cannot_time_out():
    t = table()
    eperm = C.Value("VIGILANCE_MOD_FAILED_CODE_EPERM")
    assert refused(t, mod("add", priority=0, idle_timeout_s=5)) == eperm
    assert refused(t, mod("add", priority=0, hard_timeout_s=5)) == eperm
    add(t, match=m(label=1), priority=0, hard_timeout_s=5)  # a normal priority-0 rule may


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_mod", "code"),
    [
        (pb.VigilanceMod(actions=[R.allow()]), "BAD_COMMAND"),
        (pb.VigilanceMod(command=99, actions=[R.allow()]), "BAD_COMMAND"),
        (mod("add", priority=MAX_PRIORITY + 1), "BAD_PRIORITY"),
        (mod("delete", priority=2**32 - 1), "BAD_PRIORITY"),
        (mod("add", flags=8), "BAD_FLAGS"),
        (mod("modify", flags=1 << 31), "BAD_FLAGS"),
        (mod("delete_strict", match=m(confidence_min=NAN)), "BAD_MATCH"),
        (mod("add", actions=[]), "BAD_ACTION"),
        (mod("modify_strict", actions=[R.drop(), R.allow()]), "BAD_ACTION"),
        (mod("add", priority=0, hard_timeout_s=1), "EPERM"),
        (mod("add", match=m(model_id="a"), priority=1, flags=R.CHECK_OVERLAP), "OVERLAP"),
        (mod("add", match=m(model_id="c"), priority=1), "TABLE_FULL"),
        # Order of checks: the earlier problem is the one reported.
        (pb.VigilanceMod(priority=MAX_PRIORITY + 1, flags=8), "BAD_COMMAND"),
        (mod("add", priority=MAX_PRIORITY + 1, flags=8), "BAD_PRIORITY"),
        (mod("add", flags=8, match=m(confidence_min=NAN)), "BAD_FLAGS"),
        (mod("add", match=m(confidence_min=NAN), actions=[]), "BAD_MATCH"),
        (mod("add", priority=0, hard_timeout_s=1, actions=[]), "BAD_ACTION"),
    ],
)
def test_every_error_path_leaves_the_table_unchanged(a_mod, code):
    t = table(max_rules=2)
    add(t, match=m(label=1), priority=1, flags=R.SEND_REMOVED)
    add(t, match=m(label=2), priority=1)
    look(t, "a", label=1, now=0.5)
    assert refused(t, a_mod, now=3.0) == C.Value(f"VIGILANCE_MOD_FAILED_CODE_{code}")


def test_delete_ignores_actions_and_timeouts():
    t = _three()
    t.apply(mod("delete", match=m(model_id="b"), actions=[pb.Action()], hard_timeout_s=3), 0)
    assert [r.cookie for r in t] == [0x12, 0x11, 0]


# --- timeouts ------------------------------------------------------------------------


def test_idle_timeout_is_pushed_back_by_matches():
    t = table()
    add(t, now=10.0, match=m(model_id="a"), priority=1, idle_timeout_s=5, flags=R.SEND_REMOVED)
    assert t.next_expiry() == 15.0
    look(t, "a", now=13.0)
    look(t, "b", now=14.0)  # matched the table-miss: does not refresh the rule
    assert t.next_expiry() == 18.0
    assert t.expire(17.999) == [] and len(t) == 2
    (n,) = t.expire(18.0)
    assert n.reason == pb.REMOVED_REASON_IDLE_TIMEOUT and n.duration_s == 8.0
    assert n.match_count == 1 and n.idle_timeout_s == 5
    assert len(t) == 1 and t.next_expiry() is None


def test_hard_timeout_ignores_matches():
    t = table()
    add(t, now=1.0, match=m(model_id="a"), priority=1, hard_timeout_s=3, flags=R.SEND_REMOVED)
    for now in (1.5, 2.5, 3.5):
        look(t, "a", now=now)
    assert t.expire(3.99) == []
    (n,) = t.expire(4.0)
    assert n.reason == pb.REMOVED_REASON_HARD_TIMEOUT and n.duration_s == 3.0
    assert n.match_count == 3


def test_hard_wins_when_both_timeouts_have_passed():
    t = table()
    add(t, match=m(label=1), priority=1, idle_timeout_s=2, hard_timeout_s=6, flags=1)
    add(t, match=m(label=2), priority=1, idle_timeout_s=2, hard_timeout_s=6, flags=0)
    add(t, match=m(label=3), priority=1, idle_timeout_s=50, hard_timeout_s=60, flags=1)
    assert t.next_expiry() == 2.0
    out = t.expire(10.0)  # idle passed at 2, hard at 6: reported as HARD
    assert [(n.match.label, n.reason) for n in out] == [(1, pb.REMOVED_REASON_HARD_TIMEOUT)]
    assert [r.match.label for r in t] == [3, None]
    assert t.next_expiry() == 50.0


def test_idle_fires_before_hard_when_due_first():
    t = table()
    add(t, match=m(label=1), priority=1, idle_timeout_s=2, hard_timeout_s=6, flags=1)
    (n,) = t.expire(2.0)
    assert n.reason == pb.REMOVED_REASON_IDLE_TIMEOUT


def test_replace_restarts_timers_and_modify_does_not():
    t = table()
    add(t, now=0.0, match=m(label=1), priority=1, hard_timeout_s=5)
    t.apply(mod("modify", match=m(label=1), actions=[R.allow()]), 4.0)
    assert t.next_expiry() == 5.0
    add(t, now=4.0, match=m(label=1), priority=1, hard_timeout_s=5)
    assert t.next_expiry() == 9.0
    assert t.expire(8.0) == [] and len(t) == 2


# --- stats, snapshot -----------------------------------------------------------------


def test_rule_stats_filters_and_fields():
    t = _three()
    everything = t.stats(now=11.0)
    assert [s.cookie for s in everything] == [0x21, 0x12, 0x11, 0]
    s = everything[2]
    assert s.priority == 1 and s.match == m(model_id="a") and s.duration_s == 10.0
    assert s.hard_timeout_s == 50 and s.match_count == 1 and list(s.actions) == [R.drop()]
    assert everything[1].flags == R.SEND_REMOVED
    assert [s.cookie for s in t.stats(m(model_id="a"))] == [0x12, 0x11]
    assert [s.cookie for s in t.stats(m(model_id="a", label=1))] == [0x12]
    assert [s.cookie for s in t.stats(cookie=0x20, cookie_mask=0xF0)] == [0x21]
    assert [s.cookie for s in t.stats(m(model_id="a"), 0x1, 0xF)] == [0x11]
    assert t.stats(m(label=7)) == []
    with pytest.raises(ProtocolError) as e:
        t.stats(m(confidence_min=NAN))
    assert (e.value.error_type, e.value.code) == (
        pb.ERROR_TYPE_BAD_REQUEST,
        pb.BAD_REQUEST_CODE_BAD_FIELD,
    )


def test_lookup_counters():
    t = _three()  # made two lookups, both hits
    r = look(t, "b", now=7.0)
    look(t, "q")
    assert r.match_count == 1 and r.last_matched_at == 7.0
    ts = t.table_stats()
    assert (ts.lookup_count, ts.hit_count, ts.active_count, ts.max_entries) == (4, 3, 4, 4097)


def test_snapshot_replays_into_an_equal_table():
    t = table(max_rules=5)
    add(t, priority=0, actions=[R.allow()], cookie=3, flags=R.CHECK_OVERLAP)
    add(t, match=m(label=1), priority=0, actions=[R.mirror(), R.drop()])
    add(t, match=m(model_id="a"), priority=9, idle_timeout_s=4, flags=R.SEND_REMOVED)
    add(t, match=m(label=2), priority=9, hard_timeout_s=8, cookie=2**64 - 1)
    add(t, match=m(confidence_min=0.25, source_id="s"), priority=9, actions=[R.sample(0.125)])
    add(t, match=m(model_id="a"), priority=9, idle_timeout_s=4, cookie=5)  # moves to last
    mods = t.snapshot()
    assert all(x.command == pb.VIGILANCE_MOD_COMMAND_ADD for x in mods)
    fresh = table(max_rules=5)
    for x in mods:
        fresh.apply(pb.VigilanceMod.FromString(x.SerializeToString()), 100.0)
    assert config(fresh) == config(t)
    assert [r.cookie for r in fresh if r.priority == 9] == [2**64 - 1, 0, 5]


def test_a_replay_at_now_keeps_hard_deadlines_and_drops_expired_rules():
    t = table()
    add(t, now=0.0, match=m(label=1), hard_timeout_s=30, cookie=1)
    add(t, now=0.0, match=m(label=2), hard_timeout_s=5, cookie=2)
    add(t, now=0.0, match=m(label=3), idle_timeout_s=7, cookie=3)
    rule = t.get(R.DEFAULT_PRIORITY, R.RuleMatch(label=1))
    assert [rule.remaining_hard_s(x) for x in (0.0, 20.0, 29.5, 30.0, 31.0)] == [30, 10, 1, 0, 0]
    assert rule.to_mod().hard_timeout_s == 30  # without now: as given
    replay = t.snapshot(now=20.0)  # label=2 has expired (not yet removed by expire)
    assert [(x.cookie, x.hard_timeout_s, x.idle_timeout_s) for x in replay] == [
        (0, 0, 0),
        (1, 10, 0),
        (3, 0, 7),  # idle timers restart where the replay lands
    ]
    with pytest.raises(ValueError, match="expired"):
        t.get(R.DEFAULT_PRIORITY, R.RuleMatch(label=2)).to_mod(20.0)


def test_restore_keeps_the_install_time_and_restarts_the_idle_timer():
    t = table()
    x = mod("add", match=m(label=1), hard_timeout_s=30, idle_timeout_s=10, cookie=1)
    rule = t.restore(x, installed_at=-20.0, now=5.0)
    assert (rule.installed_at, rule.last_matched_at) == (-20.0, 5.0)
    assert rule.deadlines() == (10.0, 15.0)
    assert t.expire(9.9) == [] and len(t) == 2
    t.expire(10.0)
    assert len(t) == 1
    with pytest.raises(ProtocolError) as err:
        t.restore(mod("delete"), 0.0, 0.0)
    assert err.value.code == C.VIGILANCE_MOD_FAILED_CODE_BAD_COMMAND
    with pytest.raises(ProtocolError):  # validated as apply() validates
        t.restore(mod("add", priority=MAX_PRIORITY + 1), 0.0, 0.0)


@pytest.mark.parametrize(
    "text, want",
    [
        ("", pb.Match()),
        ("model=m,source=s", pb.Match(model_id="m", source_id="s")),
        ("label=3,confidence=0:0.5", pb.Match(label=3, confidence_min=0.0, confidence_max=0.5)),
        ("confidence=:0.25", pb.Match(confidence_max=0.25)),
    ],
)
def test_match_text_round_trips(text, want):
    assert R.parse_match(text) == want
    assert R.match_text(want) == (text or "*")


@pytest.mark.parametrize(
    "text, want",
    [
        ("drop", R.drop()),
        ("allow", R.allow()),
        ("mirror", R.mirror()),
        ("sample:0.5", R.sample(0.5)),
        ("inspect", R.inspect(777)),
        ("inspect:400000:secure", R.inspect(400_000, "secure")),
    ],
)
def test_action_text(text, want):
    assert R.parse_action(text, default_budget_us=777) == want


@pytest.mark.parametrize(
    "text", ["dorp", "drop:1", "inspect:x", "inspect:1:weird", "inspect:1:secure:2", "sample"]
)
def test_bad_action_text_is_a_value_error_naming_it(text):
    with pytest.raises(ValueError, match=f"action {text!r}"):
        R.parse_action(text, 350)


@pytest.mark.parametrize("text", ["colour=red", "label=x", "confidence=1", "confidence=a:b"])
def test_bad_match_text_is_a_value_error(text):
    with pytest.raises(ValueError):
        R.parse_match(text)


# --- a naive reference model -----------------------------------------------------------
#
# A plain list of dicts, brute force everywhere, written from the spec rather than from
# rules.py. Matches are 5-tuples (model_id, source_id, label, lo, hi) with None = unset;
# actions are 5-tuples (verdict, budget_us, fail_mode, mirror, sample_p).

WILD = (None, None, None, None, None)


class Refused(Exception):
    def __init__(self, code):
        self.code = C.Value(f"VIGILANCE_MOD_FAILED_CODE_{code}")


def ref_match(msg):
    return tuple(
        getattr(msg, f) if msg.HasField(f) else None
        for f in ("model_id", "source_id", "label", "confidence_min", "confidence_max")
    )


def ref_check_match(mt):
    for s in mt[:2]:
        if s is not None and len(s.encode("utf-8")) > MAX_ID_BYTES:
            raise Refused("BAD_MATCH")
    for b in mt[3:]:
        if b is not None and (math.isnan(b) or math.isinf(b)):
            raise Refused("BAD_MATCH")
    if mt[3] is not None and mt[4] is not None and mt[3] > mt[4]:
        raise Refused("BAD_MATCH")


def ref_actions(actions):
    kinds = [a.WhichOneof("kind") for a in actions]
    if not kinds or None in kinds or len(set(kinds)) != len(kinds):
        raise Refused("BAD_ACTION")
    if sum(k in ("inspect", "allow", "drop") for k in kinds) > 1:
        raise Refused("BAD_ACTION")
    if "mirror" in kinds and "sample" in kinds:
        raise Refused("BAD_ACTION")
    if "inspect" in kinds and ("mirror" in kinds or "sample" in kinds):
        raise Refused("BAD_ACTION")
    verdict, budget, fail, mirrored, p = "allow", 0, 0, False, 0.0
    for a in actions:
        kind = a.WhichOneof("kind")
        if kind == "inspect":
            verdict, budget, fail = "inspect", a.inspect.budget_us, a.inspect.fail_mode
            if budget < 1 or budget > 60_000_000 or fail not in (1, 2):
                raise Refused("BAD_ACTION")
        elif kind == "drop":
            verdict = "drop"
        elif kind == "mirror":
            mirrored = True
        elif kind == "sample":
            p = a.sample.probability
            if math.isnan(p) or not 0 < p <= 1:
                raise Refused("BAD_ACTION")
    return (verdict, budget, fail, mirrored, p)


def ref_matches(mt, model, source, label, conf):
    if mt[0] is not None and mt[0] != model:
        return False
    if mt[1] is not None and mt[1] != source:
        return False
    if mt[2] is not None and mt[2] != label:
        return False
    if mt[3] is None and mt[4] is None:
        return True
    if math.isnan(conf):
        return False
    if mt[3] is not None and conf < mt[3]:
        return False
    return not (mt[4] is not None and conf > mt[4])


def ref_range(mt):
    lo = -math.inf if mt[3] is None else mt[3]
    hi = math.inf if mt[4] is None else mt[4]
    return lo, hi


def ref_covers(a, b):
    for x, y in zip(a[:3], b[:3], strict=True):
        if x is not None and x != y:
            return False
    (alo, ahi), (blo, bhi) = ref_range(a), ref_range(b)
    return alo <= blo and bhi <= ahi


def ref_overlaps(a, b):
    for x, y in zip(a[:3], b[:3], strict=True):
        if x is not None and y is not None and x != y:
            return False
    (alo, ahi), (blo, bhi) = ref_range(a), ref_range(b)
    return max(alo, blo) <= min(ahi, bhi)


class RefTable:
    def __init__(self, miss, max_rules):
        self.miss, self.max_rules, self.seq = miss, max_rules, 0
        self.lookups = self.hits = 0
        self.entries = []
        self.new_miss(0.0)

    def is_miss(self, e):
        return e["priority"] == 0 and e["match"] == WILD

    def order(self, e):
        return (-e["priority"], self.is_miss(e), e["seq"])

    def put(self, e):
        self.entries = [
            x for x in self.entries if (x["priority"], x["match"]) != (e["priority"], e["match"])
        ]
        self.seq += 1
        e["seq"] = self.seq
        self.entries.append(e)

    def new_miss(self, now):
        self.put(self.entry(0, WILD, self.miss, 0, 0, 0, 0, now, 0))

    @staticmethod
    def entry(priority, match, actions, cookie, idle, hard, flags, now, count):
        return dict(
            priority=priority,
            match=match,
            actions=actions,
            cookie=cookie,
            idle=idle,
            hard=hard,
            flags=flags,
            installed=now,
            last=None,
            count=count,
        )

    def notice(self, e, reason, now):
        return (
            e["cookie"],
            e["priority"],
            reason,
            e["match"],
            e["idle"],
            e["hard"],
            now - e["installed"],
            e["count"],
        )

    def apply(self, mod, now):
        if mod.command not in (1, 2, 3, 4, 5):
            raise Refused("BAD_COMMAND")
        if mod.priority > 65535:
            raise Refused("BAD_PRIORITY")
        if mod.flags > 7:
            raise Refused("BAD_FLAGS")
        mt = ref_match(mod.match)
        ref_check_match(mt)
        if mod.command in (1, 2, 3):
            actions = ref_actions(mod.actions)
        if mod.command == 1:
            self.add(mod, mt, actions, now)
            return []
        strict = mod.command in (3, 5)
        chosen = [
            e
            for e in self.entries
            if (
                e["match"] == mt and e["priority"] == mod.priority
                if strict
                else ref_covers(mt, e["match"])
            )
            and e["cookie"] & mod.cookie_mask == mod.cookie & mod.cookie_mask
        ]
        chosen.sort(key=self.order)
        out = []
        for e in chosen:
            if mod.command in (2, 3):
                e["actions"] = actions
                if mod.flags & 4:
                    e["count"] = 0
            elif self.is_miss(e):
                self.new_miss(now)
            else:
                self.entries.remove(e)
                if e["flags"] & 1:
                    out.append(self.notice(e, pb.REMOVED_REASON_DELETE, now))
        return out

    def add(self, mod, mt, actions, now):
        if mod.priority == 0 and mt == WILD and (mod.idle_timeout_s or mod.hard_timeout_s):
            raise Refused("EPERM")
        same = [e for e in self.entries if e["priority"] == mod.priority and e["match"] == mt]
        if mod.flags & 2:
            for e in self.entries:
                other = e["priority"] == mod.priority and e["match"] != mt
                if other and ref_overlaps(e["match"], mt):
                    raise Refused("OVERLAP")
        rules = [e for e in self.entries if not self.is_miss(e)]
        if not same and len(rules) + 1 > self.max_rules:
            raise Refused("TABLE_FULL")
        count = same[0]["count"] if same and not mod.flags & 4 else 0
        self.put(
            self.entry(
                mod.priority,
                mt,
                actions,
                mod.cookie,
                mod.idle_timeout_s,
                mod.hard_timeout_s,
                mod.flags,
                now,
                count,
            )
        )

    def lookup(self, model, source, label, conf, now):
        self.lookups += 1
        found = [e for e in self.entries if ref_matches(e["match"], model, source, label, conf)]
        best = min(found, key=self.order)
        if not self.is_miss(best):
            self.hits += 1
        best["count"] += 1
        best["last"] = now
        return best

    def deadlines(self, e):
        out = []
        if e["hard"]:
            out.append(("hard", e["installed"] + e["hard"]))
        if e["idle"]:
            last = e["installed"] if e["last"] is None else max(e["installed"], e["last"])
            out.append(("idle", last + e["idle"]))
        return out

    def expire(self, now):
        out = []
        for e in sorted(self.entries, key=self.order):
            passed = [kind for kind, when in self.deadlines(e) if now >= when]
            if not passed:
                continue
            self.entries.remove(e)
            reason = "hard" if "hard" in passed else "idle"
            code = {"hard": pb.REMOVED_REASON_HARD_TIMEOUT, "idle": pb.REMOVED_REASON_IDLE_TIMEOUT}
            if e["flags"] & 1:
                out.append(self.notice(e, code[reason], now))
        return out

    def next_expiry(self):
        times = [when for e in self.entries for _, when in self.deadlines(e)]
        return min(times) if times else None

    def rows(self):
        return [
            (
                e["priority"],
                e["match"],
                e["actions"],
                e["cookie"],
                e["flags"],
                e["idle"],
                e["hard"],
                e["installed"],
                e["last"],
                e["count"],
            )
            for e in sorted(self.entries, key=self.order)
        ]


def impl_match(rm):
    return (rm.model_id, rm.source_id, rm.label, rm.confidence_min, rm.confidence_max)


def impl_actions(a):
    return (a.verdict_source, a.budget_us, a.fail_mode, a.mirror, a.sample_p)


def impl_rows(t):
    return [
        (
            r.priority,
            impl_match(r.match),
            impl_actions(r.actions),
            r.cookie,
            r.flags,
            r.idle_timeout_s,
            r.hard_timeout_s,
            r.installed_at,
            r.last_matched_at,
            r.match_count,
        )
        for r in t
    ]


def impl_notices(notices):
    return [
        (
            n.cookie,
            n.priority,
            n.reason,
            ref_match(n.match),
            n.idle_timeout_s,
            n.hard_timeout_s,
            n.duration_s,
            n.match_count,
        )
        for n in notices
    ]


# Small domains so that rules collide, cover and overlap each other often; invalid
# values are rare (weighted by repetition) so most mods get through to the table.
def mostly(common, rare=(), times=6):
    return st.sampled_from(list(common) * times + list(rare))


matches = st.builds(
    lambda mid, sid, label, lo, hi: pb.Match(
        model_id=mid, source_id=sid, label=label, confidence_min=lo, confidence_max=hi
    ),
    mostly([None, None, "a", "b"]),
    mostly([None, None, None, "x"]),
    mostly([None, None, 0, 1]),
    mostly([None, None, None, 0.0, 0.5], [NAN, 0.75]),  # 0.75 makes some lo > hi
    mostly([None, None, None, 0.5, 1.0]),
)
action_lists = mostly(
    [
        [R.allow()],
        [R.drop()],
        [R.mirror()],
        [R.inspect(350)],
        [R.inspect(90, "secure")],
        [R.sample(0.5)],
        [R.drop(), R.mirror()],
        [R.mirror(), R.allow()],
    ],
    [[], [R.inspect(350), R.mirror()], [R.sample(2.0)], [R.inspect(0)]],
    times=3,
)


def mods(match_strategy):
    return st.builds(
        lambda cmd, match, prio, actions, cookie, mask, idle, hard, flags: pb.VigilanceMod(
            command=cmd,
            match=match,
            priority=prio,
            actions=actions,
            cookie=cookie,
            cookie_mask=mask,
            idle_timeout_s=idle,
            hard_timeout_s=hard,
            flags=flags,
        ),
        mostly([1, 1, 1, 2, 3, 4, 5], [0, 6]),
        match_strategy,
        mostly([0, 1, 1, 2, 2], [MAX_PRIORITY + 1]),
        action_lists,
        st.integers(0, 3),
        st.sampled_from([0, 0, 0, 1, 2, 3]),
        st.sampled_from([0, 0, 0, 1, 3]),
        st.sampled_from([0, 0, 0, 2, 4]),
        mostly([0, 1, 1, 1, 5, 4, 2, 3], [8]),
    )


lookups = st.tuples(
    mostly(["a", "b"], ["c"]),
    mostly(["x"], ["y"], times=2),
    mostly([0, 1], [2]),
    mostly([0.0, 0.5, 0.7, 1.0], [NAN], times=2),
)


@st.composite
def scenarios(draw):
    """A list of ops whose mods draw matches from a small per-example pool, so that
    MODIFY/DELETE (strict too) often find what earlier ADDs installed."""
    pool = [*draw(st.lists(matches, min_size=1, max_size=4)), pb.Match()]
    pooled = st.sampled_from(pool) | matches
    a_mod = mods(pooled).map(lambda x: ("mod", x))
    a_lookup = lookups.map(lambda x: ("lookup", x))
    a_tick = st.sampled_from([0.0, 0.5, 1.0, 2.0]).map(lambda x: ("tick", x))
    op = st.one_of(a_mod, a_mod, a_mod, a_lookup, a_lookup, a_tick)
    return draw(st.lists(op, min_size=10, max_size=60))


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(ops=scenarios(), miss=st.sampled_from([[R.inspect(350)], [R.allow()], [R.sample(0.5)]]))
def test_table_agrees_with_the_reference_model(ops, miss):
    t = R.RuleTable(R.RuleActions.from_pb(miss), max_rules=3)
    ref = RefTable(ref_actions(miss), max_rules=3)
    now = 0.0
    for kind, arg in ops:
        if kind == "mod":
            try:
                expected = ref.apply(arg, now)
            except Refused as r:
                with pytest.raises(ProtocolError) as e:
                    t.apply(arg, now)
                assert e.value.code == r.code
            else:
                assert impl_notices(t.apply(arg, now)) == expected
        elif kind == "lookup":
            got, want = t.lookup(*arg, now), ref.lookup(*arg, now)
            assert (got.priority, impl_match(got.match), got.cookie, impl_actions(got.actions)) == (
                want["priority"],
                want["match"],
                want["cookie"],
                want["actions"],
            )
        else:
            now += arg
            assert impl_notices(t.expire(now)) == ref.expire(now)
            nxt = t.next_expiry()
            assert nxt == ref.next_expiry()
            assert nxt is None or nxt > now
        assert impl_rows(t) == ref.rows()
        ts = t.table_stats()
        assert (ts.lookup_count, ts.hit_count, ts.active_count) == (
            ref.lookups,
            ref.hits,
            len(ref.entries),
        )
    fresh = R.RuleTable(R.RuleActions.from_pb(miss), max_rules=3)
    for x in t.snapshot():
        fresh.apply(x, now + 1.0)
    assert config(fresh) == config(t)


# Inferences that tell any two matches from the domains above apart.
GRID = [
    (mid, sid, label, conf)
    for mid in ("a", "b", "other")
    for sid in ("x", "other")
    for label in (0, 1, 99)
    for conf in (-1.0, 0.0, 0.25, 0.5, 1.0, 2.0)
]


@FAST
@given(a=matches, b=matches)
def test_covers_and_overlaps_agree_with_brute_force(a, b):
    try:
        ra, rb = R.RuleMatch.from_pb(a), R.RuleMatch.from_pb(b)
    except ProtocolError:
        return
    in_a = {g for g in GRID if ra.matches(*g)}
    in_b = {g for g in GRID if rb.matches(*g)}
    assert in_a == {g for g in GRID if ref_matches(ref_match(a), *g)}
    assert ra.covers(rb) == (in_b <= in_a)
    assert ra.overlaps(rb) == bool(in_a & in_b) == rb.overlaps(ra)


def _mangle(data, flips):
    data = bytearray(data)
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    return bytes(data)


u32, u64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
floats32 = st.none() | st.floats(width=32)
any_action = st.builds(
    lambda kind, n, p: [pb.Action(), R.allow(), R.drop(), R.mirror(), R.sample(p),
                        R.inspect(n, n % 4)][kind],
    st.integers(0, 5), u32, st.floats(width=32),
)  # fmt: skip
wild_mods = st.builds(
    lambda f, match, actions: pb.VigilanceMod(match=match, actions=actions, **f),
    st.fixed_dictionaries(
        dict(command=st.integers(-1, 6) | st.integers(-(2**31), 2**31 - 1),
             priority=st.integers(0, MAX_PRIORITY + 1) | u32, flags=st.integers(0, 9) | u32,
             cookie=u64, cookie_mask=u64, idle_timeout_s=u32, hard_timeout_s=u32)
    ),
    st.builds(
        pb.Match, model_id=st.none() | st.text(max_size=300), source_id=st.none() | st.text(),
        label=st.none() | u32, confidence_min=floats32, confidence_max=floats32,
    ),
    st.lists(any_action, max_size=3),
)  # fmt: skip
garbage = st.one_of(
    st.binary(max_size=120),
    wild_mods.map(lambda x: x.SerializeToString()),
    st.builds(
        _mangle,
        mods(matches).map(lambda x: x.SerializeToString()),
        st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    ),
)


@FAST
@given(blobs=st.lists(garbage, min_size=1, max_size=6))
def test_garbage_mods_only_raise_protocol_errors(blobs):
    t = table(max_rules=3)
    add(t, match=m(model_id="a"), priority=1, idle_timeout_s=1, flags=R.SEND_REMOVED)
    parsed = 0
    for now, blob in enumerate(blobs):
        try:
            x = pb.VigilanceMod.FromString(blob)
        except DecodeError:
            continue
        parsed += 1
        try:
            t.apply(x, float(now))
        except ProtocolError as e:
            assert e.error_type == pb.ERROR_TYPE_VIGILANCE_MOD_FAILED
        try:
            t.stats(x.match, x.cookie, x.cookie_mask, float(now))
        except ProtocolError as e:
            assert e.code == pb.BAD_REQUEST_CODE_BAD_FIELD
        t.lookup("a", "x", 0, 0.5, float(now))
        t.expire(float(now))
        assert list(t)[-1].is_table_miss
