"""The controller's sans-I/O session and core: messages and `now` in, messages out."""

import numpy as np
import pytest

from controller.config import Config
from controller.core import ControllerCore, ScoreTimes, pkg_out_timings
from controller.desired import BLOCK_PRIORITY
from controller.session import AgentSession, Closed, PkgInReceived, Ready, State
from openexample import messages, tables, tensor
from openexample.identity import Identity, Kind
from openexample.v1 import openexample_pb2 as pb
from tests.strategies import descriptor

AGENT_A1 = Identity(Kind.AGENT, "a1")


def raw(body, xid=0, version=1):
    return messages.envelope(body, xid=xid, version=version).SerializeToString()


def kinds(envs):
    return [messages.body_kind(e) for e in envs]


def features(agent_id="a1", model="m"):
    d = descriptor()
    d.model_id = model
    return pb.FeaturesReply(agent_id=agent_id, models=[d])


def handshake(s, now=0.0, agent_id="a1", model="m"):
    """HELLO, FEATURES, then the resync's BARRIER answered: the session is in MAIN."""
    out = s.receive(raw(pb.Hello(versions_bitmap=0b10)), now)
    (req,) = out.send
    assert messages.body_kind(req) == "features_request"
    out = s.receive(raw(features(agent_id, model), xid=req.xid), now)
    assert s.state is State.CONFIG and s.configured
    barrier = s.request(pb.BarrierRequest())
    s.receive(raw(pb.BarrierReply(), xid=barrier.xid), now)
    return out


def pkg_in(n=2, model="m", source="u1", fp=None, fill=0.0):
    """``fp``: the claimed fingerprint (default: the true one of the zero input)."""
    x = np.full((n, 1, 4, 4), fill, np.float32)
    items = [
        pb.PkgInItem(
            label=1,
            confidence=0.9,
            reason=pb.PKG_IN_REASON_TABLE_MISS,
            source_id=source,
            fingerprint=tables.fingerprint(x[i]) if fp is None else fp,
            budget_us=350,
        )
        for i in range(n)
    ]
    return pb.PkgIn(model_id=model, inputs=tensor.encode(x), items=items)


# --- session ---


def test_handshake_reaches_main_with_models():
    s = AgentSession("c1", identity=AGENT_A1, now=0.0)
    assert kinds(s.start()) == ["hello"]
    out = handshake(s)
    assert s.state is State.MAIN
    (ev,) = out.events
    assert isinstance(ev, Ready) and ev.agent_id == "a1" and set(ev.models) == {"m"}


def test_bad_messages_get_typed_errors_and_the_session_lives():
    s = AgentSession("c1", identity=AGENT_A1, now=0.0)
    handshake(s)
    out = s.receive(b"\xff\xff garbage", 1.0)
    assert kinds(out.send) == ["error"]
    assert out.send[0].error.code == pb.BAD_REQUEST_CODE_MALFORMED
    out = s.receive(raw(pkg_in(model="nope"), xid=7), 1.0)
    assert out.send[0].error.code == pb.BAD_REQUEST_CODE_UNKNOWN_MODEL
    assert out.send[0].xid == 7
    out = s.receive(raw(pkg_in(), xid=8, version=9), 1.0)
    assert out.send[0].error.code == pb.BAD_REQUEST_CODE_BAD_VERSION
    out = s.receive(raw(pb.PkgOut(), xid=9), 1.0)
    assert out.send[0].error.code == pb.BAD_REQUEST_CODE_BAD_TYPE
    assert s.state is State.MAIN
    out = s.receive(raw(pkg_in(), xid=10), 1.0)
    assert isinstance(out.events[0], PkgInReceived) and out.events[0].xid == 10


def test_nan_input_is_refused_typed():
    s = AgentSession("c1", identity=AGENT_A1, now=0.0)
    handshake(s)
    p = pkg_in(1)
    tensor.encode(np.full((1, 1, 4, 4), np.nan, np.float32), out=p.inputs)
    out = s.receive(raw(p, xid=3), 0.0)
    assert out.send[0].error.type == pb.ERROR_TYPE_BAD_TENSOR
    assert out.send[0].error.code == pb.BAD_TENSOR_CODE_NOT_FINITE


