"""Unit tests of the agent's sans-I/O core (agents/core.py) and privacy noise.

No sockets, no sleeping: every call takes a ``now`` driven by hand, and the
controller's messages are built here and fed in as bytes, as the transport would.
"""

from __future__ import annotations

import numpy as np
import pytest

from agents.config import AgentConfig
from agents.core import AgentCore, AgentOutput
from agents.privacy import PrivacyNoise
from agents.results import (
    ADVERSARIAL,
    BENIGN,
    CONTROLLER,
    DISCONNECTED,
    RT,
    RULE,
    TIMEOUT,
    UNKNOWN,
    ModelInfo,
    Result,
    Ticket,
)
from openexample import rules, tensor
from openexample.messages import envelope, hello
from openexample.rules import INSPECT, RuleActions
from openexample.session import State
from openexample.tables import fingerprint, label_entry, rt_push
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import validate_features, validate_pkg_in

SHAPE = (1, 4, 4)
MODEL = ModelInfo("m", SHAPE, ("zero", "one", "two"), framework="torch", model_digest="sha256:ab")
LOGITS = np.array([0.1, 2.0, 0.3], dtype=np.float32)  # label 1
STANDALONE, SECURE = pb.FAIL_MODE_STANDALONE, pb.FAIL_MODE_SECURE


FAIL_MODE_NAMES = {STANDALONE: "standalone", SECURE: "secure"}
WALL_OFFSET_S = 1000.0  # wall clock = the core's clock + this


def make_core(model=MODEL, fail_mode=STANDALONE, **kw) -> AgentCore:
    kw.setdefault("seed", 7)
    config = AgentConfig(budget_us=350, fail_mode=FAIL_MODE_NAMES[fail_mode], **kw)
    return AgentCore("agent-1", [model], config, now=0.0, wall_offset_s=WALL_OFFSET_S)


def deliver(core: AgentCore, body, xid: int = 0, now: float = 0.0) -> AgentOutput:
    """Deliver one controller message as bytes, the way the transport does."""
    return core.receive(envelope(body, xid=xid).SerializeToString(), now)


def send(core: AgentCore, body, xid: int = 0, now: float = 0.0) -> list[pb.Envelope]:
    """deliver() and keep only what the agent sends back."""
    return deliver(core, body, xid, now).send


def to_config(core: AgentCore, now: float = 0.0) -> pb.Envelope:
    core.connected(now)
    assert core.receive(hello("ctrl").SerializeToString(), now).send == []
    (features,) = send(core, pb.FeaturesRequest(), xid=7, now=now)
    return features


def to_main(core: AgentCore, now: float = 0.0) -> AgentCore:
    to_config(core, now)
    out = deliver(core, pb.BarrierRequest(), xid=8, now=now)
    assert core.state is State.MAIN and out.established
    return core


def x_of(value: float) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


def decide_flush(core: AgentCore, x=None, *, source="", logits=LOGITS, now=0.0, label=None):
    """(Result | Ticket, flush flag) as core.decide returns them."""
    x = x_of(0.5) if x is None else x
    label = int(np.argmax(logits)) if label is None else label
    return core.decide("m", x, logits, label, 0.8, source, now)


def decide(core: AgentCore, x=None, **kw):
    return decide_flush(core, x, **kw)[0]


def add_rule(core: AgentCore, actions, *, priority=100, now=0.0, **match) -> None:
    mod = rules.vigilance_mod(
        "add", match=pb.Match(**match), priority=priority, actions=actions, cookie=0xC0
    )
    assert send(core, mod, xid=50, now=now) == []


def pkg_out(xid: int, *items: pb.PkgOutItem) -> list:
    return [pb.PkgOut(model_id="m", items=list(items)), xid]


def verdict(v, action, corrected=None, score=0.9) -> pb.PkgOutItem:
    return pb.PkgOutItem(verdict=v, action=action, corrected_label=corrected, score=score)


def error_of(out: list[pb.Envelope]) -> pb.Error:
    assert len(out) == 1 and out[0].WhichOneof("body") == "error", out
    return out[0].error


# --- handshake ---


