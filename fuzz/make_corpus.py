"""Write the seed corpus: ``python fuzz/make_corpus.py`` (idempotent).

A few dozen valid messages per target, serialized, plus the hostile ones the code must
refuse and every input that once crashed a harness (regressions). Files are named by
their SHA-1, as libFuzzer names what it adds to a corpus folder; files already there
(e.g. what a fuzz run found and was kept) are left alone. ``--check`` only says
whether a file is missing (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from fuzz.common import (
    AGENT_ID,
    CORPUS,
    MODEL_ID,
    SHAPE,
    agent_core,
    controller_core,
    features_reply,
    join_messages,
    raw,
)
from openexample import messages, rules, tables, tensor
from openexample.framing import frame
from openexample.v1 import openexample_pb2 as pb

F32 = pb.DTYPE_FLOAT32


def x(n: int, value: float = 0.5) -> np.ndarray:
    return np.full((n, *SHAPE), value, np.float32)


def pkg_in(n: int = 1, **item: object) -> pb.PkgIn:
    inputs = x(n)
    logits = np.tile(np.array([0.1, 2.0, 0.3], np.float32), (n, 1))
    fields = {"label": 1, "confidence": 0.8, "reason": pb.PKG_IN_REASON_TABLE_MISS}
    fields.update(source_id="alice", budget_us=350, **item)
    items = [pb.PkgInItem(fingerprint=tables.fingerprint(inputs[i]), **fields) for i in range(n)]
    return pb.PkgIn(
        model_id=MODEL_ID,
        inputs=tensor.encode(inputs),
        logits=tensor.encode(logits),
        items=items,
    )


def activation(shape: tuple[int, ...], data: bytes | None = None) -> pb.NamedTensor:
    t = pb.Tensor(dtype=F32, shape=list(shape))
    t.data = b"\0" * 4 * math.prod(shape) if data is None else data
    return pb.NamedTensor(name="act0", tensor=t)


def hostile_pkg_ins() -> list[pb.PkgIn]:
    out = []
    nan = pkg_in()
    nan.inputs.data = np.full((1, *SHAPE), np.nan, np.float32).tobytes()
    out.append(nan)
    f16 = pkg_in()
    f16.inputs.CopyFrom(tensor.encode(x(1).astype(np.float16)))
    out.append(f16)
    shape = pkg_in()
    del shape.inputs.shape[:]
    shape.inputs.shape.extend([1, 16])
    out.append(shape)
    unknown = pkg_in()
    unknown.model_id = "nope"
    out.append(unknown)
    empty = pkg_in()
    del empty.items[:]
    out.append(empty)
    out.append(pkg_in(label=7))
    out.append(pkg_in(confidence=math.nan))
    out.append(pkg_in(reason=0))
    cut = pkg_in()
    cut.inputs.data = cut.inputs.data[:-1]
    out.append(cut)
    act = pkg_in()
    act.activations.append(activation((1, 4)))
    out.append(act)
    # Regression: an empty activation of shape (0, 2**62) made numpy raise ValueError
    # in tensor.decode (the controller's reader failed and the session was dropped).
    wide = pkg_in()
    wide.activations.append(activation((0, 2**62), b""))
    out.append(wide)
    huge = pkg_in()
    del huge.inputs.shape[:]
    huge.inputs.shape.extend([2**40, 2**40])
    out.append(huge)
    return out


def envelopes() -> list[pb.Envelope]:
    """One of every body kind, then hostile PKG_INs."""
    mod = rules.vigilance_mod(
        "add", match=pb.Match(model_id=MODEL_ID, label=2), priority=7, actions=[rules.drop()]
    )
    entry = tables.label_entry(tables.fingerprint(x(1)[0]), 1, pb.VERDICT_ADVERSARIAL)
    bodies = [
        pb.Hello(versions_bitmap=0b10, sender_id="ctrl", limits=pb.Limits()),
        pb.Error(type=pb.ERROR_TYPE_BAD_REQUEST, code=2, offending_xid=3, text="no", data=b"x"),
        pb.EchoRequest(data=b"ping"),
        pb.EchoReply(data=struct.pack("<d", 0.5)),
        pb.FeaturesRequest(),
        features_reply(),
        pkg_in(),
        pkg_in(2),
        pb.PkgOut(
            model_id=MODEL_ID,
            items=[pb.PkgOutItem(verdict=pb.VERDICT_BENIGN, action=1, score=0.1)],
            timings=pb.Timings(queue_us=5, score_us=10, reply_us=1, controller_us=16),
        ),
        mod,
        pb.VigilanceRemoved(cookie=1, priority=7, duration_s=2.0, match_count=3),
        tables.rt_push(MODEL_ID, [entry]),
        pb.BarrierRequest(),
        pb.BarrierReply(),
        pb.StatsRequest(),
        pb.StatsReply(),
        pb.RoleRequest(role=pb.CONTROLLER_ROLE_MASTER, generation_id=3),
        pb.RoleReply(role=pb.CONTROLLER_ROLE_EQUAL, generation_id=1),
    ]
    envs = [messages.envelope(b, xid=i + 1) for i, b in enumerate(bodies)]
    envs += [messages.envelope(p, xid=100 + i) for i, p in enumerate(hostile_pkg_ins())]
    return envs


def codec() -> list[bytes]:
    out = [e.SerializeToString() for e in envelopes()]
    valid = out[6]
    out += [
        b"",
        b"\x08\x01",  # version only: no body
        pb.Envelope(version=1, xid=2**32 - 1).SerializeToString(),
        valid[: len(valid) // 2],  # truncated
        b"\x08" + b"\xff" * 10 + b"\x01" + valid,  # an 11-byte varint
        valid + b"\x82\x01" + b"\xff" * 9 + b"\x01",  # field 16 declared 2**64-ish long
        b"\x0b" * 200,  # groups nested deeper than the parser follows
        raw(pb.EchoRequest(data=b"\0" * 5000), xid=9),  # over the small limit
        # Regressions (found by atheris): peek_xid took the first of two xids (the
        # parser takes the last), did not skip a group, and skipped a length-delimited
        # field short by its length's own bytes (``i += varint()``).
        b"\x10\x01\x10\x05r\x00",
        b"\x9b\x06\x10\x07\x9c\x06\x10\x03r\x00",
        b"\x08\x01\x10\x12\xd2\x01\x00\x08\x02\x10\x01",
        raw(pb.EchoRequest(data=b"\x10\x63" * 100)) + b"\x10\x2a",  # body, then xid
    ]
    return out


def tensors() -> list[bytes]:
    arrays = [
        np.zeros((2, 3), np.float32),
        np.arange(6, dtype=np.uint8).reshape(3, 2),
        np.ones(4, np.float16),
        np.float32(1.5).reshape(()),
        np.zeros((0, 5), np.float32),
        np.full((1, 1, 1, 1, 1, 1, 1, 2), 0.25, np.float32),
    ]
    out = [tensor.encode(a).SerializeToString() for a in arrays]
    shapes = [
        (F32, [0, 2**62], b""),  # regression: numpy's ValueError (array is too big)
        (F32, [2**31, 0, 2**31], b""),
        (F32, [2**40, 2**40], b""),
        (F32, [1] * 9, b"\0" * 4),
        (F32, [-1, 4], b""),
        (F32, [3], b"\0" * 11),
        (F32, [2], struct.pack("<2f", math.nan, 1.0)),
        (pb.DTYPE_FLOAT16, [1], b"\x00\x7c"),  # +inf
        (0, [1], b"\0"),
        (99, [1], b"\0"),
    ]
    out += [pb.Tensor(dtype=d, shape=s, data=b).SerializeToString() for d, s, b in shapes]
    return out


def framing() -> list[bytes]:
    env = [e.SerializeToString() for e in envelopes()[:8]]
    streams = [
        frame(env[2]),
        b"".join(frame(e) for e in env),
        frame(b"") * 3,
        frame(env[6])[:-3],  # a frame not complete yet
        frame(env[2]) + struct.pack(">I", 2**32 - 1) + b"junk",  # then an oversize header
        frame(env[2]) + frame(env[6]) + frame(env[2])[:2],
        struct.pack(">I", 70_000) + b"\0" * 100,
    ]
    out = []
    for i, s in enumerate(streams):
        for limit, pattern in ((6, 0), (5, 1 + i), (3, 0x41), (2, 9)):
            out.append(bytes([limit, pattern]) + s)
    return out


def controller_session() -> list[bytes]:
    core, sid = controller_core(handshake=False)  # the xids this fresh session will use
    step = core.on_bytes(sid, raw(pb.Hello(versions_bitmap=0b10)), 0.0)
    (req,) = [env for _, env in step.send]
    step = core.on_bytes(sid, raw(features_reply(), xid=req.xid), 0.0)
    barrier = [env for _, env in step.send if env.HasField("barrier_request")][-1]
    handshake = [
        raw(pb.Hello(versions_bitmap=0b10)),
        raw(features_reply(), xid=req.xid),
        raw(pb.BarrierReply(), xid=barrier.xid),
    ]
    seqs = [
        [0, *handshake, raw(pkg_in(), xid=50)],
        [0, raw(pb.Hello(versions_bitmap=0b100))],  # no common version
        [0, raw(pb.EchoRequest(), xid=4), *handshake],
        [0, handshake[0], raw(features_reply("someone-else"), xid=req.xid)],
        [0, handshake[0], raw(pb.FeaturesReply(agent_id=AGENT_ID), xid=req.xid)],
        [0, handshake[0], raw(pkg_in(), xid=5)],
    ]
    main = [
        [raw(pkg_in(), xid=5), raw(pkg_in(2), xid=6)],
        [raw(pkg_in(), xid=5), raw(pkg_in(), xid=5)],  # xid reuse
        [raw(pkg_in(), xid=0)],
        [raw(p, xid=10 + i) for i, p in enumerate(hostile_pkg_ins())],
        [raw(pb.EchoRequest(data=b"x"), xid=3), raw(pb.EchoReply(), xid=1)],
        [raw(pb.Error(type=1, code=1, offending_xid=1), xid=1), raw(pb.StatsReply(), xid=9)],
        [raw(pb.VigilanceRemoved(cookie=5, priority=9)), raw(pb.RoleRequest(role=2), xid=3)],
        [raw(features_reply(), xid=2), raw(pb.Hello(versions_bitmap=2), xid=3)],
        [messages.envelope(pkg_in(), xid=5, version=2).SerializeToString()],
        [b"\xff\xff garbage", b"", raw(pkg_in(), xid=5)],
        [raw(pb.PkgOut(model_id=MODEL_ID), xid=5), raw(pb.TableMod(), xid=6)],
    ]
    seqs += [[1, *m] for m in main]
    return [bytes([s[0]]) + join_messages(s[1:]) for s in seqs]


def agent_core_inputs() -> list[bytes]:
    _, (xid1, xid2) = agent_core(handshake=True)

    def out(xid: int, *verdicts: int, timings: bool = False) -> bytes:
        items = [pb.PkgOutItem(verdict=v, action=1 if v == 1 else 2, score=0.5) for v in verdicts]
        body = pb.PkgOut(model_id=MODEL_ID, items=items)
        if timings:
            body.timings.CopyFrom(pb.Timings(queue_us=5, score_us=9, reply_us=1, controller_us=15))
        return raw(body, xid=xid)

    fp = tables.fingerprint(x(1, 0.25)[0])
    entry = tables.label_entry(fp, 1, pb.VERDICT_ADVERSARIAL, corrected_label=2)
    mod = rules.vigilance_mod(
        "add", match=pb.Match(model_id=MODEL_ID), priority=9, actions=[rules.mirror()]
    )
    handshake = [
        messages.hello("ctrl").SerializeToString(),
        raw(pb.FeaturesRequest(), xid=7),
        raw(pb.BarrierRequest(), xid=8),
    ]
    main = [
        [out(xid1, 1), out(xid2, 2, timings=True)],
        [out(xid1, 2), out(xid1, 1)],  # answered twice
        [out(xid1), out(xid2, 1, 1, 1)],  # wrong item counts
        [out(xid1, 3), out(999, 1)],  # UNKNOWN; an xid nobody sent
        [raw(pb.Error(type=2, code=1, offending_xid=xid1, text="no"), xid=xid1)],
        [raw(mod, xid=20), raw(rules.vigilance_mod("delete"), xid=21), out(xid2, 2)],
        [raw(tables.rt_push(MODEL_ID, [entry]), xid=22), raw(pb.StatsRequest(), xid=23)],
        [raw(pb.TableMod(table=pb.LABEL_TABLE_FT, command=3), xid=24)],
        [
            raw(pb.RoleRequest(role=pb.CONTROLLER_ROLE_SLAVE, generation_id=4), xid=25),
            raw(pb.RoleRequest(role=pb.CONTROLLER_ROLE_MASTER, generation_id=3), xid=26),
        ],
        [raw(pb.EchoRequest(data=b"x"), xid=27), raw(pb.EchoReply(data=b"12345678"), xid=1)],
        [raw(pb.FeaturesRequest(), xid=28), handshake[0], raw(pb.BarrierRequest(), xid=29)],
        [raw(pb.PkgIn(model_id=MODEL_ID), xid=30), b"\x00\x01\x02", b""],
        [messages.envelope(pb.BarrierRequest(), xid=31, version=3).SerializeToString()],
    ]
    seqs = [[0, *handshake, out(xid1, 1)], [0, handshake[1]], [0, handshake[0], handshake[2]]]
    seqs.append([0, messages.hello("ctrl", versions={2}).SerializeToString()])
    seqs += [[1, *m] for m in main]
    return [bytes([s[0]]) + join_messages(s[1:]) for s in seqs]


TARGETS = {
    "codec": codec,
    "tensor": tensors,
    "framing": framing,
    "controller_session": controller_session,
    "agent_core": agent_core_inputs,
}


def write(target: str, inputs: Iterable[bytes], check: bool) -> int:
    """Files missing (with ``check``) or written."""
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for data in inputs:
        path = folder / hashlib.sha1(data).hexdigest()
        if not path.exists():
            n += 1
            if not check:
                path.write_bytes(data)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report missing files")
    args = parser.parse_args(argv)
    missing = 0
    for target, make in TARGETS.items():
        n = write(target, make(), args.check)
        missing += n
        print(f"{target}: {n} {'missing' if args.check else 'written'}")
    return 1 if args.check and missing else 0


if __name__ == "__main__":
    sys.exit(main())
