"""Both planes in memory: the behaviours test_e2e.py checks with real processes, in
milliseconds, on a fake clock (tests/twoplane.py). No torch, no sockets, no sleeping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.results import Result, Ticket
from openexample import rules, tensor
from openexample.errors import ProtocolError
from openexample.messages import envelope
from openexample.v1 import openexample_pb2 as pb
from tests.twoplane import (
    MODEL_ID,
    SHAPE,
    TwoPlanes,
    adversarial_input,
    benign_input,
    constant_scorer,
)

ADVERSARIAL, BENIGN = pb.VERDICT_ADVERSARIAL, pb.VERDICT_BENIGN


def outcome(r):
    assert isinstance(r, Result), f"still pending: {r!r}"
    return r.decided_by, r.verdict, r.released


def secure_rule(budget_us=350):
    """What an operator installs to make one agent fail closed (as in test_e2e)."""
    return rules.vigilance_mod(
        rules.ADD, priority=1, actions=[rules.inspect(budget_us, "secure")], cookie=0x5EC
    )


def block_rule(cookie=0x42, **match):
    return rules.vigilance_mod(
        rules.ADD,
        match=pb.Match(**match),
        priority=100,
        actions=[rules.drop()],
        cookie=cookie,
    )


def mods_received(agent):
    return [e.vigilance_mod for e in agent.received if e.HasField("vigilance_mod")]


# --- 1. verdicts ----------------------------------------------------------------------


def test_verdicts_come_back_from_the_controller():
    pair = TwoPlanes()
    a = pair.attach("a")
    assert a.up and a.established == 1 and pair.core.sessions_of() == [a.sid]

    r = a.call(benign_input(), source="alice")
    assert outcome(r) == ("controller", "benign", True)
    assert r.output is not None and r.label == 1 == int(np.argmax(r.output))
    assert r.score == pytest.approx(0.1 - 0.5)

    r = a.call(adversarial_input(), source="mallory", label=2)
    assert outcome(r) == ("controller", "adversarial", False)
    assert r.output is None and r.model_label == 2 and r.score == pytest.approx(0.4)

    assert a.kinds_sent().count("pkg_in") == 2 and len(pair.scored) == 2
    assert pair.core.workload == 0
    (inc,) = pair.incidents
    assert (inc.agent_id, inc.model_id, inc.source_id, inc.label) == ("a", MODEL_ID, "mallory", 2)
    assert json.loads(inc.evidence) == [
        {"detector": "mean", "score": pytest.approx(0.4), "threshold": 0.0, "flagged": True}
    ]


def test_a_batch_is_one_pkg_in_answered_item_by_item():
    pair = TwoPlanes()
    a = pair.attach("a")
    rs = a.batch([benign_input(0.2), adversarial_input(0.8), benign_input(0.3)])
    assert [outcome(r) for r in rs] == [
        ("controller", "benign", True),
        ("controller", "adversarial", False),
        ("controller", "benign", True),
    ]
    (job,) = pair.scored
    assert job.size == 3 and a.kinds_sent().count("pkg_in") == 1


def test_stages_show_the_batch_window_and_the_time_a_job_was_held():
    pair = TwoPlanes(budget_us=10_000)
    a = pair.attach("a", batch_window_us=50)
    pair.hold()
    t = a.call(benign_input())
    pair.advance(0.0002)  # flushed at 50 us, held by the controller until 200 us
    pair.release()
    s = t.result.stages
    s.finish(pair.now)  # the caller wakes at once (Guard._finish)
    assert (s.before_send, s.wire, s.controller_queue, s.detectors, s.after) == (50, 0, 150, 0, 0)
    assert s.batch_items == 1 and s.per_detector == {"stub": 0}
    assert s.total == 200 == round(t.result.latency_s * 1e6)


# --- 2. swift vigilance ---------------------------------------------------------------


def test_rt_push_refuses_a_repeated_adversarial_input_on_another_agent():
    pair = TwoPlanes()
    a, b = pair.attach("line-a"), pair.attach("line-b")
    x = adversarial_input()
    assert outcome(a.call(x)) == ("controller", "adversarial", False)
    assert b.kinds_received()[-1] == "table_mod"  # pushed at once, unasked

    pkg_in, scored = b.core.counters.pkg_in, len(pair.scored)
    r = b.call(x)
    assert outcome(r) == ("rt", "adversarial", False) and r.output is None
    assert b.core.counters.pkg_in == pkg_in and len(pair.scored) == scored  # no PKG_IN

    # (model, fingerprint, label) is the key: the same input under another label asks.
    assert outcome(b.call(x, label=2))[0] == "controller"
    # An agent that attaches later gets the RT in its resync.
    c = pair.attach("line-c")
    assert "table_mod" in c.kinds_received()
    assert outcome(c.call(x)) == ("rt", "adversarial", False)


def test_no_push_when_rt_push_is_off():
    pair = TwoPlanes(rt_push=False)
    a, b = pair.attach("a"), pair.attach("b")
    x = adversarial_input()
    a.call(x)
    assert "table_mod" not in b.kinds_received()
    assert outcome(b.call(x)) == ("controller", "adversarial", False)


# --- 3. source tracing ----------------------------------------------------------------


def test_source_tracing_blocks_the_source_on_its_agent_until_the_hard_timeout():
    # Three in a row: p = 0.02**3 = 8e-6 against the clean rate, below this alpha.
    pair = TwoPlanes(trace_min_adversarial=3, trace_alpha=1e-4, block_hard_timeout_s=30)
    a, b = pair.attach("a"), pair.attach("b")
    for i in range(3):
        assert pair.blocked == []
        r = a.call(adversarial_input(0.6 + 0.1 * i), source="mallory")  # distinct inputs
        assert outcome(r) == ("controller", "adversarial", False)
    assert pair.blocked == [("a", "mallory")]
    assert [i.source_id for i in pair.incidents] == ["mallory"] * 3
    assert pair.core.snapshot().blocked_sources == 1

    r = a.call(benign_input(), source="mallory")
    assert (r.decided_by, r.released, r.output) == ("rule", False, None)
    assert outcome(a.call(benign_input(0.2), source="alice"))[0] == "controller"
    # Sources are namespaced by agent: b's "mallory" is somebody else, never framed by a.
    assert outcome(b.call(benign_input(0.25), source="mallory"))[0] == "controller"

    pair.advance(29.9)
    assert outcome(a.call(benign_input(0.3), source="mallory"))[0] == "rule"
    pair.advance(0.1)  # t = 30: the hard timeout, on the agent and the controller
    r = a.call(benign_input(0.4), source="mallory")
    assert outcome(r) == ("controller", "benign", True)
    removed = [e for e in a.sent if e.HasField("vigilance_removed")]
    assert len(removed) == 1
    assert removed[0].vigilance_removed.reason == pb.REMOVED_REASON_HARD_TIMEOUT
    assert not [e for e in b.sent if e.HasField("vigilance_removed")]
    assert pair.core.snapshot().blocked_sources == 0


def test_old_strikes_decay_and_do_not_block():
    pair = TwoPlanes(trace_min_adversarial=2, trace_alpha=1e-2, trace_half_life_s=1.0)
    a = pair.attach("a")
    a.call(adversarial_input(0.6), source="mallory")
    pair.advance(10.5)  # ten half-lives: the first strike is all but forgotten
    a.call(adversarial_input(0.7), source="mallory")
    assert pair.blocked == []
    a.call(adversarial_input(0.8), source="mallory")
    assert pair.blocked == [("a", "mallory")]


def test_a_block_is_not_extended_by_a_reconnect():
    pair = TwoPlanes(trace_min_adversarial=1, trace_alpha=0.05, block_hard_timeout_s=30)
    a = pair.attach("a")
    a.call(adversarial_input(), source="mallory")
    assert pair.blocked == [("a", "mallory")]
    pair.advance(20)
    pair.disconnect(a)
    pair.reconnect(a)
    pair.advance(11)  # t = 31: the controller's block is over
    assert pair.core.snapshot().blocked_sources == 0
    assert outcome(a.call(benign_input(), source="mallory"))[0] == "controller"


# --- 4. resync ------------------------------------------------------------------------


def test_operator_rule_survives_a_reconnect_by_resync():
    pair = TwoPlanes()
    a = pair.attach("a")
    assert pair.admin_mod(block_rule(model_id=MODEL_ID)) == {"a": None}
    assert outcome(a.call(benign_input()))[0] == "rule"

    pair.disconnect(a)
    assert not a.connected and a.core.state is None
    assert pair.closed == [("a", "stream broken")] and pair.core.sessions_of() == []
    a.received.clear()
    pair.reconnect(a)
    assert a.up and a.established == 2 and a.core.counters.reconnects == 1

    kinds = a.kinds_received()
    assert kinds[:2] == ["hello", "features_request"] and kinds[-1] == "barrier_request"
    mods = mods_received(a)
    assert mods[0].command == rules.DELETE and not mods[0].HasField("match")
    assert [m.cookie for m in mods[1:]] == [0, 0x42]  # table-miss first, then the rule
    assert [r.cookie for r in a.core.rules] == [0x42, 0]  # not duplicated
    r = a.call(benign_input(0.2))
    assert (r.decided_by, r.released) == ("rule", False)


def test_rules_mod_while_disconnected_reaches_the_agent_on_reconnect():
    pair = TwoPlanes()
    a, b = pair.attach("a"), pair.attach("b")
    pair.disconnect(a)
    assert pair.admin_mod(block_rule(source_id="eve"), agent_id="a") == {}  # nobody live
    assert outcome(a.call(benign_input(), source="eve"))[0] == "disconnected"
    pair.reconnect(a)
    assert outcome(a.call(benign_input(), source="eve"))[0] == "rule"
    assert outcome(b.call(benign_input(), source="eve"))[0] == "controller"  # only "a"
    # A restarted agent (a fresh core, the same id) gets its rules too.
    pair.disconnect(a)
    a2 = pair.attach("a")
    assert outcome(a2.call(benign_input(0.2), source="eve"))[0] == "rule"


def test_a_bad_operator_mod_reaches_no_agent():
    pair = TwoPlanes()
    a = pair.attach("a")
    seen = len(a.received)
    with pytest.raises(ProtocolError, match="PRIORITY"):
        pair.admin_mod(rules.vigilance_mod(rules.ADD, priority=70000, actions=[rules.drop()]))
    assert len(a.received) == seen


# --- 5. overload ----------------------------------------------------------------------


def test_overload_answers_unknown_and_the_fail_mode_decides():
    pair = TwoPlanes(max_workload=2)
    a, s = pair.attach("standalone"), pair.attach("secure")
    assert pair.admin_mod(secure_rule(), agent_id="secure") == {"secure": None}
    pair.hold()
    t1, t2 = a.call(adversarial_input(0.6)), a.call(benign_input(0.2))
    assert isinstance(t1, Ticket) and isinstance(t2, Ticket)
    assert pair.core.workload == 2 and len(pair.held) == 2

    r = a.call(benign_input(0.3))
    assert outcome(r) == ("controller", "unknown", True) and r.reason == "overloaded"
    assert r.output is not None
    r = s.call(benign_input(0.3))
    assert outcome(r) == ("controller", "unknown", False) and r.reason == "overloaded"
    assert r.output is None
    assert pair.overloaded == 2 and len(pair.held) == 2

    assert pair.release() == 2
    assert outcome(t1.result) == ("controller", "adversarial", False)
    assert outcome(t2.result) == ("controller", "benign", True)
    assert pair.core.workload == 0
    assert outcome(a.call(benign_input(0.4))) == ("controller", "benign", True)


def test_a_batch_above_the_workload_is_overloaded_whole():
    pair = TwoPlanes(max_workload=1)
    a = pair.attach("a")
    rs = a.batch([benign_input(0.1 * i) for i in range(4)])
    assert {(r.verdict, r.reason, r.decided_by, r.released) for r in rs} == {
        ("unknown", "overloaded", "controller", True)
    }
    assert pair.scored == [] and pair.core.workload == 0


# --- 6. fail modes --------------------------------------------------------------------


def test_budget_expiry_with_a_held_job_times_out_by_fail_mode():
    pair = TwoPlanes(budget_us=400_000)
    a, s = pair.attach("standalone"), pair.attach("secure")
    pair.admin_mod(secure_rule(400_000), agent_id="secure")
    pair.hold()
    ta, ts = a.call(benign_input()), s.call(benign_input())
    pair.advance(0.399)
    assert ta.result is None and ts.result is None
    pair.advance(0.001)
    assert outcome(ta.result) == ("timeout", "unknown", True)
    assert outcome(ts.result) == ("timeout", "unknown", False)
    assert ta.result.latency_s == pytest.approx(0.4)
    assert a.core.counters.budget_misses == 1
    # The verdict arrives later and agrees with nothing to correct for ta; ts retracts.
    pair.release()
    assert a.retractions == []
    (late,) = s.retractions
    assert (late.verdict, late.released, late.retraction) == ("benign", True, True)


def test_disconnected_fail_modes():
    pair = TwoPlanes()
    a, s = pair.attach("standalone"), pair.attach("secure")
    pair.admin_mod(secure_rule(), agent_id="secure")
    # In flight when the stream breaks: the fail mode decides at once.
    pair.hold()
    ta, ts = a.call(benign_input()), s.call(benign_input())
    pair.disconnect(a)
    pair.disconnect(s)
    assert outcome(ta.result) == ("disconnected", "unknown", True)
    assert outcome(ts.result) == ("disconnected", "unknown", False)
    assert a.waiting == [] and s.waiting == []
    # While away: the fail mode decides at once, nothing is queued.
    assert outcome(a.call(benign_input(0.2))) == ("disconnected", "unknown", True)
    assert outcome(s.call(benign_input(0.2))) == ("disconnected", "unknown", False)
    assert a.core.take_outbox(pair.now) == []
    # The held jobs are answered into the void; W goes back down.
    pair.release()
    assert pair.core.workload == 0
    pair.reconnect(a)
    assert outcome(a.call(benign_input(0.3))) == ("controller", "benign", True)


# --- 7. late verdicts -----------------------------------------------------------------


def test_late_adversarial_verdict_retracts_a_timeout_release():
    pair = TwoPlanes(budget_us=1000)
    a = pair.attach("a")
    pair.hold()
    t = a.call(benign_input())
    pair.advance(0.002)
    assert outcome(t.result) == ("timeout", "unknown", True)
    assert pair.release(constant_scorer(ADVERSARIAL)) == 1
    (r,) = a.retractions
    assert r.retraction and (r.verdict, r.released, r.output, r.decided_by) == (
        "adversarial",
        False,
        None,
        "controller",
    )
    assert t.result.released and not t.result.retraction  # the caller's result stands
    assert a.core.counters.retractions == 1


def test_no_retraction_after_the_late_window():
    pair = TwoPlanes(budget_us=1000)
    a = pair.attach("a", late_window_s=2.0)
    pair.hold()
    t = a.call(benign_input())
    pair.advance(2.5)
    assert outcome(t.result) == ("timeout", "unknown", True)
    pair.release(constant_scorer(ADVERSARIAL))
    assert a.retractions == [] and a.core.counters.unmatched_pkg_out == 1


# --- 8. a bad PKG_IN ------------------------------------------------------------------


def _pkg_in(model_id=MODEL_ID, x=None):
    x = np.zeros((1, *SHAPE), np.float32) if x is None else x
    item = pb.PkgInItem(label=1, confidence=0.5, reason=pb.PKG_IN_REASON_ACTION)
    return pb.PkgIn(model_id=model_id, inputs=tensor.encode(x), items=[item] * len(x))


@pytest.mark.parametrize(
    ("body", "etype", "code"),
    [
        (_pkg_in("nope"), pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_UNKNOWN_MODEL),
        (
            _pkg_in(x=np.zeros((1, 1, 8, 8), np.float32)),
            pb.ERROR_TYPE_BAD_TENSOR,
            pb.BAD_TENSOR_CODE_BAD_SHAPE,
        ),
    ],
)
def test_a_bad_pkg_in_gets_a_typed_error_and_others_are_unaffected(body, etype, code):
    pair = TwoPlanes()
    a, b = pair.attach("a"), pair.attach("b")
    pair.hold()
    tb = b.call(adversarial_input())  # in flight across the bad message
    a.send_raw(envelope(body, xid=424242, version=a.core.session.version))
    errors = [e for e in a.received if e.HasField("error")]
    assert [(e.xid, e.error.type, e.error.code) for e in errors] == [(424242, etype, code)]
    assert len(pair.errors) == 1 and pair.scored == [] and len(pair.held) == 1
    assert a.up and a.core.counters.errors_received == 1
    assert not any(e.HasField("error") for e in b.received)
    pair.release()
    assert outcome(tb.result) == ("controller", "adversarial", False)
    assert outcome(a.call(benign_input())) == ("controller", "benign", True)
    assert outcome(b.call(benign_input(0.2))) == ("controller", "benign", True)


# --- 9. liveness across planes --------------------------------------------------------


def test_the_controller_closes_a_silent_agent_after_the_echo_limit():
    pair = TwoPlanes(echo_interval_s=1.0, echo_unreplied_limit=3)
    a, b = pair.attach("a"), pair.attach("b")
    a.silent = True
    pair.advance(3.5)  # echoes at 1, 2, 3 unanswered; still within the limit
    assert a.connected and pair.closed == []
    pair.advance(0.5)
    assert pair.closed == [("a", "3 echo requests unanswered")]
    assert not a.connected and a.core.state is None
    assert pair.core.sessions_of() == [b.sid]
    pair.advance(60)
    assert b.up and pair.closed == [("a", "3 echo requests unanswered")]
    assert b.core.echo_rtt_s == 0.0  # the agent's own echoes, answered in no time


def test_an_agent_closes_a_silent_controller_after_its_echo_limit():
    pair = TwoPlanes()
    a = pair.attach("a", echo_interval_s=0.5, echo_unreplied_limit=2)
    a.deaf = True
    pair.advance(1.4)
    assert a.connected and a.closes == []
    pair.advance(0.1)
    assert a.closes == ["2 echo requests unanswered"]
    assert not a.connected and pair.closed == [("a", "stream ended")]
    assert pair.core.sessions_of() == []


def test_the_handshake_timeout_closes_an_agent_that_never_finishes():
    pair = TwoPlanes()
    a = pair.attach("a", connect=False, handshake_timeout_s=60)
    a.silent = True  # its HELLO never arrives
    pair.connect(a)
    assert a.connected and not a.up
    pair.advance(9.9)  # the controller's handshake deadline: 10 s
    assert a.connected
    pair.advance(0.1)
    assert pair.closed == [("a", "handshake not finished (state hello)")]
    assert not a.connected and a.closes == []


def test_the_agent_handshake_timeout_closes_a_controller_that_never_answers():
    pair = TwoPlanes()
    a = pair.attach("a", connect=False, handshake_timeout_s=2)
    a.deaf = True
    pair.connect(a)
    pair.advance(2)
    assert a.closes == ["handshake not finished (state hello)"]
    assert not a.connected and pair.closed == [("a", "stream ended")]


def test_rules_added_and_deleted_at_run_time_change_behaviour():
    pair = TwoPlanes()
    a, b = pair.attach("a"), pair.attach("b")
    assert pair.admin_mod(block_rule(model_id=MODEL_ID)) == {"a": None, "b": None}
    for agent in (a, b):
        assert outcome(agent.call(benign_input()))[0] == "rule"
    delete = rules.vigilance_mod(rules.DELETE, cookie=0x42, cookie_mask=0xFFFF)
    assert pair.admin_mod(delete) == {"a": None, "b": None}
    for agent in (a, b):
        assert outcome(agent.call(benign_input(0.2))) == ("controller", "benign", True)
    assert [r.cookie for r in a.core.rules] == [0]


def test_a_batch_window_gathers_calls_into_one_pkg_in():
    pair = TwoPlanes(budget_us=10_000)
    a = pair.attach("a", batch_window_us=1000)
    t1, t2 = a.call(benign_input()), a.call(adversarial_input())
    assert isinstance(t1, Ticket) and isinstance(t2, Ticket) and pair.scored == []
    pair.advance(0.001)
    assert outcome(t1.result) == ("controller", "benign", True)
    assert outcome(t2.result) == ("controller", "adversarial", False)
    (job,) = pair.scored
    assert job.size == 2


def test_a_model_without_detectors_is_named_on_both_sides(caplog):
    """An agent declares a model id the controller has no detectors for (a typo, the
    file stem): the controller's step names it at FEATURES, every inference says why it
    was UNKNOWN, and the agent warns once per session, not once per call."""
    import logging

    pair = TwoPlanes()
    caplog.set_level(logging.WARNING, logger="agents")
    steps = []
    dispatch = pair._dispatch
    pair._dispatch = lambda step: (steps.append(step), dispatch(step))[1]
    agent = pair.attach("a1", model_id="typo")
    assert [s.undetected for s in steps if s.undetected] == [[("a1", ("typo",))]]
    results = [agent.call(benign_input()) for _ in range(3)]
    assert all(r.verdict == "unknown" and r.reason == "no_detector" for r in results)
    warned = [r for r in caplog.records if "no detectors for model 'typo'" in r.getMessage()]
    assert len(warned) == 1
    pair.disconnect(agent)
    pair.reconnect(agent)
    agent.call(benign_input())
    warned = [r for r in caplog.records if "no detectors for model 'typo'" in r.getMessage()]
    assert len(warned) == 2  # a new session: said again


def test_the_controllers_default_rule_replacing_the_agents_is_said(caplog):
    """The SDK's budget_us is the default only until the controller installs its own
    table-miss rule: when that one differs, the agent says so once (not per reconnect)."""
    import logging

    caplog.set_level(logging.WARNING, logger="agents")

    def said() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "default rule (table-miss)" in r.getMessage()
        ]

    pair = TwoPlanes(budget_us=10_000)
    same = pair.attach("same", budget_us=10_000)
    assert said() == []
    other = pair.attach("other", budget_us=350)
    (line,) = said()
    assert "budget of 10000 us" in line and "budget_us=350" in line
    pair.disconnect(other)
    pair.reconnect(other)
    assert len(said()) == 1
    assert outcome(same.call(benign_input()))[0] == "controller"