def test_incompatible_hello_fails_and_closes():
    s = AgentSession("c1", identity=AGENT_A1, now=0.0)
    out = s.receive(raw(pb.Hello(versions_bitmap=0b100), version=2), 0.0)
    assert out.send[0].error.type == pb.ERROR_TYPE_HELLO_FAILED
    assert out.closed and s.state is State.CLOSED


def test_pkg_in_before_features_is_unexpected_but_not_fatal():
    s = AgentSession("c1", identity=AGENT_A1, now=0.0)
    s.receive(raw(pb.Hello(versions_bitmap=0b10)), 0.0)
    out = s.receive(raw(pkg_in(), xid=5), 0.0)
    assert out.send[0].error.code == pb.BAD_REQUEST_CODE_UNEXPECTED
    assert s.state is State.FEATURES


def test_unusable_features_close_the_session():
    s = AgentSession("c1", identity=AGENT_A1, now=0.0)
    (req,) = s.receive(raw(pb.Hello(versions_bitmap=0b10)), 0.0).send
    out = s.receive(raw(pb.FeaturesReply(agent_id="a1"), xid=req.xid), 0.0)
    assert out.send[0].error.code == pb.BAD_REQUEST_CODE_BAD_FIELD
    assert out.closed


def test_echo_liveness_declares_a_silent_agent_dead():
    s = AgentSession("c1", identity=AGENT_A1, echo_interval_s=1.0, echo_unreplied_limit=2, now=0.0)
    handshake(s)
    assert kinds(s.tick(1.0).send) == ["echo_request"]
    assert kinds(s.tick(2.0).send) == ["echo_request"]
    assert s.tick(3.0).closed
    # ... but any traffic keeps it alive.
    s = AgentSession("c1", identity=AGENT_A1, echo_interval_s=1.0, echo_unreplied_limit=2, now=0.0)
    handshake(s)
    for t in range(1, 10):
        out = s.tick(float(t))
        assert not out.closed
        s.receive(raw(pb.EchoReply(), xid=out.send[0].xid), t + 0.1)


def test_handshake_timeout():
    s = AgentSession("c1", identity=AGENT_A1, handshake_timeout_s=5.0, echo_interval_s=100, now=0.0)
    assert not s.tick(4.0).closed
    assert any(isinstance(e, Closed) for e in s.tick(5.0).events)


# --- core ---


@pytest.fixture
def core():
    cfg = Config(journal=":memory:", max_workload=4, block_hard_timeout_s=60)
    return ControllerCore(cfg, detected_models={"m"}, now=0.0)


def connect(core, agent_id, model="m", identity=None):
    """An agent through HELLO and FEATURES, with the identity its certificate proves
    (default: agent/<agent_id>)."""
    sid, _ = core.open_session(0.0, identity or Identity(Kind.AGENT, agent_id))
    step = core.on_bytes(sid, raw(pb.Hello(versions_bitmap=0b10)), 0.0)
    (req,) = [e for _, e in step.send]
    step = core.on_bytes(sid, raw(features(agent_id, model), xid=req.xid), 0.0)
    return sid, step


def test_ready_resyncs_the_agent(core):
    sid, step = connect(core, "a1")
    envs = [e for s, e in step.send if s == sid]
    assert (
        kinds(envs)[0] == "vigilance_mod"
        and envs[0].vigilance_mod.command == pb.VIGILANCE_MOD_COMMAND_DELETE
    )
    assert kinds(envs)[-1] == "barrier_request"
    adds = [e.vigilance_mod for e in envs if e.HasField("vigilance_mod")][1:]
    miss = [m for m in adds if m.priority == 0]
    assert len(miss) == 1 and miss[0].actions[0].inspect.budget_us == Config().budget_us


