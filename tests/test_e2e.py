"""End to end: a real controller process, real agents, real gRPC on loopback."""

from __future__ import annotations

import concurrent.futures
import itertools
import sqlite3
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agents import attach
from openexample import grpc_tls, messages, tensor
from openexample.v1 import openexample_pb2 as pb
from tests.conftest import MODEL_ID
from tests.peers import GrpcPeer, serve_agent_cli

pytestmark = pytest.mark.integration
SHAPE = (1, 28, 28)


_ids = itertools.count(1)


def guard_for(proc, model, **kw):
    """An agent with its own certificate (agent/<agent_id>, default e2e-N)."""
    kw.setdefault("connect_timeout_s", 20)
    agent_id = kw.pop("agent_id", None) or f"e2e-{next(_ids)}"
    kw.update(proc.agent_tls(agent_id))
    g = attach(model, controller=proc.address, model_id=MODEL_ID, input_shape=SHAPE, **kw)
    assert g.connected, "agent did not reach MAIN"
    return g


@pytest.fixture
def agent(controller, example_model):
    made = []

    def make(proc, **kw):
        g = guard_for(proc, model=str(example_model), **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def flagged_adversarial(g, adv, limit=40):
    for a in adv[:limit]:
        r = g(a)
        if r.verdict == "adversarial":
            return a, r
    pytest.fail("no FGSM input was flagged by the detectors")


def test_verdicts_come_back_from_the_controller(controller, agent, mnist):
    proc = controller()
    g = agent(proc)
    results = [g(x) for x in mnist.test.x[:50]]
    assert {r.decided_by for r in results} == {"controller"}
    benign = sum(r.verdict == "benign" for r in results)
    assert benign >= 45  # clean inputs, detectors calibrated at 1% FPR
    for r in results:
        if r.verdict == "benign":
            assert r.released and r.output is not None and r.output.shape == (10,)
            assert r.label == int(np.argmax(r.output))


def test_rules_installed_at_run_time_change_behaviour(controller, agent, mnist):
    proc = controller()
    g = agent(proc)
    x = mnist.test.x[0]
    assert g(x).decided_by == "controller"
    add = proc.cli(
        "rules",
        "--controller",
        proc.address,
        "add",
        "--match",
        f"model={MODEL_ID}",
        "--priority",
        "100",
        "--action",
        "drop",
        "--cookie",
        "0x42",
    )
    assert add.returncode == 0, add.stderr
    assert "ok" in add.stdout
    r = g(mnist.test.x[1])
    assert (r.decided_by, r.released, r.output) == ("rule", False, None)
    listed = proc.cli(
        "rules", "--controller", proc.address, "list", "--cookie", "0x42", "--cookie-mask", "0xffff"
    )
    assert listed.returncode == 0, listed.stderr
    assert "drop" in listed.stdout and "matched=1" in listed.stdout
    dele = proc.cli(
        "rules", "--controller", proc.address, "del", "--cookie", "0x42", "--cookie-mask", "0xffff"
    )
    assert dele.returncode == 0, dele.stderr
    assert g(mnist.test.x[2]).decided_by == "controller"
    # A bad rule is refused with a clear error and reaches no agent.
    bad = proc.cli(
        "rules", "--controller", proc.address, "add", "--priority", "70000", "--action", "drop"
    )
    assert bad.returncode != 0 and "PRIORITY" in bad.stderr


def test_rt_push_refuses_a_repeated_adversarial_input_on_another_agent(controller, agent, fgsm):
    proc = controller()
    a, b = agent(proc, agent_id="line-a"), agent(proc, agent_id="line-b")
    _, adv = fgsm
    x, first = flagged_adversarial(a, adv)
    assert not first.released
    # Any round trip to b after the verdict orders the push before it on b's stream.
    assert proc.cli("rules", "--controller", proc.address, "list").returncode == 0
    r = b(x)
    assert (r.decided_by, r.verdict, r.released) == ("rt", "adversarial", False)


def test_source_tracing_blocks_the_source_on_its_agent(controller, agent, fgsm, mnist):
    # Two in a row: p = 0.02**2 = 4e-4 against the clean rate, below this alpha.
    proc = controller(trace_min_adversarial=2, trace_alpha=1e-3)
    a, b = agent(proc, agent_id="a"), agent(proc, agent_id="b")
    _, adv = fgsm
    hits = 0
    for x in adv[:60]:
        hits += a(x, source_id="mallory").verdict == "adversarial"
        if hits == 2:
            break
    assert hits == 2
    assert proc.cli("rules", "--controller", proc.address, "list").returncode == 0
    r = a(mnist.test.x[0], source_id="mallory")
    assert (r.decided_by, r.released) == ("rule", False)
    assert a(mnist.test.x[0], source_id="alice").decided_by == "controller"
    # Sources are namespaced by agent: b's "mallory" is not a's.
    assert b(mnist.test.x[0], source_id="mallory").decided_by == "controller"
    proc.stop()
    rows = (
        sqlite3.connect(proc.config["journal"])
        .execute("SELECT source_id, model_id, agent_id FROM incidents")
        .fetchall()
    )
    assert rows.count(("mallory", MODEL_ID, "a")) == 2  # durable, after SIGTERM


def test_controller_killed_mid_stream_then_back(controller, agent, mnist):
    proc = controller(budget_us=400_000, echo_interval_s=0.2)
    lenient = agent(proc, agent_id="standalone", backoff_cap_s=0.2)
    strict = agent(proc, agent_id="secure", backoff_cap_s=0.2)
    add = proc.cli(
        "rules",
        "--controller",
        proc.address,
        "add",
        "--agent",
        "secure",
        "--priority",
        "1",
        "--action",
        "inspect:400000:secure",
    )
    assert add.returncode == 0, add.stderr
    proc.proc.send_signal(19)  # SIGSTOP: calls now wait on a controller that is gone
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        t0 = time.monotonic()
        calls = [pool.submit(g, x) for g in (lenient, strict) for x in mnist.test.x[:4]]
        time.sleep(0.1)
        proc.kill()
        results = [c.result(timeout=5) for c in calls]
        elapsed = time.monotonic() - t0
    assert elapsed < 0.4 + 0.5  # every call within its budget (plus scheduling slack)
    for r in results[:4]:
        assert r.decided_by in ("timeout", "disconnected") and r.released
    for r in results[4:]:
        assert r.decided_by in ("timeout", "disconnected") and not r.released
    # While the controller is away: the fail mode decides at once.
    r = strict(mnist.test.x[5])
    assert (r.decided_by, r.released) == ("disconnected", False)
    proc.start()
    assert lenient.wait_connected(20) and strict.wait_connected(20)
    assert lenient(mnist.test.x[6]).decided_by == "controller"
    # The operator's rule for "secure" (INSPECT, so the controller decides) came back
    # from the restarted controller's stored desired state: tests/test_durable_state.py.
    assert strict(mnist.test.x[7]).decided_by == "controller"


def test_overload_answers_overloaded(controller, agent, mnist):
    proc = controller(max_workload=1)
    g = agent(proc)
    results = g.batch(mnist.test.x[:4])
    assert {(r.verdict, r.reason) for r in results} == {("unknown", "overloaded")}
    assert all(r.decided_by == "controller" and r.released for r in results)  # standalone


# --- a raw peer: malformed and invalid messages ---


def test_malformed_and_invalid_messages_get_typed_errors_and_the_daemon_lives(controller):
    proc = controller()
    peer = GrpcPeer(proc.channel_as("agent/raw"))
    assert peer.recv("hello")
    peer.send(b"\x0a\xff\xff\xff garbage")
    err = peer.recv("error").error
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_MALFORMED)
    peer.send(messages.hello("raw").SerializeToString())
    req = peer.recv("features_request")
    desc = pb.ModelDescriptor(
        model_id=MODEL_ID,
        input_shape=SHAPE,
        input_dtype=pb.DTYPE_FLOAT32,
        class_names=[str(i) for i in range(10)],
    )
    peer.send(
        messages.reply(req, pb.FeaturesReply(agent_id="raw", models=[desc])).SerializeToString()
    )
    peer.recv("barrier_request")

    def pkg(x, model=MODEL_ID, n=1):
        items = [pb.PkgInItem(label=1, confidence=0.5, reason=pb.PKG_IN_REASON_ACTION)] * n
        return pb.PkgIn(model_id=model, inputs=tensor.encode(x), items=items)

    good = np.zeros((1, *SHAPE), np.float32)
    nan = good.copy()
    nan[0, 0, 3, 3] = np.nan
    cases = [
        (pkg(good, model="nope"), pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_UNKNOWN_MODEL),
        (
            pkg(np.zeros((1, 1, 8, 8), np.float32)),
            pb.ERROR_TYPE_BAD_TENSOR,
            pb.BAD_TENSOR_CODE_BAD_SHAPE,
        ),
        (pkg(good.astype(np.uint8)), pb.ERROR_TYPE_BAD_TENSOR, pb.BAD_TENSOR_CODE_BAD_DTYPE),
        (pkg(nan), pb.ERROR_TYPE_BAD_TENSOR, pb.BAD_TENSOR_CODE_NOT_FINITE),
        (
            pkg(np.zeros((2000, *SHAPE), np.float32), n=2000),
            pb.ERROR_TYPE_BAD_REQUEST,
            pb.BAD_REQUEST_CODE_BAD_BATCH,
        ),
        # An oversize tensor (16 MiB) for a 28x28 model.
        (
            pkg(np.zeros((1, 1, 2048, 2048), np.float32)),
            pb.ERROR_TYPE_BAD_TENSOR,
            pb.BAD_TENSOR_CODE_BAD_SHAPE,
        ),
    ]
    for xid, (body, etype, code) in enumerate(cases, start=100):
        peer.send(messages.envelope(body, xid=xid).SerializeToString())
        err = peer.recv("error")
        assert (err.xid, err.error.type, err.error.code) == (xid, etype, code), err
    # Oversize message: refused by the protocol limit, typed.
    huge = messages.envelope(pb.EchoRequest(data=b"x" * (32 * 1024 * 1024 + 512 * 1024)), xid=7)
    peer.send(huge.SerializeToString())
    err = peer.recv("error").error
    assert err.code == pb.BAD_REQUEST_CODE_BAD_LEN
    # The session and the daemon go on.
    peer.send(messages.envelope(pkg(good), xid=555).SerializeToString())
    out = peer.recv("pkg_out")
    assert out.xid == 555 and len(out.pkg_out.items) == 1
    peer.close()
    health = health_pb2_grpc.HealthStub(proc.channel_as("reader/health"))
    status = health.Check(health_pb2.HealthCheckRequest(service="openexample.v1.OpenExample"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert proc.alive()
    assert proc.stop() == 0


def test_bad_config_is_refused_naming_the_key(tmp_path):
    from bench.procs import ControllerProcess

    proc = ControllerProcess(tmp_path, {"budget_usec": 5})
    with pytest.raises(RuntimeError) as e:
        proc.start(timeout_s=30)
    assert "budget_usec: unknown key" in str(e.value)


def test_agent_cli_serves_predict_with_the_vigilance_loop(controller, example_model, mnist):
    from openexample.v1 import predict_pb2, predict_pb2_grpc

    proc = controller()
    agent, port = serve_agent_cli(proc, str(example_model), "cli-agent", MODEL_ID)
    try:
        caller = proc.pki.issue("caller/plc-7", overwrite=False)
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", grpc_tls.grpc_channel_credentials(caller)
        )
        stub = predict_pb2_grpc.PredictorStub(channel)
        req = predict_pb2.PredictRequest(
            model_id=MODEL_ID, input=tensor.encode(mnist.test.x[:3]), source_id="plc-7"
        )
        resp = stub.Predict(req, timeout=30)
        assert len(resp.results) == 3
        for r, y in zip(resp.results, mnist.test.y[:3], strict=True):
            assert r.decided_by == predict_pb2.DECIDED_BY_CONTROLLER
            if r.released:
                assert r.label == y  # the example model gets these right
                assert tuple(r.output.shape) == (10,)
        with pytest.raises(grpc.RpcError) as e:  # a wrong shape is a clear error
            stub.Predict(
                predict_pb2.PredictRequest(input=tensor.encode(np.zeros((5, 5), np.float32)))
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        agent.terminate()
        assert agent.wait(20) == 0  # SIGTERM closes cleanly