def test_handshake_hello_and_features_reply_contents():
    core = make_core()
    (h,) = core.connected(0.0).send
    assert h.hello.sender_id == "agent-1" and h.hello.versions_bitmap & 2
    assert core.receive(hello("ctrl").SerializeToString(), 0.0).send == []
    assert core.state is State.FEATURES and core.controller_id == "ctrl"
    (env,) = send(core, pb.FeaturesRequest(), xid=7)
    assert env.xid == 7 and env.WhichOneof("body") == "features_reply"
    reply = env.features_reply
    assert reply.agent_id == "agent-1"
    (m,) = reply.models
    assert (m.model_id, tuple(m.input_shape), m.input_dtype) == ("m", SHAPE, pb.DTYPE_FLOAT32)
    assert list(m.class_names) == ["zero", "one", "two"]
    assert (m.framework, m.model_digest) == ("torch", "sha256:ab")
    assert set(reply.capabilities) == {
        pb.CAPABILITY_BATCHING,
        pb.CAPABILITY_RETRACTION,
        pb.CAPABILITY_LABEL_TABLES,
    }
    assert reply.max_batch_items == 64
    assert set(validate_features(reply)) == {"m"}  # the controller's own check passes
    assert core.state is State.CONFIG and core.sending and not core.up


def test_hello_without_common_version_fails_and_closes():
    core = make_core()
    core.connected(0.0)
    bad = pb.Envelope(version=5, hello=pb.Hello(versions_bitmap=1 << 5, sender_id="c"))
    out = core.receive(bad.SerializeToString(), 0.0)
    err = error_of(out.send)
    assert err.type == pb.ERROR_TYPE_HELLO_FAILED and err.code == pb.HELLO_FAILED_CODE_INCOMPATIBLE
    assert out.close and core.state is State.CLOSED


def test_first_message_must_be_hello():
    core = make_core(handshake_timeout_s=10.0)
    core.connected(0.0)
    out = deliver(core, pb.FeaturesRequest(), xid=3)
    err = error_of(out.send)
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_UNEXPECTED)
    # Changed on purpose: the session keeps waiting for HELLO; the handshake deadline closes.
    assert not out.close and core.state is State.HELLO
    assert not core.tick(9.9).close
    assert core.tick(10.0).close and core.state is State.CLOSED
    # ... and a HELLO that does come in time is still accepted.
    core = make_core()
    core.connected(0.0)
    send(core, pb.FeaturesRequest(), xid=3)
    assert core.receive(hello("ctrl").SerializeToString(), 0.0).send == []
    assert core.state is State.FEATURES


def test_messages_with_another_version_are_refused():
    core = to_main(make_core())
    env = envelope(pb.EchoRequest(data=b"x"), xid=4, version=2)
    err = error_of(core.receive(env.SerializeToString(), 0.0).send)
    assert err.code == pb.BAD_REQUEST_CODE_BAD_VERSION and err.offending_xid == 4


def test_resync_is_applied_in_order_then_barrier_reply():
    core = make_core()
    add_rule(core, [rules.allow()])  # stale local rule from an earlier session
    to_config(core)
    fp = fingerprint(x_of(0.9))
    mods = [
        rules.vigilance_mod("delete", match=pb.Match(), cookie_mask=0),
        rules.vigilance_mod("add", priority=0, actions=[rules.inspect(500, "secure")]),
        rules.vigilance_mod(
            "add", match=pb.Match(label=2), priority=100, actions=[rules.allow()], cookie=1
        ),
        rules.vigilance_mod(
            "add",
            match=pb.Match(source_id="evil"),
            priority=200,
            actions=[rules.drop()],
            cookie=2,
        ),
    ]
    for i, mod in enumerate(mods):
        assert send(core, mod, xid=10 + i) == []
    assert send(core, rt_push("m", [label_entry(fp, 1, pb.VERDICT_ADVERSARIAL)]), xid=20) == []
    out = deliver(core, pb.BarrierRequest(), xid=21)
    (barrier,) = out.send
    assert barrier.xid == 21 and barrier.WhichOneof("body") == "barrier_reply"
    assert core.state is State.MAIN and core.up and out.established
    assert [r.priority for r in core.rules] == [200, 100, 0]
    assert core.rules.lookup("m", "", 1, 0.5, 0.0).actions == RuleActions(INSPECT, 500, SECURE)
    assert decide(core, source="evil").released is False  # the source block
    assert decide(core, x_of(0.9)).decided_by == RT  # the pushed RT entry


def test_delete_all_resets_table_miss_to_agent_default():
    core = to_main(make_core())
    send(core, rules.vigilance_mod("add", priority=0, actions=[rules.allow()]))
    assert decide(core).decided_by == RULE
    send(core, rules.vigilance_mod("delete", match=pb.Match()))
    assert isinstance(decide(core), Ticket)


# --- fast path ---