def test_no_detector_answers_unknown(core):
    sid, _ = connect(core, "a1", model="m")
    core.detected_models.clear()
    step = core.on_bytes(sid, raw(pkg_in(2), xid=11), 0.1)
    ((_, out),) = step.send
    assert out.xid == 11
    assert [i.unknown_reason for i in out.pkg_out.items] == [pb.UNKNOWN_REASON_NO_DETECTOR] * 2


def test_overload_answers_at_once(core):
    sid, _ = connect(core, "a1")
    step = core.on_bytes(sid, raw(pkg_in(3), xid=1), 0.1)
    assert len(step.jobs) == 1 and core.workload == 3
    step = core.on_bytes(sid, raw(pkg_in(2), xid=2), 0.1)  # 3 + 2 > W0 = 4
    assert not step.jobs and step.overloaded == 2
    assert step.send[0][1].pkg_out.items[0].unknown_reason == pb.UNKNOWN_REASON_OVERLOADED


def adversarial(n, corrected=None):
    item = pb.PkgOutItem(verdict=pb.VERDICT_ADVERSARIAL, action=pb.VERDICT_ACTION_DROP, score=2.0)
    item.evidence.add(detector="d", score=2.0, threshold=1.0, flagged=True)
    if corrected is not None:
        item.corrected_label = corrected
    return [item] * n


def test_adversarial_verdict_pushes_rt_to_other_agents_and_journals(core):
    s1, _ = connect(core, "a1")
    s2, _ = connect(core, "a2")
    s3, _ = connect(core, "a3", model="other")
    (job,) = core.on_bytes(s1, raw(pkg_in(1), xid=5), 0.1).jobs
    step = core.on_results(job, adversarial(1), 0.2)
    by_sid = {}
    for sid, env in step.send:
        by_sid.setdefault(sid, []).append(messages.body_kind(env))
    assert by_sid[s1] == ["pkg_out"]
    assert by_sid[s2] == ["table_mod"]  # swift vigilance
    assert s3 not in by_sid  # another model
    (push,) = [e for s, e in step.send if s == s2]
    assert push.table_mod.entries[0].fingerprint == tables.fingerprint(
        np.zeros((1, 4, 4), np.float32)
    )
    assert len(step.incidents) == 1 and step.incidents[0].source_id == "u1"
    assert core.workload == 0
    # A later agent of the model gets the RT entry on connect.
    s4, st = connect(core, "a4")
    assert "table_mod" in kinds(e for s, e in st.send if s == s4)


def test_on_results_puts_the_stage_timings_into_pkg_out(core):
    sid, _ = connect(core, "a1")
    (job,) = core.on_bytes(sid, raw(pkg_in(2), xid=5), 0.1).jobs
    assert job.received_at == 0.1
    times = ScoreTimes(0.1002, 0.1005, 7, (("desvig", 0.00025), ("margin", 0.00001)))
    step = core.on_results(job, benign(2), 0.1006, timings=times)
    ((_, env),) = step.send
    t = env.pkg_out.timings
    assert env.xid == 5 and env.pkg_out.HasField("timings")
    assert (t.queue_us, t.score_us, t.reply_us, t.controller_us) == (200, 300, 100, 600)
    assert t.batch_items == 7
    assert [(d.detector, d.us) for d in t.detectors] == [("desvig", 250), ("margin", 10)]
    # Boundaries are rounded, not spans: the stages always add up to controller_us.
    t = pkg_out_timings(job, ScoreTimes(0.1000004, 0.1000009, 1), 0.1000014)
    assert t.queue_us + t.score_us + t.reply_us == t.controller_us == 1
    # No timings given (a shell that does not measure): no Timings on the wire.
    (job,) = core.on_bytes(sid, raw(pkg_in(1), xid=6), 0.2).jobs
    ((_, env),) = core.on_results(job, benign(1), 0.3).send
    assert not env.pkg_out.HasField("timings")


def benign(n):
    return [pb.PkgOutItem(verdict=pb.VERDICT_BENIGN, action=pb.VERDICT_ACTION_RELEASE)] * n


