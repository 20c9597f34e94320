"""An agent given several controllers: when the one it uses dies, calls in flight get
the fail mode, the next controller takes the session at once, and it judges from then
on; no call is left unresolved."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from agents import AgentConfig, attach
from bench.procs import ControllerProcess
from openexample.errors import ConfigError
from openexample.pki import DevPki
from tests.conftest import MODEL_ID

pytestmark = pytest.mark.integration
SHAPE = (1, 28, 28)
BUDGET_S = 0.3
SLACK_S = 1.0  # beyond the budget, on a loaded 2-core machine (as tests/test_faults.py)


def test_an_agent_fails_over_to_the_next_controller(
    tmp_path, artifacts, example_model, mnist, caplog
):
    pki = DevPki(tmp_path / "pki")
    procs = {
        name: ControllerProcess(
            tmp_path / name,
            {
                "controller_id": name,
                "models": {MODEL_ID: {"detectors": [str(p) for p in artifacts]}},
                "budget_us": int(BUDGET_S * 1e6),
                "echo_interval_s": 0.2,
            },
            pki=pki,
        )
        for name in ("ctl-a", "ctl-b")
    }
    calls: list[tuple[float, float, str, bool]] = []  # started, took, decided_by, released
    stop, errors = threading.Event(), []
    guard = None
    worker = None
    try:
        a, b = (p.start() for p in procs.values())
        caplog.set_level(logging.WARNING, logger="agents.transport")
        guard = attach(
            str(example_model),
            controller=f"{a.address},{b.address}",
            model_id=MODEL_ID,
            input_shape=SHAPE,
            budget_us=int(BUDGET_S * 1e6),
            backoff_cap_s=0.2,
            connect_timeout_s=30,
            **a.agent_tls("line-1"),  # one CA signs both controllers and the agent
        )
        assert guard.connected

        def load() -> None:
            rng = np.random.default_rng(0)
            clean = mnist.test.x[:300]
            i = 0
            try:
                while not stop.is_set():
                    # fresh inputs: no RT hit, every call asks the controller
                    x = np.clip(clean[i % len(clean)] + rng.uniform(0, 1e-3, SHAPE), 0, 1)
                    t0 = time.monotonic()
                    r = guard(x.astype(np.float32))
                    calls.append((t0, time.monotonic() - t0, r.decided_by, r.released))
                    i += 1
                    time.sleep(0.005)
            except BaseException as exc:  # surfaced by the test thread
                errors.append(exc)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        a.kill()  # kill -9: the stream dies mid-call
        time.sleep(1.0)
        assert guard.wait_connected(30), "the agent did not fail over"
        time.sleep(1.5)
        stop.set()
        worker.join(30)
        assert not worker.is_alive(), "a caller is stuck: an unresolved call"
        assert not errors, errors

        before = [c for c in calls if c[0] + c[1] < killed_at]
        after = [c for c in calls if c[0] > killed_at + 1.0 + SLACK_S]
        assert before and after
        assert {c[2] for c in before} == {"controller"}  # ctl-a judged these
        # ctl-a is dead: the controller deciding now is ctl-b
        assert "controller" in {c[2] for c in after}
        assert not a.alive() and b.alive()
        slowest = max(calls, key=lambda c: c[1])
        assert slowest[1] <= BUDGET_S + SLACK_S, slowest
        said = [r.getMessage() for r in caplog.records]
        assert any(f"controller {a.address} lost; failing over to {b.address}" in m for m in said)
        listed = b.cli("agents", "--controller", b.address)
        assert listed.returncode == 0 and "line-1" in listed.stdout, listed.stdout + listed.stderr
    finally:
        stop.set()
        if worker is not None:
            worker.join(10)
        if guard is not None:
            guard.close()
        for p in procs.values():
            p.stop()


@pytest.mark.parametrize(
    ("controller", "plaintext", "error"),
    [
        ("127.0.0.1:6653,nowhere", False, "controller[1]: HOST:PORT"),
        ("127.0.0.1:6653,10.1.2.3:6653", True, "controller[1]: plaintext only on loopback"),
        (
            "127.0.0.1:6653,127.0.0.1:6653",
            False,
            "controller[1]: grpc://127.0.0.1:6653 is listed twice",
        ),
    ],
)
def test_a_bad_controller_list_is_refused_naming_the_entry(controller, plaintext, error):
    with pytest.raises(ConfigError) as exc:
        AgentConfig(controller=controller, plaintext=plaintext)
    assert error in str(exc.value)


def test_the_controllers_are_tried_in_the_order_given():
    cfg = AgentConfig(controller=" 127.0.0.1:1 , tcp://127.0.0.1:2,unix:///tmp/x.sock ")
    assert cfg.controllers == ("127.0.0.1:1", "tcp://127.0.0.1:2", "unix:///tmp/x.sock")