def test_allow_and_drop_rules_decide_locally_without_sending():
    core = to_main(make_core())
    add_rule(core, [rules.allow()], source_id="trusted")
    add_rule(core, [rules.drop()], source_id="blocked")
    ok, ok_flush = decide_flush(core, source="trusted")
    assert isinstance(ok, Result)
    assert (ok.decided_by, ok.released, ok.label, ok.verdict) == (RULE, True, 1, UNKNOWN)
    assert ok.output is LOGITS
    no, no_flush = decide_flush(core, source="blocked")
    assert (no.decided_by, no.released, no.output) == (RULE, False, None)
    assert not ok_flush and not no_flush and core.flush(0.0) == []
    assert core.counters.decisions[("m", RULE)] == 2 and core.counters.decided_locally == 2


@pytest.mark.parametrize(
    ("entry_verdict", "corrected", "released", "label", "verdict_name"),
    [
        (pb.VERDICT_ADVERSARIAL, None, False, 1, ADVERSARIAL),
        (pb.VERDICT_ADVERSARIAL, 2, True, 2, ADVERSARIAL),
        (pb.VERDICT_BENIGN, None, True, 1, BENIGN),
    ],
)
def test_rt_hit_decides_locally(entry_verdict, corrected, released, label, verdict_name):
    core = to_main(make_core())
    x = x_of(0.25)
    entry = label_entry(fingerprint(x), 1, entry_verdict, corrected_label=corrected, score=0.7)
    send(core, rt_push("m", [entry]))
    res = decide(core, x)
    assert isinstance(res, Result)
    assert (res.decided_by, res.released, res.label, res.verdict) == (
        RT,
        released,
        label,
        verdict_name,
    )
    assert res.model_label == 1 and res.score == pytest.approx(0.7)
    assert core.flush(0.0) == []
    assert core.counters.verdicts[("m", verdict_name)] == 1


def test_rt_hit_needs_the_same_label():
    core = to_main(make_core())
    x = x_of(0.25)
    send(core, rt_push("m", [label_entry(fingerprint(x), 2, pb.VERDICT_ADVERSARIAL)]))
    assert isinstance(decide(core, x), Ticket)  # the model said 1, the entry is for 2


def test_known_adversarial_input_is_refused_even_where_a_rule_allows():
    core = to_main(make_core())
    add_rule(core, [rules.allow()])
    x, other = x_of(0.25), x_of(0.75)
    assert decide(core, x).decided_by == RULE  # nothing known yet: the rule decides
    send(core, rt_push("m", [label_entry(fingerprint(x), 1, pb.VERDICT_ADVERSARIAL)]))
    res = decide(core, x)
    assert (res.decided_by, res.released, res.verdict) == (RT, False, "adversarial")
    assert decide(core, other).decided_by == RULE  # other inputs keep the fast path


# --- INSPECT, FT, PKG_IN ---


def test_inspect_sends_pkg_in_and_registers_ft():
    core = to_main(make_core())
    x = x_of(0.5)
    t, flush = decide_flush(core, x, source="alice", now=1.0)
    assert isinstance(t, Ticket) and flush
    assert t.deadline == pytest.approx(1.0 + 350e-6)
    assert len(core.tables.ft) == 1
    (env,) = core.flush(1.0)
    assert env.WhichOneof("body") == "pkg_in" and env.xid != 0
    pkg = env.pkg_in
    (item,) = pkg.items
    assert item.label == 1 and item.confidence == pytest.approx(0.8)
    assert item.source_id == "alice" and item.reason == pb.PKG_IN_REASON_TABLE_MISS
    assert item.fingerprint == fingerprint(x) and item.budget_us == 350
    assert item.inferred_at_ns == int((1.0 + WALL_OFFSET_S) * 1e9) and item.rule_cookie == 0
    decoded = validate_pkg_in(pkg, {"m": MODEL.descriptor()})
    np.testing.assert_array_equal(decoded.inputs, x[None])
    np.testing.assert_array_equal(decoded.logits, LOGITS[None])
    assert core.flush(1.0) == []  # sent once


def test_inspect_rule_sends_reason_action_with_its_cookie():
    core = to_main(make_core())
    add_rule(core, [rules.inspect(1000, "secure")], label=1)
    t = decide(core)
    assert t.fail_mode == SECURE
    (env,) = core.flush(0.0)
    (item,) = env.pkg_in.items
    assert (item.reason, item.rule_cookie, item.budget_us) == (pb.PKG_IN_REASON_ACTION, 0xC0, 1000)


