"""The suite fails when a test leaves a process running (``no_process_left_behind`` in
conftest.py): an inner pytest run with that conftest as a plugin, whose tests leave a
child and an orphaned grandchild, fails and names both (and they are killed); one whose
tests clean up, or whose children finish within the grace, passes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench.procs import ROOT

LEAKY = """
import os, subprocess

def test_leaves_a_child():
    child = subprocess.Popen(["sleep", "60"])
    with open(os.environ["LEAK_FILE"], "a") as f:
        f.write(f"{child.pid}\\n")

def test_leaves_an_orphan():  # its parent (sh) exits at once
    subprocess.run(["sh", "-c", 'sleep 61 & echo $! >> "$LEAK_FILE"'], check=True)
"""

CLEAN = """
import subprocess, threading

def test_waits_for_its_child():
    subprocess.run(["sleep", "0.1"], check=True)

def test_a_child_that_ends_within_the_grace():
    subprocess.Popen(["sleep", "0.5"])

def test_threads_are_not_processes():
    threading.Thread(target=lambda: __import__("time").sleep(3), daemon=True).start()
"""


def run_inner(tmp_path: Path, source: str, grace_s: float) -> subprocess.CompletedProcess:
    test = tmp_path / "test_inner.py"
    test.write_text(textwrap.dedent(source))
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    cmd += ["-q", "--rootdir", str(tmp_path), str(test)]
    env = {
        **os.environ,
        "LEAK_FILE": str(tmp_path / "pids"),
        "OPENEXAMPLE_LEFTOVER_GRACE_S": str(grace_s),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, start_new_session=True
    )


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def test_a_process_left_running_fails_the_suite_and_is_named(tmp_path):
    pids: list[int] = []
    try:
        res = run_inner(tmp_path, LEAKY, grace_s=0.5)
        pids = [int(line) for line in (tmp_path / "pids").read_text().split()]
        out = res.stdout + res.stderr
        assert res.returncode != 0, out
        assert len(pids) == 2, out
        assert "2 process(es) started by the tests still running" in out, out
        for pid, cmd in zip(pids, ("sleep 60", "sleep 61"), strict=True):
            assert f"pid {pid}: {cmd}" in out, out
        # ... and killed, the orphan too (it was re-parented to the inner pytest).
        deadline = time.monotonic() + 10
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(running, pids)), out
    finally:
        for pid in pids:
            if running(pid) and "sleep" in Path(f"/proc/{pid}/cmdline").read_text():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_suite_that_cleans_up_passes(tmp_path):
    res = run_inner(tmp_path, CLEAN, grace_s=3.0)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 passed" in res.stdout and "still running" not in res.stdout, res.stdout