def test_source_tracing_blocks_a_repeat_offender_on_its_own_agent(core):
    s1, _ = connect(core, "a1")
    connect(core, "a2")
    blocked = []
    for xid in range(1, 6):
        (job,) = core.on_bytes(s1, raw(pkg_in(1, source="evil"), xid=xid), xid).jobs
        step = core.on_results(job, adversarial(1), xid)
        blocked += step.blocked
        assert bool(step.blocked) == (xid == 5), xid  # the 5th: p = 0.02**5 < 1e-6
    assert [d.key for d in blocked] == [("a1", "evil")]
    mods = [(s, e.vigilance_mod) for s, e in step.send if e.HasField("vigilance_mod")]
    # Namespaced by the agent: a2's users called "evil" are someone else.
    assert {s for s, _ in mods} == {s1}
    mod = mods[0][1]
    assert mod.match.source_id == "evil" and mod.priority == BLOCK_PRIORITY
    assert mod.actions[0].HasField("drop") and mod.hard_timeout_s == 60
    # The block is part of a1's desired rules: it comes back when a1 reconnects, and a
    # new agent never gets it.
    core.close_session(s1, "gone", 10.0)
    s1b, st = connect(core, "a1")
    s3, st3 = connect(core, "a3")

    def has_block(step, sid):
        return any(
            e.HasField("vigilance_mod") and e.vigilance_mod.match.source_id == "evil"
            for s, e in step.send
            if s == sid
        )

    assert has_block(st, s1b) and not has_block(st3, s3)


def test_source_tracing_does_not_block_an_honest_busy_source(core):
    """Clean traffic flagged at the detectors' calibrated FPR is no evidence: 3,000
    verdicts at 1,000/s with 1.3% false positives (the old rule: blocked in a second)."""
    sid, _ = connect(core, "a1")
    rng = np.random.default_rng(7)
    flagged = 0
    for i in range(3000):
        now = 1.0 + i / 1000
        (job,) = core.on_bytes(sid, raw(pkg_in(1, source="plc-7"), xid=i + 1), now).jobs
        bad = rng.random() < 0.013
        flagged += bad
        step = core.on_results(job, adversarial(1) if bad else benign(1), now)
        assert not step.blocked, i
    assert flagged >= 30  # enough false positives that a count rule would have fired


def test_a_forged_fingerprint_is_never_pushed(core):
    """RT poisoning: an adversarial input that claims a clean image's fingerprint. The
    controller keys entries by its own fingerprint of what it scored: no push."""
    s1, _ = connect(core, "a1")
    connect(core, "a2")
    clean_fp = tables.fingerprint(np.full((1, 4, 4), 0.5, np.float32))
    (job,) = core.on_bytes(s1, raw(pkg_in(1, fp=clean_fp), xid=1), 0.1).jobs
    step = core.on_results(job, adversarial(1), 0.2)
    assert [s for s, e in step.send if e.HasField("table_mod")] == []
    assert step.fingerprint_mismatches == [("a1", "m")]
    assert len(core.rt) == 0
    assert len(step.incidents) == 1  # still journaled: the verdict stands


def test_an_agent_speaks_only_for_its_certificate(core):
    """FEATURES with another agent's id, or from a non-agent identity: HELLO_FAILED/EPERM
    and the session closes; nothing reaches the real agent's tables."""
    victim, _ = connect(core, "victim")
    for ident in (Identity(Kind.AGENT, "mallory"), Identity(Kind.OPERATOR, "victim"), None):
        sid, _ = core.open_session(0.0, ident)
        step = core.on_bytes(sid, raw(pb.Hello(versions_bitmap=0b10)), 0.0)
        (req,) = [e for _, e in step.send]
        step = core.on_bytes(sid, raw(features("victim"), xid=req.xid), 0.0)
        (err,) = [e.error for _, e in step.send]
        assert (err.type, err.code) == (pb.ERROR_TYPE_HELLO_FAILED, pb.HELLO_FAILED_CODE_EPERM)
        assert step.closed and not step.ready
        assert [(s, claimed) for s, claimed, _ in step.refused] == [(sid, "victim")]
    assert core.sessions_of(agent_id="victim") == [victim]