def test_identical_concurrent_inputs_join_the_pending_ft_entry():
    core = to_main(make_core())
    a, b = decide(core, x_of(0.5)), decide(core, x_of(0.5))
    c = decide(core, x_of(0.6))
    (env,) = core.flush(0.0)
    assert len(env.pkg_in.items) == 2  # a and b share one item
    assert core.tables.ft.hit_count == 1 and core.counters.ft_joined == 1
    out = pkg_out(env.xid, *[verdict(pb.VERDICT_ADVERSARIAL, pb.VERDICT_ACTION_DROP)] * 2)
    got = deliver(core, *out, now=0.0001)
    assert got.send == [] and got.settled == [a, b, c]
    for t in (a, b, c):
        assert t.result.decided_by == CONTROLLER and t.result.released is False
    assert len(core.tables.ft) == 0


def test_batches_are_capped_at_max_batch_items():
    core = to_main(make_core(max_batch_items=2))
    for i in range(5):
        decide(core, x_of(i / 10))
    envs = core.flush(0.0)
    assert [len(e.pkg_in.items) for e in envs] == [2, 2, 1]
    assert len({e.xid for e in envs}) == 3


@pytest.mark.parametrize(
    ("v", "action", "corrected", "fail_mode", "want"),
    [
        (pb.VERDICT_BENIGN, pb.VERDICT_ACTION_RELEASE, None, STANDALONE, (BENIGN, True, 1)),
        (pb.VERDICT_ADVERSARIAL, pb.VERDICT_ACTION_DROP, None, STANDALONE, (ADVERSARIAL, False, 1)),
        (pb.VERDICT_ADVERSARIAL, pb.VERDICT_ACTION_CORRECT, 2, SECURE, (ADVERSARIAL, True, 2)),
        (pb.VERDICT_UNKNOWN, pb.VERDICT_ACTION_RELEASE, None, STANDALONE, (UNKNOWN, True, 1)),
        (pb.VERDICT_UNKNOWN, pb.VERDICT_ACTION_RELEASE, None, SECURE, (UNKNOWN, False, 1)),
    ],
)
def test_pkg_out_maps_verdict_and_action(v, action, corrected, fail_mode, want):
    core = to_main(make_core(fail_mode=fail_mode))
    t = decide(core)
    woken = []
    t.wake = lambda: woken.append(1)
    (env,) = core.flush(0.0)
    out = deliver(core, *pkg_out(env.xid, verdict(v, action, corrected)), now=0.0002)
    res = t.result
    assert (res.verdict, res.released, res.label) == want
    assert res.decided_by == CONTROLLER and res.latency_s == pytest.approx(0.0002)
    assert (res.output is not None) == res.released
    assert out.settled == [t] and woken == []  # the shell wakes settled tickets, not the core
    recorded = core.tables.rt.get(("m", fingerprint(x_of(0.5)), 1), 1.0)
    assert (recorded is not None) == (v != pb.VERDICT_UNKNOWN)  # UNKNOWN is not recorded
    assert core.expire_ticket(t, 1.0) is res  # the waiter's later check changes nothing


@pytest.mark.parametrize(("fail_mode", "released"), [(STANDALONE, True), (SECURE, False)])
def test_budget_expiry_applies_the_fail_mode(fail_mode, released):
    core = to_main(make_core(fail_mode=fail_mode))
    t = decide(core)
    core.flush(0.0)
    res = core.expire_ticket(t, 0.001)
    assert (res.decided_by, res.verdict, res.released) == (TIMEOUT, UNKNOWN, released)
    assert core.counters.budget_misses == 1 and core.counters.misses_by_model == {"m": 1}
    snap = core.snapshot()
    snap.counters.budget_misses = 99  # a copy: the core's counters stay
    assert core.counters.budget_misses == 1


def test_late_verdict_after_release_becomes_a_retraction():
    core = to_main(make_core())
    t, u = decide(core, x_of(0.1)), decide(core, x_of(0.2))
    (env,) = core.flush(0.0)
    first = core.expire_ticket(t, 0.001)
    core.expire_ticket(u, 0.001)
    assert first.released
    out = deliver(
        core,
        *pkg_out(
            env.xid,
            verdict(pb.VERDICT_ADVERSARIAL, pb.VERDICT_ACTION_DROP),
            verdict(pb.VERDICT_BENIGN, pb.VERDICT_ACTION_RELEASE),  # agrees: no retraction
        ),
        now=0.01,
    )
    assert t.result is first  # the caller's result stands ...
    (late,) = out.retractions  # ... and the correction goes to on_retraction
    assert late.retraction and late.released is False and late.verdict == ADVERSARIAL
    assert late.decided_by == CONTROLLER
    assert core.counters.retractions == 1 and core.counters.retractions_by_model == {"m": 1}
    assert out.settled == []  # both tickets were already decided
    # The verdict still reached RT: the same input is now decided locally.
    assert decide(core, x_of(0.1)).decided_by == RT


