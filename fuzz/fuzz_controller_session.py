"""Fuzz the controller's sans-I/O side: ``ControllerCore.on_bytes`` over
``controller.session.AgentSession.receive`` (and ``openexample.session.Session``), with
ticks and detector results in between.

Input: byte 0 bit 0 = start from a fresh session (HELLO state) or one in MAIN (through
HELLO, FEATURES and the resync BARRIER, as ``agent/agent-1``); the rest is a sequence
of messages (:func:`fuzz.common.split_messages`). Nothing may raise: bad input becomes
a typed ERROR and the session goes on or closes.

    python fuzz/fuzz_controller_session.py fuzz/corpus/controller_session -max_total_time=600
    python fuzz/fuzz_controller_session.py --replay fuzz/corpus/controller_session
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.common import check_sent, controller_core, main, split_messages
from openexample.v1 import openexample_pb2 as pb

TARGET = "controller_session"
VERDICTS = (pb.VERDICT_BENIGN, pb.VERDICT_ADVERSARIAL, pb.VERDICT_UNKNOWN)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    core, sid = controller_core(handshake=bool(data[0] & 1))
    now = 0.0
    for i, msg in enumerate(split_messages(data[1:])):
        now += 0.25
        step = core.on_bytes(sid, msg, now)
        check_sent([env for _, env in step.send])
        for job in step.jobs:  # the detectors answer, each verdict in turn
            items = [
                pb.PkgOutItem(verdict=VERDICTS[(i + k) % 3], action=1, score=0.5)
                for k in range(job.size)
            ]
            check_sent([env for _, env in core.on_results(job, items, now).send])
        check_sent([env for _, env in core.on_tick(now).send])
    if core.workload != 0:
        raise AssertionError(f"workload {core.workload} after every job was answered")


if __name__ == "__main__":
    main(test_one_input, TARGET)
