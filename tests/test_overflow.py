"""Work over W0 handed to a neighbour (controller/overflow.py): the sans-I/O decisions,
then real Mosquitto, two controllers and an agent."""

from __future__ import annotations

import contextlib
import time

import pytest

from controller import overflow
from controller.cluster import ClusterState
from controller.config import Config
from controller.core import REMOTE_SID, ControllerCore
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb
from tests.strategies import descriptor
from tests.test_controller_core import adversarial, connect, pkg_in, raw

A, B = "controller/ctl-a", "controller/ctl-b"


def _core(max_workload: int = 0) -> ControllerCore:
    core = ControllerCore(Config(journal=":memory:", max_workload=max_workload), {"m"}, 0.0)
    core.neighbours_free = True
    core.forward_rtt = overflow.RoundTrip(100e-6)  # the items' budgets are 350 us
    return core


def test_over_w0_a_pkg_in_is_forwarded_and_the_neighbours_answer_goes_to_the_agent():
    core = _core()
    sid, _ = connect(core, "a1")
    step = core.on_bytes(sid, raw(pkg_in(2), xid=5), 1.0)
    assert not step.jobs and not step.send and step.overloaded == 0
    (fwd,) = step.forwards
    assert fwd.request.agent_id == "a1" and fwd.request.model.model_id == "m"
    assert len(fwd.request.pkg.items) == 2 and fwd.deadline == pytest.approx(1.0 + 350e-6)
    answer = pb.PkgOut(model_id="m", items=adversarial(2))
    step = core.on_forward_answer(fwd.key, answer, B, 0, 1.0002)
    ((to, env),) = step.send
    assert to == sid and env.xid == 5 and env.pkg_out.decided_by == B
    assert [i.verdict for i in env.pkg_out.items] == [pb.VERDICT_ADVERSARIAL] * 2
    assert core.forward_rtt.estimate_s == pytest.approx(0.0002)
    # a late copy of the answer changes nothing
    assert not core.on_forward_answer(fwd.key, answer, B, 0, 1.0003).send


def test_no_forward_without_a_free_neighbour_or_a_budget_that_covers_the_round_trip():
    core = _core()
    sid, _ = connect(core, "a1")
    core.neighbours_free = False
    step = core.on_bytes(sid, raw(pkg_in(1), xid=1), 1.0)
    assert not step.forwards and step.overloaded == 1
    (env,) = [e for _, e in step.send]
    assert env.pkg_out.items[0].unknown_reason == pb.UNKNOWN_REASON_OVERLOADED
    core.neighbours_free = True
    core.forward_rtt.observe(0.001)  # a forward costs 1 ms; the items give 350 us
    step = core.on_bytes(sid, raw(pkg_in(1), xid=2), 1.0)
    assert not step.forwards and step.overloaded == 1


def test_a_neighbour_that_does_not_answer_in_time_leaves_the_agent_overloaded():
    core = _core()
    sid, _ = connect(core, "a1")
    (fwd,) = core.on_bytes(sid, raw(pkg_in(1), xid=3), 1.0).forwards
    assert core.next_deadline() <= fwd.deadline
    step = core.on_tick(fwd.deadline)
    ((_, env),) = [(s, e) for s, e in step.send if e.HasField("pkg_out")]
    assert env.pkg_out.items[0].unknown_reason == pb.UNKNOWN_REASON_OVERLOADED
    assert step.overloaded == 1 and not core.forwarded
    # a refusal answers at once, with the neighbour's reason
    (fwd,) = core.on_bytes(sid, raw(pkg_in(1), xid=4), 2.0).forwards
    step = core.on_forward_answer(fwd.key, None, B, pb.UNKNOWN_REASON_NO_DETECTOR, 2.0001)
    assert step.send[0][1].pkg_out.items[0].unknown_reason == pb.UNKNOWN_REASON_NO_DETECTOR


def _request(n=1, model="m", **kw) -> cpb.WorkRequest:
    d = descriptor(classes=10)
    d.model_id = model
    return cpb.WorkRequest(agent_id="a9", model=d, pkg=pkg_in(n, model=model), **kw)


def test_work_from_a_neighbour_is_scored_here_and_answered_on_the_bus():
    core = _core(max_workload=10)
    (job,) = core.admit_work(A, _request(2), "reply-to", 1.0).jobs
    assert job.sid == REMOTE_SID and job.agent_id == "a9" and core.workload == 2
    step = core.on_results(job, adversarial(2), 1.1)
    ((reply_to, answer),) = step.answers
    assert reply_to == "reply-to" and len(answer.pkg_out.items) == 2
    assert answer.pkg_out.HasField("timings") is False  # no ScoreTimes given here
    assert core.workload == 0
    # its adversarial verdicts are this controller's own: RT entries for the cluster
    assert len(step.rt_added) == 2 and step.incidents[0].agent_id == "a9"


@pytest.mark.parametrize(
    ("request_", "reason", "detail"),
    [
        (_request(model="other"), pb.UNKNOWN_REASON_NO_DETECTOR, "no detectors for 'other'"),
        (_request(11), pb.UNKNOWN_REASON_OVERLOADED, "over W0 here too"),
    ],
)
def test_work_is_refused_with_a_reason_never_passed_on(request_, reason, detail):
    core = _core(max_workload=10)
    step = core.admit_work(A, request_, "r", 1.0)
    ((_, answer),) = step.answers
    assert answer.refused == reason and detail in answer.detail
    assert not step.jobs and not step.forwards