def test_pkg_out_timings_give_stages_that_add_up_to_the_latency():
    core = to_main(make_core())
    # Fake clock, in microseconds from 1.0 s: decide at 0 and 10, PKG_IN taken at 25,
    # PKG_OUT back at 125 (controller: 10 queued, 30 scoring, 5 replying), callers
    # have their results at 130 and 140.
    a = decide(core, x_of(0.1), now=1.0)
    b = decide(core, x_of(0.2), now=1.000010)
    (env,) = core.flush(1.000025)
    joined = decide(core, x_of(0.1), now=1.000050)  # FT join after the PKG_IN left
    timings = pb.Timings(
        queue_us=10,
        batch_items=4,
        score_us=30,
        detectors=[pb.DetectorTiming(detector="d1", us=20), pb.DetectorTiming(detector="d2", us=8)],
        reply_us=5,
        controller_us=45,
    )
    body = pb.PkgOut(
        model_id="m", items=[verdict(pb.VERDICT_BENIGN, pb.VERDICT_ACTION_RELEASE)] * 2,
        timings=timings,
    )  # fmt: skip
    deliver(core, body, env.xid, now=1.000125)
    sa, sb = a.result.stages, b.result.stages
    assert sa.after is None and sa.total is None  # the caller has not woken yet
    sa.finish(1.000130)  # what Guard._finish does, with the guard's clock
    sb.finish(1.000140)
    assert sa.as_dict() == {
        "before_send": 25,
        "wire": 55,  # round trip 100 - controller 45: out and back together
        "controller_queue": 10,
        "detectors": 30,
        "controller_reply": 5,
        "after": 5,
        "total": 130,
        "batch_items": 4,
    }
    assert sa.per_detector == {"d1": 20, "d2": 8} and sa.round_trip == 100
    for s, start in ((sa, 1.0), (sb, 1.000010)):
        parts = [s.before_send, s.wire, s.controller_queue, s.detectors, s.controller_reply,
                 s.after]  # fmt: skip
        assert sum(parts) == s.total == round((s._done - start) * 1e6)
    assert (sb.before_send, sb.wire, sb.after, sb.total) == (15, 55, 15, 130)
    # It waited for part of the trip only: no breakdown.
    assert joined.result.decided_by == CONTROLLER and joined.result.stages is None


def test_stages_without_controller_timings_and_for_local_decisions():
    core = to_main(make_core())
    t = decide(core, x_of(0.3), now=2.0)
    (env,) = core.flush(2.00002)
    deliver(core, *pkg_out(env.xid, verdict(pb.VERDICT_BENIGN, 1)), now=2.0001)  # no Timings
    s = t.result.stages
    s.finish(2.0001)
    assert (s.before_send, s.wire, s.controller, s.detectors, s.batch_items) == (20, 80, 0, 0, 0)
    assert s.total == 100
    assert decide(core, x_of(0.3), now=2.1).stages is None  # RT hit
    u = decide(core, x_of(0.4), now=2.2)
    core.flush(2.2)
    assert core.expire_ticket(u, 2.3).stages is None  # the fail mode decided


def test_controller_error_for_a_pkg_in_resolves_its_waiters():
    core = to_main(make_core(fail_mode=SECURE))
    t = decide(core)
    (env,) = core.flush(0.0)
    err = pb.Error(type=pb.ERROR_TYPE_BAD_TENSOR, code=1, offending_xid=env.xid, text="no")
    assert send(core, err, xid=env.xid) == []
    assert (t.result.decided_by, t.result.verdict, t.result.released) == (
        CONTROLLER,
        UNKNOWN,
        False,
    )
    assert core.counters.errors_received == 1 and len(core.tables.ft) == 0


def test_pkg_out_with_wrong_item_count_is_refused():
    core = to_main(make_core())
    t = decide(core)
    (env,) = core.flush(0.0)
    err = error_of(send(core, pb.PkgOut(model_id="m"), xid=env.xid))
    assert err.code == pb.BAD_REQUEST_CODE_BAD_BATCH and err.offending_xid == env.xid
    assert t.result.verdict == UNKNOWN and t.result.released  # standalone


def test_pkg_out_for_an_unknown_xid_is_ignored():
    core = to_main(make_core())
    assert send(core, *pkg_out(999, verdict(pb.VERDICT_BENIGN, 1))) == []
    assert core.counters.unmatched_pkg_out == 1