def _handshake_as(core, agent_id, descriptor_):
    """HELLO, then a FEATURES_REPLY declaring ``descriptor_``: the core's last step."""
    sid, _ = core.open_session(0.0, Identity(Kind.AGENT, agent_id))
    step = core.on_bytes(sid, raw(pb.Hello(versions_bitmap=0b10)), 0.0)
    (req,) = [e for _, e in step.send]
    reply = pb.FeaturesReply(agent_id=agent_id, models=[descriptor_])
    return sid, core.on_bytes(sid, raw(reply, xid=req.xid), 0.0)


def test_features_that_do_not_fit_the_detectors_are_refused():
    """A model declared with another input shape or class count than its detectors were
    trained for: HELLO_FAILED/INCOMPATIBLE naming both, the session closes, and the
    shell gets the refusal to log; a fitting one, or a model without detectors, passes."""
    from controller.session import Expected

    cfg = Config(journal=":memory:")
    core = ControllerCore(cfg, {"m"}, 0.0, expected={"m": Expected((1, 4, 4), 3)})
    d = descriptor()
    d.model_id, d.input_shape[:], d.class_names[:] = "m", [1, 4, 4], ["a", "b", "c"]
    _, step = _handshake_as(core, "fits", d)
    assert step.ready and not step.refused
    for shape, classes, said in (([1, 8, 8], 3, "(1, 8, 8) and 3"), ([1, 4, 4], 10, "10 classes")):
        bad = pb.ModelDescriptor()
        bad.CopyFrom(d)
        bad.input_shape[:], bad.class_names[:] = shape, [str(i) for i in range(classes)]
        sid, step = _handshake_as(core, "misfit", bad)
        (err,) = [e.error for _, e in step.send]
        assert (err.type, err.code) == (
            pb.ERROR_TYPE_HELLO_FAILED,
            pb.HELLO_FAILED_CODE_INCOMPATIBLE,
        )
        assert said in err.text and "(1, 4, 4) and 3" in err.text
        assert step.closed and not step.ready
        assert step.refused == [(sid, "misfit", f"HELLO_FAILED/INCOMPATIBLE: {err.text}")]
    other = pb.ModelDescriptor()
    other.CopyFrom(d)
    other.model_id, other.input_shape[:] = "no-detectors", [1, 8, 8]
    _, step = _handshake_as(core, "other", other)
    assert step.ready
    assert core.sessions_of(agent_id="misfit") == []


def test_an_agent_running_another_model_file_is_named():
    """FEATURES' model_digest against the one the detectors were trained with: the
    step names the agent, the model and both digests (the shell warns); same digest, or
    artifacts that recorded none: nothing."""
    from controller.session import Expected

    core = ControllerCore(
        Config(journal=":memory:"), {"m"}, 0.0, expected={"m": Expected((1, 4, 4), 3, "sha256:aa")}
    )
    for agent_id, digest, named in (("same", "sha256:aa", False), ("other", "sha256:bb", True)):
        d = descriptor()
        d.model_digest = digest
        _, step = _handshake_as(core, agent_id, d)
        assert step.ready
        assert step.other_models == ([(agent_id, "m", digest, "sha256:aa")] if named else [])
    core.expected["m"] = Expected((1, 4, 4), 3)
    d = descriptor()
    d.model_digest = "sha256:cc"
    assert _handshake_as(core, "unknown", d)[1].other_models == []


def test_a_new_connection_of_an_agent_replaces_the_old_one(core):
    old, _ = connect(core, "a1")
    new, step = connect(core, "a1")
    assert step.replaced == [(old, "a1")] and (old, step.closed[0][1]) == step.closed[0]
    assert core.sessions_of(agent_id="a1") == [new]


def test_plaintext_takes_the_claimed_id():
    cfg = Config(journal=":memory:", plaintext=True)
    core = ControllerCore(cfg, detected_models={"m"}, now=0.0)
    sid, _ = core.open_session(0.0)
    step = core.on_bytes(sid, raw(pb.Hello(versions_bitmap=0b10)), 0.0)
    (req,) = [e for _, e in step.send]
    step = core.on_bytes(sid, raw(features("anyone"), xid=req.xid), 0.0)
    assert step.ready == [sid] and core.sessions[sid].agent_id == "anyone"


