"""k-of-n consensus among controllers (controller/consensus.py): the votes decide, a
voter records nothing, no quorum is UNKNOWN; then real Mosquitto and three controllers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from controller.config import Config, ConfigError, ModelConfig, load
from controller.core import ControllerCore
from openexample.v1 import openexample_pb2 as pb
from tests.test_controller_core import adversarial, benign, connect, pkg_in, raw
from tests.test_overflow import _request, clustered

A, B, C = "controller/ctl-a", "controller/ctl-b", "controller/ctl-c"
ADV, BEN, UNK = pb.VERDICT_ADVERSARIAL, pb.VERDICT_BENIGN, pb.VERDICT_UNKNOWN


def _core(k: int, peers: int) -> ControllerCore:
    cfg = Config(journal=":memory:", models={"m": ModelConfig(consensus=k)})
    core = ControllerCore(cfg, {"m"}, 0.0)
    core.peers_up = peers
    return core


def _pkg_out(step) -> pb.PkgOut | None:
    outs = [e.pkg_out for _, e in step.send if e.HasField("pkg_out")]
    return outs[0] if outs else None


def test_the_votes_decide_and_the_decision_is_recorded_once():
    core = _core(k=2, peers=2)
    sid, _ = connect(core, "a1")
    step = core.on_bytes(sid, raw(pkg_in(2), xid=5), 1.0)
    (job,) = step.jobs
    ((key, request, deadline),) = step.votes
    assert request.vote and request.agent_id == "a1" and deadline == pytest.approx(1.0 + 350e-6)
    # scored here first: flagged, but one vote is not two
    step = core.on_results(job, adversarial(2), 1.0001)
    assert _pkg_out(step) is None and not step.rt_added and not step.incidents
    # ctl-b agrees: two of three, decided
    step = core.on_vote(key, pb.PkgOut(items=adversarial(2)), B, 1.0002)
    out = _pkg_out(step)
    assert [i.verdict for i in out.items] == [ADV, ADV]
    assert len(step.rt_added) == 2 and len(step.incidents) == 2  # recorded here, once
    assert not core.ballots and core.workload == 0
    # a late vote changes nothing
    assert _pkg_out(core.on_vote(key, pb.PkgOut(items=benign(2)), C, 1.0003)) is None


def test_votes_that_come_first_wait_for_the_local_score_and_disagreement_has_no_quorum():
    core = _core(k=2, peers=1)
    sid, _ = connect(core, "a1")
    step = core.on_bytes(sid, raw(pkg_in(1), xid=1), 1.0)
    ((key, _, _),) = step.votes
    assert _pkg_out(core.on_vote(key, pb.PkgOut(items=benign(1)), B, 1.0001)) is None
    step = core.on_results(step.jobs[0], adversarial(1), 1.0002)
    (item,) = _pkg_out(step).items  # both answered, one each way: no two agree
    assert (item.verdict, item.unknown_reason) == (UNK, pb.UNKNOWN_REASON_NO_QUORUM)
    assert not step.rt_added


def test_a_peer_that_does_not_vote_in_time_leaves_no_quorum():
    core = _core(k=2, peers=1)
    sid, _ = connect(core, "a1")
    step = core.on_bytes(sid, raw(pkg_in(1), xid=1), 1.0)
    (job,) = step.jobs
    assert core.next_deadline() <= 1.0 + 350e-6
    assert _pkg_out(core.on_tick(2.0)) is None  # expired, but not scored here yet
    (item,) = _pkg_out(core.on_results(job, benign(1), 2.1)).items
    assert item.unknown_reason == pb.UNKNOWN_REASON_NO_QUORUM


def test_fewer_controllers_than_k_answer_no_quorum_at_once_and_k_1_is_alone():
    core = _core(k=3, peers=1)
    sid, _ = connect(core, "a1")
    step = core.on_bytes(sid, raw(pkg_in(1), xid=1), 1.0)
    assert not step.jobs and not step.votes
    assert _pkg_out(step).items[0].unknown_reason == pb.UNKNOWN_REASON_NO_QUORUM
    core = _core(k=1, peers=2)
    sid, _ = connect(core, "a1")
    step = core.on_bytes(sid, raw(pkg_in(1), xid=1), 1.0)
    assert step.jobs and not step.votes


def test_a_voter_scores_and_answers_and_records_nothing():
    core = _core(k=1, peers=1)
    (job,) = core.admit_work(A, _request(2, vote=True), "reply-to", 1.0).jobs
    assert job.vote
    step = core.on_results(job, adversarial(2), 1.1)
    ((reply_to, answer),) = step.answers
    assert reply_to == "reply-to" and [i.verdict for i in answer.pkg_out.items] == [ADV, ADV]
    assert not (step.rt_added or step.incidents or step.blocked or step.send)


def test_consensus_needs_a_cluster(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plaintext: true\nlisten: 127.0.0.1:0\nmodels:\n  m: {consensus: 2}\n")
    with pytest.raises(ConfigError, match=r"models.m.consensus: 2 controllers must agree"):
        load(path)
    path.write_text("plaintext: true\nlisten: 127.0.0.1:0\nmodels:\n  m: {consensus: 0}\n")
    with pytest.raises(ConfigError, match=r"models.m.consensus: must be >= 1"):
        load(path)


# --- real processes ----------------------------------------------------------------------


@pytest.mark.integration
def test_two_of_three_controllers_decide_and_without_them_there_is_no_quorum(
    tmp_path, artifacts, fgsm, mnist, example_model
):
    from agents import attach
    from tests.test_cluster import MODEL_ID

    names = ("ctl-a", "ctl-b", "ctl-c")
    with clustered(tmp_path, artifacts, {n: {"model": {"consensus": 2}} for n in names}) as ctl:
        a = ctl["ctl-a"]
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
            clean, adv = fgsm
            # until ctl-a has seen the others up (before: NO_QUORUM, never kept in the RT)
            deadline = time.monotonic() + 20
            i = 0
            r = g(clean[i])
            while r.reason == "no_quorum" and time.monotonic() < deadline:
                time.sleep(0.1)
                i += 1
                r = g(clean[i])
            assert (r.verdict, r.decided_by, r.released) == ("benign", "controller", True), r
            r = g(adv[0])
            assert (r.verdict, r.released) == ("adversarial", False), r
            # ctl-b and ctl-c gone: one controller cannot make two
            ctl["ctl-b"].stop()
            ctl["ctl-c"].stop()
            # until ctl-a sees them down: each said goodbye before it exited, so at once
            # (a vanished one: its last will, 1.5 x keepalive 5 s), but a call may be in
            # flight meanwhile, running to the 3 s budget. Not as long as PEER_SILENT_S
            # (30 s): a stale "up" must not be what ends the wait.
            deadline = time.monotonic() + 15
            r = g(mnist.test.x[600])
            while r.reason != "no_quorum" and time.monotonic() < deadline:
                time.sleep(0.2)
                i += 1
                r = g(mnist.test.x[600 + i])
            assert (r.verdict, r.reason) == ("unknown", "no_quorum"), r
            assert np.isfinite(r.latency_s)
        finally:
            g.close()