def test_mirror_and_sample_send_without_waiting_and_fill_rt():
    core = to_main(make_core())
    add_rule(core, [rules.mirror()], source_id="watched")
    add_rule(core, [rules.drop(), rules.sample(1.0)], source_id="sampled")
    res = decide(core, x_of(0.3), source="watched")
    assert isinstance(res, Result) and res.released and res.decided_by == RULE
    res = decide(core, x_of(0.4), source="sampled")
    assert isinstance(res, Result) and not res.released
    (env,) = core.flush(0.0)
    reasons = [(i.reason, i.budget_us) for i in env.pkg_in.items]
    assert reasons == [(pb.PKG_IN_REASON_MIRROR, 0), (pb.PKG_IN_REASON_SAMPLED, 0)]
    assert core.counters.mirrored == 2 and len(core.tables.ft) == 0
    send(core, *pkg_out(env.xid, *[verdict(pb.VERDICT_ADVERSARIAL, 2)] * 2))
    assert core.counters.verdicts[("m", ADVERSARIAL)] == 2
    assert core.tables.rt.get(("m", fingerprint(x_of(0.3)), 1), 0.0) is not None


# --- session robustness ---


def test_bad_vigilance_mod_gets_error_and_the_session_goes_on():
    core = to_main(make_core())
    mod = rules.vigilance_mod("add", priority=70_000, actions=[rules.allow()])
    err = error_of(send(core, mod, xid=33))
    assert err.type == pb.ERROR_TYPE_VIGILANCE_MOD_FAILED
    assert err.code == pb.VIGILANCE_MOD_FAILED_CODE_BAD_PRIORITY and err.offending_xid == 33
    assert len(core.rules) == 1 and core.state is State.MAIN
    (echo,) = send(core, pb.EchoRequest(data=b"ping"), xid=34)
    assert echo.xid == 34 and echo.echo_reply.data == b"ping"


def test_bad_table_mod_gets_error():
    core = to_main(make_core())
    bad = pb.TableMod(table=pb.LABEL_TABLE_FT, command=pb.TABLE_MOD_COMMAND_ADD, model_id="m")
    err = error_of(send(core, bad, xid=35))
    assert (err.type, err.code) == (pb.ERROR_TYPE_TABLE_MOD_FAILED, pb.TABLE_MOD_FAILED_CODE_EPERM)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\xff\xff\xff garbage", pb.BAD_REQUEST_CODE_MALFORMED),
        (pb.Envelope(version=1, xid=5).SerializeToString(), pb.BAD_REQUEST_CODE_BAD_TYPE),
        (envelope(pb.PkgIn(model_id="m"), xid=6).SerializeToString(), pb.BAD_REQUEST_CODE_BAD_TYPE),
        # A FEATURES_REPLY nobody asked for: the shared session refuses it (either plane).
        (envelope(pb.FeaturesReply(), xid=6).SerializeToString(), pb.BAD_REQUEST_CODE_UNEXPECTED),
        (hello("again").SerializeToString(), pb.BAD_REQUEST_CODE_UNEXPECTED),
    ],
)
def test_garbage_and_unexpected_messages_get_error_not_crash(data, code):
    core = to_main(make_core())
    out = core.receive(data, 0.0)
    err = error_of(out.send)
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, code)
    assert core.state is State.MAIN and not out.close
    assert send(core, pb.BarrierRequest(), xid=9)[0].xid == 9


def test_random_bytes_never_raise():
    core = to_main(make_core())
    rng = np.random.default_rng(0)
    for n in range(300):
        out = core.receive(rng.bytes(int(rng.integers(0, 64))), 0.0)
        assert all(isinstance(e, pb.Envelope) for e in out.send), n
    assert core.state is State.MAIN


def test_stats_replies():
    core = to_main(make_core())
    add_rule(core, [rules.allow()], label=2)
    decide(core, now=2.0)
    (env,) = send(core, pb.StatsRequest(type=pb.STATS_TYPE_RULES), xid=40, now=3.0)
    assert env.xid == 40 and env.stats_reply.type == pb.STATS_TYPE_RULES
    assert sorted(r.priority for r in env.stats_reply.rules) == [0, 100]
    only = pb.StatsRequest(type=pb.STATS_TYPE_RULES, match=pb.Match(label=2))
    (env,) = send(core, only, xid=41)
    assert [r.priority for r in env.stats_reply.rules] == [100]
    (env,) = send(core, pb.StatsRequest(type=pb.STATS_TYPE_TABLES), xid=42)
    tables = {t.table: t for t in env.stats_reply.tables}
    assert set(tables) == {"rules", "rt", "ft"} and tables["ft"].active_count == 1
    (env,) = send(core, pb.StatsRequest(type=pb.STATS_TYPE_AGENT), xid=43, now=5.0)
    agent = env.stats_reply.agent
    assert (agent.agent_id, agent.inferences, agent.inspected) == ("agent-1", 1, 1)
    assert agent.uptime_s == pytest.approx(5.0)
    err = error_of(send(core, pb.StatsRequest(type=99), xid=44))
    assert err.code == pb.BAD_REQUEST_CODE_BAD_STAT


