"""Fuzz the agent's sans-I/O core: ``agents.core.AgentCore.receive`` (and the shared
``openexample.session.Session``), with ticks in between.

Input: byte 0 bit 0 = start right after our HELLO, or in MAIN with two PKG_IN batches
in flight (their xids are fixed by the seed; the corpus answers them); the rest is a
sequence of controller messages (:func:`fuzz.common.split_messages`). Nothing may
raise, and every waiter is settled at most once.

    python fuzz/fuzz_agent_core.py fuzz/corpus/agent_core -max_total_time=600
    python fuzz/fuzz_agent_core.py --replay fuzz/corpus/agent_core
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.common import agent_core, check_sent, main, split_messages

TARGET = "agent_core"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    core, _ = agent_core(handshake=bool(data[0] & 1))
    now = 0.0
    settled: set[int] = set()
    for msg in split_messages(data[1:]):
        now += 0.25
        for out in (core.receive(msg, now), core.tick(now)):
            check_sent(out.send)
            for t in out.settled:
                if id(t) in settled or t.result is None:
                    raise AssertionError(f"ticket settled twice or without result: {t}")
                settled.add(id(t))
        if core.session is not None and core.session.state.value == "closed":
            core.disconnected(now)
            break


if __name__ == "__main__":
    main(test_one_input, TARGET)
