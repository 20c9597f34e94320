"""An outsider against the default (mTLS) controller: each attack of the security issue,
through a real daemon on loopback. Every one gets a typed refusal, and nothing the
legitimate agents hold changes."""

from __future__ import annotations

import datetime as dt
import sqlite3
import ssl
import time

import grpc
import numpy as np
import pytest

from agents import attach
from openexample import grpc_tls, rules, tables, tensor, tls
from openexample.pki import DevPki
from openexample.tls import TlsFiles
from openexample.v1 import admin_pb2, admin_pb2_grpc, predict_pb2, predict_pb2_grpc
from openexample.v1 import openexample_pb2 as pb
from tests.conftest import MODEL_ID
from tests.peers import SHAPE, GrpcPeer, NativePeer, pkg_in, serve_agent_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def guards(example_model):
    made = []

    def make(proc, agent_id, *, scheme="grpc", **kw):
        kw.setdefault("connect_timeout_s", 20)
        g = attach(
            str(example_model),
            controller=proc.address_for(scheme),
            model_id=MODEL_ID,
            input_shape=SHAPE,
            **proc.agent_tls(agent_id),
            **kw,
        )
        made.append(g)
        assert g.connected, "agent did not reach MAIN"
        return g

    yield make
    for g in made:
        g.close()