def test_role_requests_and_stale_generation():
    core = to_main(make_core())
    (env,) = send(core, pb.RoleRequest(role=pb.CONTROLLER_ROLE_MASTER, generation_id=5), xid=60)
    assert (env.xid, env.role_reply.role, env.role_reply.generation_id) == (
        60,
        pb.CONTROLLER_ROLE_MASTER,
        5,
    )
    err = error_of(send(core, pb.RoleRequest(role=pb.CONTROLLER_ROLE_MASTER, generation_id=4)))
    assert (err.type, err.code) == (
        pb.ERROR_TYPE_ROLE_REQUEST_FAILED,
        pb.ROLE_REQUEST_FAILED_CODE_STALE,
    )
    (env,) = send(core, pb.RoleRequest(role=pb.CONTROLLER_ROLE_NOCHANGE))
    assert (env.role_reply.role, env.role_reply.generation_id) == (pb.CONTROLLER_ROLE_MASTER, 5)
    # Generation ids compare modulo 2^64: they may wrap past 2^64 - 1 back to 1.
    for gen in (2**63 + 4, 2**64 - 1, 1):
        (env,) = send(core, pb.RoleRequest(role=pb.CONTROLLER_ROLE_MASTER, generation_id=gen))
        assert env.role_reply.generation_id == gen
    err = error_of(send(core, pb.RoleRequest(role=pb.CONTROLLER_ROLE_UNSPECIFIED)))
    assert err.code == pb.ROLE_REQUEST_FAILED_CODE_BAD_ROLE


def test_slave_controller_may_not_change_tables_and_gets_no_pkg_in():
    core = to_main(make_core(fail_mode=SECURE))
    send(core, pb.RoleRequest(role=pb.CONTROLLER_ROLE_SLAVE, generation_id=1))
    err = error_of(send(core, rules.vigilance_mod("add", actions=[rules.allow()])))
    assert err.code == pb.BAD_REQUEST_CODE_IS_SLAVE
    res = decide(core)
    assert (res.decided_by, res.released) == (DISCONNECTED, False)


def test_disconnect_resolves_waiters_and_keeps_rules_and_rt():
    core = to_main(make_core())
    add_rule(core, [rules.allow()], label=2)
    send(core, rt_push("m", [label_entry(fingerprint(x_of(0.9)), 1, pb.VERDICT_BENIGN)]))
    sent, queued = decide(core, x_of(0.1)), None
    core.flush(0.0)
    queued = decide(core, x_of(0.2))
    out = core.disconnected(0.5)
    assert out.settled == [sent, queued] and core.state is None
    for t in (sent, queued):
        assert (t.result.decided_by, t.result.released) == (DISCONNECTED, True)
    assert len(core.rules) == 2 and len(core.tables.rt) == 1 and len(core.tables.ft) == 0
    res = decide(core, x_of(0.3))
    assert isinstance(res, Result) and res.decided_by == DISCONNECTED
    assert decide(core, x_of(0.9)).decided_by == RT  # RT works without a controller
    to_main(core, 1.0)
    assert core.counters.reconnects == 1 and core.flush(1.0) == []


def test_echo_keepalive_declares_a_silent_controller_dead():
    core = to_main(make_core(echo_interval_s=1.0, echo_unreplied_limit=3))
    assert core.tick(0.5).send == []
    (echo,) = core.tick(1.0).send
    assert echo.WhichOneof("body") == "echo_request"
    reply = envelope(pb.EchoReply(data=echo.echo_request.data), xid=echo.xid)
    core.receive(reply.SerializeToString(), 1.002)
    assert core.echo_rtt_s == pytest.approx(0.002)
    for now in (2.0, 3.0, 4.0):
        out = core.tick(now)
        assert len(out.send) == 1 and not out.close
    out = core.tick(5.0)
    assert out.send == [] and out.close and core.state is State.CLOSED