def test_operator_mod_validated_before_reaching_agents(core):
    connect(core, "a1")
    bad = pb.VigilanceMod(command=pb.VIGILANCE_MOD_COMMAND_ADD, priority=10)  # no actions
    with pytest.raises(Exception) as e:
        core.mod_rules(bad, 1.0)
    assert getattr(e.value, "error_type", None) == pb.ERROR_TYPE_VIGILANCE_MOD_FAILED


def test_draining_answers_new_work_shutting_down(core):
    sid, _ = connect(core, "a1")
    core.draining = True
    step = core.on_bytes(sid, raw(pkg_in(1), xid=3), 0.1)
    assert not step.jobs
    assert step.send[0][1].pkg_out.items[0].unknown_reason == pb.UNKNOWN_REASON_SHUTTING_DOWN


# --- conformance: xids, declared batch, per-agent caps ---


def _error(step):
    (env,) = [e for _, e in step.send if e.HasField("error")]
    return env.error


def test_pkg_in_xids_are_answered_once(core):
    sid, _ = connect(core, "a1")
    err = _error(core.on_bytes(sid, raw(pkg_in(1), xid=0), 0.1))
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_BAD_XID)
    (job,) = core.on_bytes(sid, raw(pkg_in(1), xid=5), 0.1).jobs
    step = core.on_bytes(sid, raw(pkg_in(1), xid=5), 0.1)  # still in flight
    assert not step.jobs and _error(step).offending_xid == 5
    core.on_results(job, benign(1), 0.2)
    assert core.on_bytes(sid, raw(pkg_in(1), xid=5), 0.3).jobs  # answered: free again


def test_the_batch_an_agent_declares_is_enforced(core):
    sid, _ = core.open_session(0.0, Identity(Kind.AGENT, "a1"))
    step = core.on_bytes(sid, raw(pb.Hello(versions_bitmap=0b10)), 0.0)
    (req,) = [e for _, e in step.send]
    reply = features("a1")
    reply.max_batch_items = 2
    core.on_bytes(sid, raw(reply, xid=req.xid), 0.0)
    err = _error(core.on_bytes(sid, raw(pkg_in(3), xid=1), 0.1))
    assert err.code == pb.BAD_REQUEST_CODE_BAD_BATCH and "declared" in err.text
    assert core.on_bytes(sid, raw(pkg_in(2), xid=2), 0.1).jobs


def test_per_agent_in_flight_cap_and_rate_answer_overloaded():
    cfg = Config(journal=":memory:", max_in_flight_per_agent=3)
    core = ControllerCore(cfg, detected_models={"m"}, now=0.0)
    a, _ = connect(core, "a")
    b, _ = connect(core, "b")
    assert core.on_bytes(a, raw(pkg_in(3), xid=1), 0.0).jobs
    step = core.on_bytes(a, raw(pkg_in(1), xid=2), 0.0)  # 4 in flight > 3
    assert not step.jobs and step.overloaded == 1
    assert step.send[0][1].pkg_out.items[0].unknown_reason == pb.UNKNOWN_REASON_OVERLOADED
    assert core.on_bytes(b, raw(pkg_in(3), xid=1), 0.0).jobs  # b has a cap of its own

    cfg = Config(journal=":memory:", max_rate_per_agent=10, rate_burst=4)
    core = ControllerCore(cfg, detected_models={"m"}, now=0.0)
    c, _ = connect(core, "c")
    assert core.on_bytes(c, raw(pkg_in(3), xid=1), 0.0).jobs  # burst 4: 1 token left
    assert core.on_bytes(c, raw(pkg_in(2), xid=2), 0.0).overloaded == 2
    assert core.on_bytes(c, raw(pkg_in(1), xid=3), 0.0).jobs
    assert core.on_bytes(c, raw(pkg_in(1), xid=4), 0.0).overloaded == 1
    assert core.on_bytes(c, raw(pkg_in(1), xid=5), 0.15).jobs  # 10/s: a token again