def logged(proc, text, timeout_s=10.0):
    """Whether the daemon logs ``text`` within the timeout (its log is read by a thread,
    which may lag behind what a test has already seen on the wire)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(text in line for line in proc.log):
            return True
        time.sleep(0.05)
    return False


def admin(proc, identity="operator/bench", files: TlsFiles | None = None):
    if files is None:
        return admin_pb2_grpc.ControllerAdminStub(proc.channel_as(identity))
    channel = grpc.secure_channel(proc.address, grpc_tls.grpc_channel_credentials(files))
    return admin_pb2_grpc.ControllerAdminStub(channel)


def rule_keys(proc, agent_id):
    """What an agent holds (its own STATS_REPLY), without the counters."""
    resp = admin(proc).ListRules(admin_pb2.ListRulesRequest(agent_id=agent_id), timeout=10)
    (entry,) = resp.agents
    return sorted(
        (r.priority, r.cookie, r.match.SerializeToString(), str(list(r.actions)))
        for r in entry.rules
    )


def foreign_files(tmp_path, proc, identity) -> TlsFiles:
    """A certificate for ``identity`` from another CA (we still trust the real one)."""
    evil = DevPki(tmp_path / "evil-ca").ensure([identity])
    f = evil.files(identity)
    return TlsFiles(proc.pki.ca, f.cert, f.key)


def expired_files(proc, identity) -> TlsFiles:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    return proc.pki.issue(identity.replace("/", "/expired-"), not_before=old, days=1)


def test_the_admin_api_refuses_everyone_but_operators(tmp_path, controller, guards, mnist):
    proc = controller()
    g = guards(proc, "line-1")
    before = rule_keys(proc, "line-1")
    wipe = admin_pb2.ModRulesRequest(mod=rules.vigilance_mod(rules.DELETE))
    allow = admin_pb2.ModRulesRequest(
        mod=rules.vigilance_mod(rules.ADD, priority=65535, actions=[rules.allow()])
    )
    for who in ("reader/eve", "agent/line-1", "caller/eve"):
        for req in (wipe, allow):
            with pytest.raises(grpc.RpcError) as e:
                admin(proc, who).ModRules(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, who
            assert f"{who} may not (needs operator)" in e.value.details()
    # A reader reads; an agent or a caller does not.
    listed = admin(proc, "reader/eve").ListAgents(admin_pb2.ListAgentsRequest(), timeout=10)
    assert [a.agent_id for a in listed.agents] == ["line-1"]
    with pytest.raises(grpc.RpcError) as e:
        admin(proc, "agent/line-1").ListAgents(admin_pb2.ListAgentsRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # No certificate, another CA's, an expired one: no TLS session at all.
    bad = [
        admin_pb2_grpc.ControllerAdminStub(grpc.insecure_channel(proc.address)),
        admin(proc, files=foreign_files(tmp_path, proc, "operator/mallory")),
        admin(proc, files=expired_files(proc, "operator/alice")),
    ]
    for stub in bad:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModRules(wipe, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # Nothing changed on the agent: the controller still inspects.
    assert rule_keys(proc, "line-1") == before
    assert g(mnist.test.x[0]).decided_by == "controller"
    # Every attempt is in the journal, with who made it.
    rows = (
        sqlite3.connect(proc.config["journal"])
        .execute("SELECT who, method, outcome FROM admin_changes")
        .fetchall()
    )
    assert ("reader/eve", "ModRules", "denied: needs operator") in rows
    assert ("agent/line-1", "ModRules", "denied: needs operator") in rows
    # ... and an operator's change, with its author.
    assert admin(proc, "operator/alice").ModRules(allow, timeout=10).results[0].agent_id == "line-1"
    rows = sqlite3.connect(proc.config["journal"]).execute(
        "SELECT who, outcome FROM admin_changes WHERE who = 'operator/alice'"
    )
    assert rows.fetchall() == [("operator/alice", "ok")]


def test_an_impostor_cannot_speak_for_another_agent(controller, guards, mnist):
    proc = controller()
    victim = guards(proc, "victim")
    before = rule_keys(proc, "victim")
    peer = GrpcPeer(proc.channel_as("agent/mallory"))
    err = peer.handshake("victim", MODEL_ID)
    assert (err.error.type, err.error.code) == (
        pb.ERROR_TYPE_HELLO_FAILED,
        pb.HELLO_FAILED_CODE_EPERM,
    )
    assert "agent/mallory" in err.error.text
    peer.close()
    agents = admin(proc).ListAgents(admin_pb2.ListAgentsRequest(), timeout=10).agents
    assert [a.agent_id for a in agents] == ["victim"]
    assert agents[0].peer.startswith("ipv4:127.0.0.1:")  # gRPC's name for the peer
    assert rule_keys(proc, "victim") == before
    assert victim(mnist.test.x[1]).decided_by == "controller"


def test_a_new_connection_of_an_agent_replaces_the_old_one(controller):
    proc = controller()
    first = GrpcPeer(proc.channel_as("agent/dup"))
    assert first.handshake("dup", MODEL_ID).HasField("barrier_request")
    second = GrpcPeer(proc.channel_as("agent/dup"))
    assert second.handshake("dup", MODEL_ID).HasField("barrier_request")
    with pytest.raises((StopIteration, grpc.RpcError, TimeoutError)):
        first.recv("pkg_out", timeout=10)  # its stream is closed by the controller
    agents = admin(proc).ListAgents(admin_pb2.ListAgentsRequest(), timeout=10).agents
    assert [a.agent_id for a in agents] == ["dup"]
    assert logged(proc, "connected again; the old session is closed")
    first.close()
    second.close()


def _logits(example_model, xs):
    """What the protected model says (what an honest agent reports)."""
    import torch

    from controller.reference_model import load_model

    with torch.no_grad():
        return load_model(example_model)(torch.from_numpy(xs)).numpy()


def _labels(example_model, xs):
    return _logits(example_model, xs).argmax(1)


def _flag(peer, xs, labels, xid0, logits=None, **item):
    """Send inputs one by one (under ``labels``, with ``logits`` rows if given) until
    the controller flags one; its index."""
    for i, (a, y) in enumerate(zip(xs[:40], labels[:40], strict=False)):
        row = None if logits is None else logits[i if len(logits) > 1 else 0][None]
        msg = pkg_in(a[None], MODEL_ID, logits=row, label=int(y), **item)
        peer.send_env(msg, xid=xid0 + i)
        out = peer.recv("pkg_out")
        if out.pkg_out.items[0].verdict == pb.VERDICT_ADVERSARIAL:
            return i
    pytest.fail("no input was flagged")


def test_rt_poisoning_with_a_forged_fingerprint_is_not_pushed(
    controller, guards, fgsm, mnist, example_model
):
    proc = controller()
    victim = guards(proc, "victim")
    x = mnist.test.x[2]
    y = int(_labels(example_model, x[None])[0])
    peer = GrpcPeer(proc.channel_as("agent/mallory"))
    assert peer.handshake("mallory", MODEL_ID).HasField("barrier_request")
    # Inputs the detectors flag under the clean image's label (other digits, with a
    # near-tie in the logits), each claiming the clean image's fingerprint: were it
    # believed, the RT entry (x, y) would refuse the clean image on every agent.
    others = mnist.test.x[:200][_labels(example_model, mnist.test.x[:200]) != y]
    tie = np.zeros((1, 10), np.float32)
    tie[0, [y, (y + 1) % 10]] = 5.0
    _flag(peer, others, [y] * len(others), 100, fingerprint=tables.fingerprint(x), logits=tie)
    rule_keys(proc, "victim")  # a round trip to the victim: any push would be there now
    r = victim(x)
    assert (r.decided_by, r.verdict, r.released) == ("controller", "benign", True)
    assert logged(proc, "fingerprint is not the controller's own")
    # An honest claim is pushed: swift vigilance still works.
    _, adv = fgsm
    logits = _logits(example_model, adv[:40])
    labels = logits.argmax(1)
    i = _flag(peer, adv, labels, 200, logits=logits)  # one the detectors flag
    a = adv[i]
    fp = tables.fingerprint(a)
    peer.send_env(
        pkg_in(a[None], MODEL_ID, logits=logits[i][None], label=int(labels[i]), fingerprint=fp),
        xid=7,
    )
    assert peer.recv("pkg_out").pkg_out.items[0].verdict == pb.VERDICT_ADVERSARIAL
    rule_keys(proc, "victim")
    r = victim(a)
    assert (r.decided_by, r.verdict, r.released) == ("rt", "adversarial", False)
    peer.close()


def test_an_agent_cannot_frame_another_agents_source(
    controller, guards, fgsm, mnist, example_model
):
    proc = controller(trace_min_adversarial=2, trace_alpha=1e-3)
    victim = guards(proc, "victim")
    peer = GrpcPeer(proc.channel_as("agent/mallory"))
    assert peer.handshake("mallory", MODEL_ID).HasField("barrier_request")
    _, adv = fgsm
    logits = _logits(example_model, adv[:80])
    labels = logits.argmax(1)
    first = _flag(peer, adv, labels, 100, logits=logits, source_id="plc-7")
    rest = slice(first + 1, None)
    _flag(peer, adv[rest], labels[rest], 200, logits=logits[rest], source_id="plc-7")
    # The block lands on mallory, the agent the source came through ...
    mod = peer.recv("vigilance_mod").vigilance_mod
    assert mod.match.source_id == "plc-7" and mod.actions[0].HasField("drop")
    assert logged(proc, "blocked source 'plc-7' on agent 'mallory'")
    # ... and never on the victim, whose plc-7 is somebody else.
    assert not [k for k in rule_keys(proc, "victim") if b"plc-7" in k[2]]
    r = victim(mnist.test.x[3], source_id="plc-7")
    assert r.decided_by == "controller"
    peer.close()


def test_an_honest_busy_source_is_not_blocked(controller, guards, mnist):
    """~1,000 clean images from one source: the detectors' own false positives (about
    1%) are no evidence against it. The old rule (5 in 60 s) blocked such a source."""
    proc = controller()
    g = guards(proc, "line-7")
    flagged = 0
    for start in range(0, len(mnist.test.x), 32):
        results = g.batch(mnist.test.x[start : start + 32], source_id="line-7")
        assert {r.decided_by for r in results} == {"controller"}, start
        flagged += sum(r.verdict == "adversarial" for r in results)
    assert flagged >= 5  # enough false positives that a count rule would have fired
    assert not any("source tracing blocked" in line for line in proc.log)
    assert g(mnist.train.x[0], source_id="line-7").decided_by == "controller"  # a new input


def _native_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = tls.client_context(files)
    ctx.set_alpn_protocols(["openexample/1"])
    return ctx


def test_bad_certificates_and_plain_text_are_refused_on_both_channels(
    tmp_path, controller, guards, mnist
):
    proc = controller(native=["tcp://127.0.0.1:0"])
    legit = guards(proc, "line-1", scheme="tcp")
    foreign = foreign_files(tmp_path, proc, "agent/mallory")
    expired = expired_files(proc, "agent/old")
    # gRPC: no TLS session, so no stream.
    for channel in (
        grpc.insecure_channel(proc.address),
        grpc.secure_channel(proc.address, grpc_tls.grpc_channel_credentials(foreign)),
        grpc.secure_channel(proc.address, grpc_tls.grpc_channel_credentials(expired)),
    ):
        peer = GrpcPeer(channel)
        with pytest.raises(grpc.RpcError) as e:
            peer.recv("hello")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        peer.close()
    # Native: the handshake is refused (TLS 1.3 reports it on the first read), and the
    # controller says so in one line.
    tcp = proc.address_for("tcp")
    for ctx in (_native_context(foreign), _native_context(expired), None):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            peer = NativePeer(tcp, ctx)
            if ctx is None:  # plain text: a HELLO frame, which is no TLS ClientHello
                peer.send_env(pb.Hello(versions_bitmap=0b10))
            try:
                peer.recv("hello", timeout=10)
            finally:
                peer.close()
    deadline = time.monotonic() + 10
    refused = []
    while len(refused) < 3 and time.monotonic() < deadline:
        refused = [line for line in proc.log if "native: TLS handshake with 127.0.0.1" in line]
        time.sleep(0.1)
    assert len(refused) == 3, proc.log
    # The legitimate agent never noticed.
    agents = admin(proc).ListAgents(admin_pb2.ListAgentsRequest(), timeout=10).agents
    assert [a.agent_id for a in agents] == ["line-1"]
    assert agents[0].peer.startswith("tcp:127.0.0.1:")  # where it connected from
    assert legit(mnist.test.x[4]).decided_by == "controller"


def test_predict_callers_cannot_spoof_a_source(controller, example_model, fgsm, mnist):
    """Through the agent CLI's Predict API (mTLS by default): the source is the caller's
    certificate; a claimed source_id that differs is refused; a blocked caller does not
    block anyone else."""
    proc = controller(trace_min_adversarial=2, trace_alpha=1e-3)
    agent, port = serve_agent_cli(proc, str(example_model), "line-1", MODEL_ID)
    try:
        address = f"127.0.0.1:{port}"

        def stub(identity):
            files = proc.pki.issue(identity, overwrite=False)
            channel = grpc.secure_channel(address, grpc_tls.grpc_channel_credentials(files))
            return predict_pb2_grpc.PredictorStub(channel)

        def predict(who, x, source_id=""):
            req = predict_pb2.PredictRequest(input=tensor.encode(x), source_id=source_id)
            return stub(who).Predict(req, timeout=30).results[0]

        assert (
            predict("caller/plc-7", mnist.test.x[5]).decided_by == predict_pb2.DECIDED_BY_CONTROLLER
        )
        with pytest.raises(grpc.RpcError) as e:
            predict("caller/eve", mnist.test.x[5], source_id="plc-7")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "your certificate says caller/eve" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # no client certificate at all
            insecure = predict_pb2_grpc.PredictorStub(grpc.insecure_channel(address))
            insecure.Predict(predict_pb2.PredictRequest(input=tensor.encode(mnist.test.x[5])))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # eve attacks as herself: she is blocked, plc-7 is not.
        _, adv = fgsm
        hits = 0
        for a in adv[:40]:
            hits += predict("caller/eve", a).verdict == pb.VERDICT_ADVERSARIAL
            if hits == 2:
                break
        assert hits == 2
        time.sleep(0.5)  # the DROP rule's round trip to the agent
        assert predict("caller/eve", mnist.test.x[6]).decided_by == predict_pb2.DECIDED_BY_RULE
        assert (
            predict("caller/plc-7", mnist.test.x[6]).decided_by == predict_pb2.DECIDED_BY_CONTROLLER
        )
    finally:
        agent.terminate()
        assert agent.wait(20) == 0
    assert logged(proc, "blocked source 'eve' on agent 'line-1'")