def test_rule_timeouts_send_vigilance_removed():
    core = to_main(make_core())
    mod = rules.vigilance_mod(
        "add",
        match=pb.Match(label=1),
        actions=[rules.allow()],
        hard_timeout_s=10,
        flags=pb.VIGILANCE_MOD_FLAG_SEND_REMOVED,
        cookie=9,
    )
    send(core, mod, now=0.0)
    assert core.next_deadline() == pytest.approx(1.0)  # the echo comes first
    out = [e for e in core.tick(10.0).send if e.WhichOneof("body") == "vigilance_removed"]
    (removed,) = out
    assert removed.xid == 0 and removed.vigilance_removed.cookie == 9
    assert removed.vigilance_removed.reason == pb.REMOVED_REASON_HARD_TIMEOUT
    assert len(core.rules) == 1


def test_unanswered_pkg_in_is_forgotten_after_the_late_window():
    core = to_main(make_core(late_window_s=5.0, ft_max_age_s=1.0))
    t = decide(core)
    (env,) = core.flush(0.0)
    core.tick(1.0)
    assert len(core.tables.ft) == 0  # FT gives up first: new copies are sent again
    assert core.tick(5.0).settled == [t]
    assert t.result.decided_by == TIMEOUT
    out = deliver(core, *pkg_out(env.xid, verdict(pb.VERDICT_ADVERSARIAL, 2)), now=6.0)
    assert core.counters.unmatched_pkg_out == 1 and out.retractions == []


# --- privacy (the mechanism itself: tests/test_privacy.py) ---


def test_pkg_in_with_privacy_noise_carries_no_fingerprint_and_no_raw_logits():
    """Noised inputs; no fingerprint (FT and RT still key on the raw input's, here);
    ``label`` mode (the default with noise): no logits and confidence 0; FEATURES
    declares the whole spec."""
    noise = PrivacyNoise.parse("gaussian:2:1e-6,clip=1")
    core = make_core(ModelInfo("m", SHAPE, ("a", "b", "c"), privacy=noise))
    features = to_config(core).features_reply
    assert pb.CAPABILITY_PRIVACY_NOISE in features.capabilities
    declared = features.models[0].privacy
    assert (declared.mechanism, declared.norm, declared.logits) == (
        pb.NOISE_MECHANISM_GAUSSIAN,
        pb.NOISE_NORM_L2,
        pb.LOGITS_MODE_LABEL,
    )
    assert (declared.epsilon, declared.clip, declared.sensitivity) == (2.0, 1.0, 2.0)
    assert declared.centre == 0.5 and declared.total_epsilon == 2.0
    deliver(core, pb.BarrierRequest(), xid=8)
    x = x_of(0.5)
    decide(core, x), decide(core, x)  # the second joins the first in FT (raw fingerprint)
    assert core.counters.ft_joined == 1
    (env,) = core.flush(0.0)
    sent = tensor.decode(env.pkg_in.inputs)[0]
    assert not np.array_equal(sent, x) and sent.min() >= 0.0 and sent.max() <= 1.0
    (item,) = env.pkg_in.items
    assert item.fingerprint == b"" and item.confidence == 0.0 and item.label == 1
    assert not env.pkg_in.HasField("logits")
    assert validate_pkg_in(env.pkg_in, validate_features(features)).logits is None


def test_noised_logits_mode_sends_noised_logits_and_their_confidence():
    noise = PrivacyNoise.parse("gaussian:2,logits=noised:8,logits_clip=3")
    core = to_main(make_core(ModelInfo("m", SHAPE, ("a", "b", "c"), privacy=noise)))
    decide(core)
    (env,) = core.flush(0.0)
    sent = tensor.decode(env.pkg_in.logits)[0]
    assert sent.shape == (3,) and not np.allclose(sent, LOGITS - LOGITS.mean())
    p = np.exp(sent - sent.max())
    assert env.pkg_in.items[0].confidence == pytest.approx(1.0 / p.sum(), rel=1e-5)


def test_without_noise_the_fingerprint_and_logits_go_up_as_before():
    core = to_main(make_core(ModelInfo("m", SHAPE, ("a", "b", "c"), privacy=PrivacyNoise("none"))))
    x = x_of(0.5)
    decide(core, x)
    (env,) = core.flush(0.0)
    assert env.pkg_in.items[0].fingerprint == fingerprint(x)
    assert np.array_equal(tensor.decode(env.pkg_in.inputs)[0], x)
    assert np.array_equal(tensor.decode(env.pkg_in.logits)[0], LOGITS)
