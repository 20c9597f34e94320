"""The fault suite: the controller is stopped (SIGSTOP) and killed (kill -9) under load
from several agents in both fail modes. Every call is resolved within its budget plus a
stated slack, a secure agent never releases what no verdict cleared, and the operator's
rules are back after the restart."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from agents import attach
from tests.conftest import MODEL_ID

pytestmark = pytest.mark.integration
SHAPE = (1, 28, 28)
BUDGET_S = 0.3
# What a call may take beyond its budget on a loaded 2-core CI machine: the agent's
# timer fires on its I/O thread, which shares the cores with the load and the daemon.
SLACK_S = 1.0


@dataclass
class Call:
    agent: str
    started: float
    took: float
    decided_by: str
    verdict: str
    released: bool


def _load(guard, name, clean, stop, calls, errors):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    i = 0
    try:
        while not stop.is_set():
            # fresh inputs (a little noise): no RT hit, every call asks the controller
            x = np.clip(clean[i % len(clean)] + rng.uniform(0, 1e-3, SHAPE), 0, 1)
            t0 = time.monotonic()
            r = guard(x.astype(np.float32), source_id=f"user-{i % 5}")
            calls.append(Call(name, t0, time.monotonic() - t0, r.decided_by, r.verdict, r.released))
            i += 1
            time.sleep(0.005)
    except BaseException as exc:  # surfaced by the test thread
        errors.append(exc)


def test_stop_and_kill_under_load_in_both_fail_modes(controller, example_model, mnist):
    proc = controller(budget_us=int(BUDGET_S * 1e6), echo_interval_s=0.2)
    names = ["standalone-1", "standalone-2", "secure-1", "secure-2"]
    guards = {
        n: attach(
            str(example_model),
            controller=proc.address,
            model_id=MODEL_ID,
            input_shape=SHAPE,
            budget_us=int(BUDGET_S * 1e6),
            backoff_cap_s=0.2,
            connect_timeout_s=30,
            **proc.agent_tls(n),
        )
        for n in names
    }
    stop, calls, errors = threading.Event(), [], []
    threads = []
    try:
        assert all(g.connected for g in guards.values())
        for n in ("secure-1", "secure-2"):
            add = proc.cli(
                "rules", "--controller", proc.address, "add", "--agent", n,
                "--priority", "100", "--action", f"inspect:{int(BUDGET_S * 1e6)}:secure",
            )  # fmt: skip
            assert add.returncode == 0, add.stderr
        clean = mnist.test.x[:300]
        threads = [
            threading.Thread(target=_load, args=(g, n, clean, stop, calls, errors), daemon=True)
            for n, g in guards.items()
        ]
        for t in threads:
            t.start()
        time.sleep(2.0)
        proc.proc.send_signal(19)  # SIGSTOP: the controller hangs, sockets open
        time.sleep(2.0)
        proc.proc.send_signal(18)  # SIGCONT
        time.sleep(2.0)
        proc.kill()  # kill -9
        time.sleep(1.5)
        proc.start()
        for g in guards.values():
            assert g.wait_connected(30), "an agent did not come back"
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a caller is stuck: an unresolved call"
        assert not errors, errors
        by = {n: [c for c in calls if c.agent == n] for n in names}
        for n in names:
            kinds = {c.decided_by for c in by[n]}
            assert "controller" in kinds and kinds & {"timeout", "disconnected"}, (n, kinds)
        # Every call resolved within its budget plus the slack.
        slowest = max(calls, key=lambda c: c.took)
        assert slowest.took <= BUDGET_S + SLACK_S, slowest
        # Standalone releases on timeout; secure never releases what no verdict cleared.
        for c in calls:
            if c.decided_by in ("timeout", "disconnected"):
                assert c.released == c.agent.startswith("standalone"), c
            if c.agent.startswith("secure") and c.released:
                assert c.decided_by in ("controller", "rt") and c.verdict == "benign", c
        # The operator's secure rules came back with the restarted controller: the last
        # calls of the secure agents were decided by the controller under them, and a
        # stall now withholds again.
        listed = proc.cli("rules", "--controller", proc.address, "list", "--agent", "secure-1")
        assert listed.returncode == 0 and ":secure" in listed.stdout, listed.stdout
        proc.proc.send_signal(19)
        try:
            r = guards["secure-1"](mnist.test.x[400])
            assert (r.decided_by, r.released) == ("timeout", False)
        finally:
            proc.proc.send_signal(18)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for g in guards.values():
            g.close()