def test_work_with_a_bad_tensor_is_refused_not_raised():
    req = _request(2)
    req.pkg.inputs.shape[:] = [2, 1, 4, 5]  # the declaration says 1x4x4
    ((_, answer),) = _core(10).admit_work(A, req, "r", 1.0).answers
    assert answer.refused == pb.UNKNOWN_REASON_UNSPECIFIED and "bad work from" in answer.detail


def test_topics_say_who_sent_and_who_answered():
    state = ClusterState(A, 7)
    msg = state.message(1.0, work=_request())
    got = overflow.parse_request(overflow.work_topic(A), msg.SerializeToString())
    assert got.sender == A and got.request is not None and not got.refused
    # a request on someone else's work topic: refused
    got = overflow.parse_request(overflow.work_topic(B), msg.SerializeToString())
    assert got.refused.startswith("sender 'controller/ctl-a' on the topic of controller/ctl-b")
    answer = ClusterState(B, 3).message(1.0, answer=cpb.WorkAnswer(detail="x"))
    name = f"{overflow.answers_topic(A)}/{B}"
    got = overflow.parse_answer(name, answer.SerializeToString(), A)
    assert got.sender == B and got.answer.detail == "x"
    forged = f"{overflow.answers_topic(A)}/controller/ctl-c"  # where ctl-c may write
    assert (
        "on the topic of controller/ctl-c"
        in overflow.parse_answer(forged, answer.SerializeToString(), A).refused
    )
    assert overflow.parse_answer(f"{overflow.answers_topic(B)}/{B}", b"", A).refused
    assert overflow.work_subscription() == "$share/openexample-work/openexample/v1/cluster/+/+/work"


# --- real processes ----------------------------------------------------------------------


@contextlib.contextmanager
def clustered(tmp_path, artifacts, controllers: dict[str, dict]):
    """A broker and a controller per name (its config: the default set for MODEL_ID,
    then the dict's keys; ``cluster``'s go into the bus settings), all on one
    development CA; every process stopped at the end, even on failure."""
    from bench.procs import BrokerProcess, ControllerProcess
    from openexample.pki import DevPki
    from tests.test_cluster import MODEL_ID, _needs_mosquitto, _wait_log

    _needs_mosquitto()
    pki = DevPki(tmp_path / "pki")
    broker = BrokerProcess(tmp_path / "broker", pki)
    procs = [broker]
    try:
        broker.start()
        ctl = {}
        for name, extra in controllers.items():
            model = {"detectors": [str(p) for p in artifacts], **extra.pop("model", {})}
            bus = {"broker": broker.url, "workload_interval_s": 0.2, **extra.pop("cluster", {})}
            cfg = {
                "controller_id": name,
                "models": {MODEL_ID: model},
                "budget_us": 3_000_000,
                "cluster": bus,
                **extra,
            }
            ctl[name] = ControllerProcess(tmp_path / name, cfg, pki=pki)
            procs.append(ctl[name])
            ctl[name].start()
        for proc in ctl.values():
            _wait_log(proc, "cluster bus up")
        yield ctl
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture
def pair(tmp_path, artifacts):
    """ctl-a with W0 = 1 (a PKG_IN of two items is over it), ctl-b with room."""
    with clustered(
        tmp_path, artifacts, {"ctl-a": {"max_workload": 1}, "ctl-b": {"max_workload": 4096}}
    ) as ctl:
        yield ctl["ctl-a"], ctl["ctl-b"]


@pytest.mark.integration
def test_work_over_w0_is_scored_by_the_neighbour_and_refused_alone_without_it(
    pair, fgsm, mnist, example_model
):
    from agents import attach
    from tests.test_cluster import MODEL_ID

    a, b = pair
    g = attach(
        str(example_model),
        controller=a.address,
        model_id=MODEL_ID,
        input_shape=(1, 28, 28),
        budget_us=3_000_000,
        connect_timeout_s=30,
        **a.agent_tls("line-a1"),
    )
    try:
        assert g.connected
        clean, adv = fgsm
        # until ctl-a has seen ctl-b's load (before, it answers UNKNOWN/OVERLOADED itself;
        # UNKNOWN answers are not kept, so each batch asks again)
        deadline = time.monotonic() + 20
        i = 0
        rs = g.batch(clean[i : i + 2])
        while rs[0].reason != f"scored by {B}" and time.monotonic() < deadline:
            time.sleep(0.1)
            i += 2
            rs = g.batch(clean[i : i + 2])
        for r in rs:
            assert r.decided_by == "controller" and r.reason == f"scored by {B}", r
            assert r.verdict == "benign" and r.released
        rs = g.batch(adv[:2])
        for r in rs:
            assert (r.verdict, r.released, r.reason) == ("adversarial", False, f"scored by {B}")
        # ctl-b's RT entries came back to ctl-a over the bus: a re-send is refused at once
        deadline = time.monotonic() + 10
        while g(adv[0]).decided_by != "rt" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert g(adv[0]).decided_by == "rt"
        # ctl-b gone: ctl-a has no neighbour, and says OVERLOADED at once
        b.stop()
        deadline = time.monotonic() + 15
        rs = g.batch(mnist.test.x[500:502])
        while rs[0].reason != "overloaded" and time.monotonic() < deadline:
            time.sleep(0.2)
            i += 2
            rs = g.batch(mnist.test.x[500 + i : 502 + i])
        assert [(r.verdict, r.reason) for r in rs] == [("unknown", "overloaded")] * 2, rs
    finally:
        g.close()
