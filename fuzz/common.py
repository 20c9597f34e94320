"""What the harnesses share: the runner (atheris, or a plain replay of a corpus), how a
session harness cuts its input into messages, and the sessions they drive.

A harness module defines ``TARGET`` (its corpus folder, ``fuzz/corpus/<TARGET>``) and
``test_one_input(data: bytes) -> None``, which returns on every input the code handles
as designed (a typed refusal included) and raises on a bug; then it calls
:func:`main`. Nothing here depends on atheris.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from agents.config import AgentConfig
from agents.core import AgentCore
from agents.results import ModelInfo
from controller.config import Config
from controller.core import ControllerCore
from openexample import messages
from openexample.identity import Identity, Kind
from openexample.v1 import openexample_pb2 as pb

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# The small model the session harnesses declare (the same as tests/test_agent_core.py).
MODEL_ID = "m"
SHAPE = (1, 4, 4)
CLASSES = ("zero", "one", "two")
AGENT_ID = "agent-1"


def corpus_files(target: str) -> list[Path]:
    return sorted(p for p in (CORPUS / target).iterdir() if p.is_file())


# --- a session harness's input: messages with a 2-byte length each ---


def split_messages(data: bytes) -> Iterator[bytes]:
    """``data`` as messages: each a 2-byte big-endian length and that many bytes (the
    last one shorter when ``data`` ends first). Every input is some sequence."""
    i, n = 0, len(data)
    while i < n:
        size = int.from_bytes(data[i : i + 2], "big")
        yield data[i + 2 : i + 2 + size]
        i += 2 + size


def join_messages(parts: Sequence[bytes]) -> bytes:
    """Inverse of :func:`split_messages` (for the corpus)."""
    out = bytearray()
    for p in parts:
        if len(p) > 0xFFFF:
            raise ValueError("a message of the corpus over 64 KiB")
        out += struct.pack(">H", len(p)) + p
    return bytes(out)


def raw(body: object, xid: int = 0) -> bytes:
    return messages.envelope(body, xid=xid).SerializeToString()


def check_sent(envs: Sequence[pb.Envelope]) -> None:
    """What a session sends must be well-formed envelopes a peer can decode."""
    for env in envs:
        if not isinstance(env, pb.Envelope) or env.WhichOneof("body") is None:
            raise AssertionError(f"sent something that is not an envelope: {env!r}")
        messages.decode_envelope(env.SerializeToString())


# --- the sessions ---


def descriptor() -> pb.ModelDescriptor:
    return pb.ModelDescriptor(
        model_id=MODEL_ID,
        input_shape=list(SHAPE),
        input_dtype=pb.DTYPE_FLOAT32,
        class_names=list(CLASSES),
        activation_names=["act0"],
    )


def features_reply(agent_id: str = AGENT_ID) -> pb.FeaturesReply:
    return pb.FeaturesReply(agent_id=agent_id, models=[descriptor()])


def controller_core(handshake: bool) -> tuple[ControllerCore, int]:
    """A :class:`controller.core.ControllerCore` with one session of ``agent/agent-1``
    (its certificate's identity), through HELLO and FEATURES when ``handshake``."""
    core = ControllerCore(Config(journal=":memory:"), detected_models={MODEL_ID}, now=0.0)
    sid, _ = core.open_session(0.0, Identity(Kind.AGENT, AGENT_ID))
    if handshake:
        step = core.on_bytes(sid, raw(pb.Hello(versions_bitmap=0b10)), 0.0)
        (req,) = [env for _, env in step.send]
        step = core.on_bytes(sid, raw(features_reply(), xid=req.xid), 0.0)
        barrier = [env for _, env in step.send if env.HasField("barrier_request")]
        core.on_bytes(sid, raw(pb.BarrierReply(), xid=barrier[-1].xid), 0.0)
    return core, sid


def agent_core(handshake: bool) -> tuple[AgentCore, list[int]]:
    """An :class:`agents.core.AgentCore` (the model above, standalone, seed 7), in MAIN
    with two PKG_IN batches in flight when ``handshake``; returns it and their xids."""
    model = ModelInfo(MODEL_ID, SHAPE, CLASSES, framework="torch")
    config = AgentConfig(budget_us=350, fail_mode="standalone", seed=7)
    core = AgentCore(AGENT_ID, [model], config, now=0.0, wall_offset_s=1000.0)
    core.connected(0.0)
    xids: list[int] = []
    if handshake:
        core.receive(messages.hello("ctrl").SerializeToString(), 0.0)
        core.receive(raw(pb.FeaturesRequest(), xid=7), 0.0)
        core.receive(raw(pb.BarrierRequest(), xid=8), 0.0)
        logits = np.array([0.1, 2.0, 0.3], np.float32)
        for value in (0.25, 0.75):
            x = np.full(SHAPE, value, np.float32)
            core.decide(MODEL_ID, x, logits, 1, 0.8, "alice", 0.0)
            xids += [env.xid for env in core.flush(0.0)]
    return core, xids


# --- the runner ---


def replay(test_one_input: Callable[[bytes], None], paths: Sequence[str]) -> int:
    """Every file under ``paths`` through the harness; the number run."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such corpus file or folder")
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        try:
            test_one_input(f.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{f}: {type(exc).__name__}: {exc}") from exc
    return len(files)


def main(test_one_input: Callable[[bytes], None], target: str) -> None:
    """``python fuzz/fuzz_X.py [--replay] [libFuzzer args and corpus folders]``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--replay", action="store_true")
    args, rest = parser.parse_known_args()
    if args.replay:
        paths = [a for a in rest if not a.startswith("-")] or [str(CORPUS / target)]
        n = replay(test_one_input, paths)
        print(f"{target}: {n} inputs replayed, no crash")
        return
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed (pip install atheris); --replay runs the corpus")
    atheris.instrument_all()  # the project's modules are imported by now: instrument them
    atheris.Setup([sys.argv[0], *rest], test_one_input)
    atheris.Fuzz()
