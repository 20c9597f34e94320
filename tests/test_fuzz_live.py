"""A fuzz run against a live controller: at least 100,000 mutated messages over
authenticated sessions (mostly the native TCP channel, some over gRPC), and the daemon
keeps serving throughout.

The messages are mutations of valid envelopes (bit flips, truncation, splices, field
values at their extremes, wrong oneofs and wire types, huge declared lengths inside the
protobuf, random bytes) and valid-but-hostile ones (PKG_IN with NaN, wrong dtype or
shape, an unknown model, reused xids, ...). Most are sent in a session that passed HELLO
and FEATURES (so PKG_IN validation and scoring are reached), some before the handshake
or as the handshake itself. Now and then a frame header is hostile (over the limit: the
controller answers BAD_LEN and closes; the fuzzer reconnects) or a frame is cut short
and the connection dropped.

Each burst of frames is written at once (pipelined) and read by a task of its own; a
burst ends with an ECHO_REQUEST whose answer proves the session still stands. Every
5,000 messages: health is SERVING, and a separate well-behaved agent's valid PKG_IN is
answered with a BENIGN or ADVERSARIAL PKG_OUT. At the end the daemon is alive, its log
has no traceback and a last valid PKG_IN is answered.

The RNG is seeded: the seed is printed, and ``OPENEXAMPLE_FUZZ_SEED=<seed>`` replays the
same messages (``OPENEXAMPLE_FUZZ_MESSAGES`` sets how many). A burst that ends a session
unexpectedly is written to ``<tmp_path>/failing-burst-*.bin`` (native frames).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import queue
import random
import ssl
import struct
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openexample import messages, rules, tables, tensor, tls
from openexample.addresses import parse_address
from openexample.errors import error_name
from openexample.framing import FrameDecoder, frame
from openexample.limits import DEFAULT_MAX_MESSAGE_BYTES
from openexample.v1 import openexample_pb2 as pb
from tests.conftest import MODEL_ID
from tests.peers import SHAPE, GrpcPeer, NativePeer, descriptor, pkg_in

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("OPENEXAMPLE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
TOTAL = int(os.environ.get("OPENEXAMPLE_FUZZ_MESSAGES") or 100_000)
CHECK_EVERY = 5_000
BURST = 500  # messages written at once, then an ECHO that must be answered
GRPC_SHARE = 0.08  # of TOTAL, over gRPC (about 4x dearer per message than native)
PRE_SHARE = 0.04  # of TOTAL, before or as the handshake (a connection per 40 or so)
UNDETECTED = "fuzz-undetected"  # declared by the fuzz agents, no detector on it
ACTIVATION = "act0"  # declared by the fuzz agents, so activations are checked
CONNECT = "/openexample.v1.OpenExample/Connect"
REPLY_TIMEOUT_S = 60.0  # for a burst's ECHO; generous, CI machines are shared
FUZZ_IDS = [f"fuzz-{i}" for i in range(4)]


# --- protobuf wire format, by hand (what a hostile peer writes) ---


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def walk(data: bytes) -> list[list] | None:
    """The top-level fields ``[number, wire type, value]`` of a message (value: int for
    varints, bytes otherwise), or None when ``data`` is not a well-formed message."""
    fields, i, n = [], 0, len(data)

    def read_varint() -> int:
        nonlocal i
        shift = value = 0
        while i < n and shift < 70:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
        raise ValueError

    try:
        while i < n:
            key = read_varint()
            num, wt = key >> 3, key & 7
            if num == 0:
                return None
            if wt == 0:
                fields.append([num, 0, read_varint()])
            elif wt in (1, 5):
                size = 8 if wt == 1 else 4
                if i + size > n:
                    return None
                fields.append([num, wt, data[i : i + size]])
                i += size
            elif wt == 2:
                size = read_varint()
                if i + size > n:
                    return None
                fields.append([num, 2, data[i : i + size]])
                i += size
            else:
                return None
    except ValueError:
        return None
    return fields


def build(fields: list[list]) -> bytes:
    """Inverse of :func:`walk`; a 4th element overrides a length-delimited field's
    declared length (a lie about its size)."""
    out = bytearray()
    for f in fields:
        num, wt, value = f[0], f[1], f[2]
        out += tag(num, wt)
        if wt == 0:
            out += varint(value)
        elif wt == 2:
            out += varint(f[3] if len(f) > 3 else len(value)) + value
        else:
            out += value
    return bytes(out)


# --- the mutator ---

BODY_FIELDS = [f.number for f in pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields]
INT_EXTREMES = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1]
FLOAT_EXTREMES = [math.nan, math.inf, -math.inf, -0.0, 3.4e38, -3.4e38, 1e-45, 1.5, -1.0]
HUGE_LENGTHS = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 0x7FFFFFF0]


class Mutator:
    """Mutated messages from valid seed envelopes, reproducibly from ``rng``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.np = np.random.default_rng(rng.randrange(2**32))
        self.seeds = self._seeds()
        self.seed_bytes = [s.SerializeToString() for s in self.seeds]
        self.recent_pkg: list[tuple[int, bytes]] = []  # (xid, PKG_IN) for xid reuse
        self.strategies = [
            (12, self.bytes_mutation),
            (12, self.field_extreme),
            (14, self.hostile_pkg_in),
            (3, self.valid_pkg_in),
            (4, self.valid_other),
            (5, self.wire_mutation),
            (3, self.random_bytes),
            (2, self.xid_reuse),
            (2, self.wrong_version),
        ]
        self.weights = [w for w, _ in self.strategies]

    # the seeds: what an agent sends in MAIN, and what it must not send

    def x(self, n: int) -> np.ndarray:
        return self.np.random((n, *SHAPE), dtype=np.float32)

    def good_pkg_in(self, n: int | None = None, model: str = MODEL_ID) -> pb.PkgIn:
        n = n or self.rng.randint(1, 3)
        x = self.x(n)
        logits = self.np.normal(size=(n, 10)).astype(np.float32)
        pkg = pkg_in(x, model, logits=logits, source_id=f"src-{self.rng.randrange(4)}")
        for i, item in enumerate(pkg.items):
            item.label = int(logits[i].argmax())
            item.fingerprint = tables.fingerprint(x[i])
            item.budget_us = 10_000
        return pkg

    def _seeds(self) -> list[pb.Envelope]:
        mod = rules.vigilance_mod(
            "add", match=pb.Match(model_id=MODEL_ID, label=3), actions=[rules.inspect(500)]
        )
        entry = pb.LabelEntry(fingerprint=b"\x01" * 16, label=2, verdict=pb.VERDICT_ADVERSARIAL)
        act = pb.NamedTensor(name=ACTIVATION, tensor=tensor.encode(np.zeros((1, 4), np.float32)))
        with_act = self.good_pkg_in(1)
        with_act.activations.append(act)
        bodies: list[Message] = [
            self.good_pkg_in(1),
            self.good_pkg_in(2),
            self.good_pkg_in(1, UNDETECTED),
            with_act,
            pb.EchoRequest(data=b"fuzz"),
            pb.EchoReply(data=struct.pack("<d", 1.0)),
            pb.BarrierReply(),
            pb.StatsReply(),
            pb.RoleReply(role=pb.CONTROLLER_ROLE_EQUAL, generation_id=7),
            pb.Error(type=pb.ERROR_TYPE_BAD_REQUEST, code=2, offending_xid=5, text="no"),
            pb.VigilanceRemoved(cookie=1, priority=100, duration_s=1.5, match_count=3),
            # not an agent's to send
            pb.Hello(versions_bitmap=2, sender_id="fuzz", limits=pb.Limits()),
            pb.FeaturesReply(agent_id="fuzz-0", models=[descriptor(MODEL_ID)]),
            pb.FeaturesRequest(),
            pb.PkgOut(model_id=MODEL_ID, items=[pb.PkgOutItem(verdict=1, action=1)]),
            mod,
            tables.rt_push(MODEL_ID, [entry]),
            pb.BarrierRequest(),
            pb.StatsRequest(),
            pb.RoleRequest(generation_id=1),
        ]
        return [messages.envelope(b, xid=self.xid()) for b in bodies]

    def xid(self) -> int:
        r = self.rng.random()
        if r < 0.02:
            return 0
        if r < 0.04:
            return 0xFFFFFFFF
        return self.rng.randrange(1, 2**32)

    def seed(self) -> pb.Envelope:
        env = pb.Envelope()
        env.CopyFrom(self.rng.choice(self.seeds))
        env.xid = self.xid()
        return env

    # strategies: each returns one message (bytes)

    def __call__(self) -> bytes:
        (fn,) = self.rng.choices([f for _, f in self.strategies], self.weights)
        return fn()

    def bytes_mutation(self) -> bytes:
        rng = self.rng
        data = bytearray(rng.choice(self.seed_bytes))
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            op = rng.randrange(7)
            if op == 0 and data:  # bit flip
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1 and data:  # interesting byte
                data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01))
            elif op == 2:  # truncate
                del data[rng.randrange(len(data) + 1) :]
            elif op == 3:  # insert random bytes
                i = rng.randrange(len(data) + 1)
                data[i:i] = rng.randbytes(rng.randrange(1, 16))
            elif op == 4 and data:  # delete a range
                i = rng.randrange(len(data))
                del data[i : i + rng.randrange(1, 32)]
            elif op == 5:  # splice with another seed
                other = rng.choice(self.seed_bytes)
                data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]
            elif op == 6 and data:  # duplicate a range
                i = rng.randrange(len(data))
                data[i:i] = data[i : i + rng.randrange(1, 64)]
        return bytes(data)

    def field_extreme(self) -> bytes:
        """One field anywhere in a seed set to an extreme value (or cleared, or a
        repeated one blown up); setting a oneof member switches the body."""
        env = self.seed()
        slots: list[tuple[Message, object]] = []

        def collect(msg: Message, depth: int) -> None:
            for fd in msg.DESCRIPTOR.fields:
                slots.append((msg, fd))
                if fd.type == FD.TYPE_MESSAGE and depth < 4:
                    if fd.is_repeated:
                        for sub in getattr(msg, fd.name)[:2]:
                            if not fd.message_type.GetOptions().map_entry:
                                collect(sub, depth + 1)
                    elif msg.HasField(fd.name):
                        collect(getattr(msg, fd.name), depth + 1)

        collect(env, 0)
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            msg, fd = self.rng.choice(slots)
            with contextlib.suppress(ValueError, TypeError, OverflowError):
                self._set_extreme(msg, fd)
        return env.SerializeToString()

    def _set_extreme(self, msg: Message, fd: FD) -> None:
        rng = self.rng
        repeated = fd.is_repeated
        if fd.type == FD.TYPE_MESSAGE:
            if repeated:
                field = getattr(msg, fd.name)
                if rng.random() < 0.5:
                    del field[:]
                else:
                    for _ in range(rng.choice((2, 100, 1500))):
                        field.add()
            elif rng.random() < 0.5:
                msg.ClearField(fd.name)
            else:
                getattr(msg, fd.name).SetInParent()
            return
        if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            values = FLOAT_EXTREMES
        elif fd.type == FD.TYPE_STRING:
            values = ["", "x" * 300, "\u00e9\u4e2d\U0001f600" * 40, "\x00", MODEL_ID, "fuzz-0"]
        elif fd.type == FD.TYPE_BYTES:
            values = [b"", b"\x00" * 15, b"\xff" * 17, rng.randbytes(4000), b"\x00" * 16]
        elif fd.type == FD.TYPE_BOOL:
            values = [True, False]
        elif fd.type == FD.TYPE_ENUM:
            values = [0, -1, 99, 2**31 - 1, *(v.number for v in fd.enum_type.values)]
        else:
            values = INT_EXTREMES
        if repeated:
            field = getattr(msg, fd.name)
            if rng.random() < 0.3:
                del field[:]
            for _ in range(rng.choice((1, 3, 9, 1000))):
                with contextlib.suppress(ValueError, TypeError, OverflowError):
                    field.append(rng.choice(values))
        else:
            setattr(msg, fd.name, rng.choice(values))

    def hostile_pkg_in(self) -> bytes:
        """A PKG_IN that parses, valid but for one (or two) hostile details."""
        rng = self.rng
        pkg = self.good_pkg_in()
        n = len(pkg.items)

        def first() -> pb.PkgInItem:
            return pkg.items[0] if pkg.items else pkg.items.add()

        for _ in range(rng.choice((1, 1, 2))):
            r = rng.randrange(22)
            if r == 0:  # NaN / infinity in the inputs
                x = self.x(n)
                x.flat[rng.randrange(x.size)] = rng.choice((np.nan, np.inf, -np.inf))
                pkg.inputs.data = x.tobytes()
            elif r == 1:
                pkg.inputs.dtype = rng.choice((0, 1, 2, 7, -5))
            elif r == 2:
                del pkg.inputs.shape[:]
                pkg.inputs.shape.extend(
                    rng.choice(([n, 28, 28], [n, 1, 28, 28, 1], [], [n * 784], [0, 1, 28, 28]))
                )
            elif r == 3:
                pkg.model_id = rng.choice(("nope", "", "x" * 300, MODEL_ID.upper()))
            elif r == 4:  # more items than rows, or none
                if rng.random() < 0.5:
                    del pkg.items[:]
                else:
                    pkg.items.add(label=1, confidence=0.5, reason=1)
            elif r == 5:
                first().label = rng.choice((10, 255, 2**32 - 1))
            elif r == 6:
                first().confidence = rng.choice((math.nan, -0.1, 1.5, math.inf))
            elif r == 7:
                first().reason = rng.choice((0, 5, 99, -1))
            elif r == 8:
                first().fingerprint = rng.choice((b"\x00", b"\x00" * 17, b"\x01" * 64))
            elif r == 9:
                first().source_id = rng.choice(("s" * 257, "\u00e9" * 200))
            elif r == 10:  # data and shape disagree
                pkg.inputs.data = pkg.inputs.data[: -rng.choice((1, 4, 100))]
            elif r == 11:  # a shape over the element limit, little data
                del pkg.inputs.shape[:]
                pkg.inputs.shape.extend([n, 1, 28, 28 * 10_000])
            elif r == 12:  # shapes whose product overflows, or is 0 with huge dims
                del pkg.inputs.shape[:]
                pkg.inputs.shape.extend(rng.choice(([2**62, 2**62], [0, 2**62], [-1, -784])))
            elif r == 13:  # logits: wrong shape, dtype, NaN
                choice = rng.randrange(3)
                if choice == 0:
                    del pkg.logits.shape[:]
                    pkg.logits.shape.extend([n, 9])
                elif choice == 1:
                    pkg.logits.dtype = pb.DTYPE_UINT8
                else:
                    logits = self.np.normal(size=(n, 10)).astype(np.float32)
                    logits[0, 0] = np.nan
                    pkg.logits.data = logits.tobytes()
            elif r == 14:  # logits absent or empty (allowed: labels only)
                if rng.random() < 0.5:
                    pkg.ClearField("logits")
                else:
                    pkg.logits.CopyFrom(pb.Tensor())
            elif r == 15:  # float16 inputs for a float32 model
                pkg.inputs.CopyFrom(tensor.encode(self.x(n).astype(np.float16)))
            elif r == 16:  # activations: undeclared, twice, bad shapes
                shape = rng.choice(((n, 4), (n + 1, 4), (), (0, 2**62), (2**40, 2**40)))
                act = pkg.activations.add(name=rng.choice((ACTIVATION, "other", "")))
                act.tensor.dtype = pb.DTYPE_FLOAT32
                act.tensor.shape.extend(shape)
                size = math.prod(shape) if math.prod(shape) < 1_000 else 4
                act.tensor.data = b"\x00" * 4 * size
                if rng.random() < 0.3:
                    pkg.activations.append(act)
            elif r == 17:  # values far outside [0, 1] (finite): the detectors must cope
                x = self.x(n) * rng.choice((3.4e38, -3.4e38, 1e-30, 255.0))
                pkg.inputs.data = x.astype(np.float32).tobytes()
            elif r == 18:  # constant images (degenerate for hashes and norms)
                pkg.inputs.data = np.full((n, *SHAPE), rng.choice((0.0, 1.0)), np.float32).tobytes()
            elif r == 19:  # a huge batch of empty items
                for _ in range(rng.choice((1025, 3000))):
                    pkg.items.add()
            elif r == 20:  # a model declared but without detector
                pkg.model_id = UNDETECTED
            else:  # the fingerprint of another input (a forged claim)
                first().fingerprint = b"\x07" * 16
        xid = 0 if rng.random() < 0.03 else self.xid() or 1
        return messages.envelope(pkg, xid=xid).SerializeToString()

    def valid_pkg_in(self) -> bytes:
        xid = self.rng.randrange(1, 2**32)
        data = messages.envelope(self.good_pkg_in(), xid=xid).SerializeToString()
        self.recent_pkg = [*self.recent_pkg[-7:], (xid, data)]
        return data

    def valid_other(self) -> bytes:
        return self.seed().SerializeToString()

    def xid_reuse(self) -> bytes:
        """A PKG_IN again with an xid sent before (in flight or answered by now)."""
        if not self.recent_pkg:
            return self.valid_pkg_in()
        xid, data = self.rng.choice(self.recent_pkg)
        if self.rng.random() < 0.5:
            return data
        return messages.envelope(self.good_pkg_in(), xid=xid).SerializeToString()

    def wrong_version(self) -> bytes:
        env = self.seed()
        env.version = self.rng.choice((0, 2, 63, 64, 2**32 - 1))
        return env.SerializeToString()

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 2, 5, 17, 100, 1000)))

    def wire_mutation(self) -> bytes:
        """Wire-level lies the protobuf runtime must refuse: wrong oneof member or wire
        type, huge declared lengths (nested too), over-long varints, unknown fields,
        deep groups."""
        rng = self.rng
        data = rng.choice(self.seed_bytes)
        fields = walk(data) or []
        r = rng.randrange(8)
        if r == 0 and fields:  # a body under another body's field number
            for f in fields:
                if f[0] in BODY_FIELDS:
                    f[0] = rng.choice(BODY_FIELDS)
            return build(fields)
        if r == 1 and fields:  # wrong wire type for a known field
            f = rng.choice(fields)
            if f[1] == 0:
                f[1], f[2] = 2, varint(f[2])
            elif f[1] == 2:
                f[1], f[2] = rng.choice(((0, len(f[2])), (1, b"\x00" * 8), (5, b"\x00" * 4)))
            else:
                f[1], f[2] = 0, 1
            return build(fields)
        if r == 2 and fields:  # a huge declared length, at depth 0..3
            return self._lie_about_length(fields, rng.randrange(4))
        if r == 3:  # over-long varints (11 bytes) for xid or version
            return bytes([rng.choice((0x08, 0x10))]) + b"\xff" * 10 + b"\x01" + data
        if r == 4:  # unknown fields, big numbers
            num = rng.choice((27, 99, 1000, 2**29 - 1))
            wt = rng.choice((0, 1, 2, 5))
            value = {0: 7, 1: b"\x00" * 8, 2: rng.randbytes(20), 5: b"\x00" * 4}[wt]
            return data + build([[num, wt, value]])
        if r == 5:  # nested groups, deeper than any parser should follow
            depth = rng.choice((50, 101, 1000, 10_000))
            return tag(rng.choice((3, 99)), 3) * depth + tag(3, 4) * rng.randrange(depth)
        if r == 6:  # a field repeated many times (last one wins, or a oneof fight)
            return data + b"".join(build([f]) for f in fields) * rng.choice((2, 50))
        # a length-delimited field whose declared length runs past the end
        cut = bytes(tag(rng.choice(BODY_FIELDS), 2)) + varint(rng.choice(HUGE_LENGTHS))
        return data + cut + rng.randbytes(rng.randrange(8))

    def _lie_about_length(self, fields: list[list], depth: int) -> bytes:
        ld = [f for f in fields if f[1] == 2]
        if not ld:
            return build(fields)
        f = self.rng.choice(ld)
        inner = walk(f[2]) if depth > 0 else None
        if inner:
            f[2] = self._lie_about_length(inner, depth - 1)
        else:
            f.append(self.rng.choice([*HUGE_LENGTHS, len(f[2]) + 1, len(f[2]) + 1000]))
        return build(fields)

    # before or as the handshake

    def hello(self) -> bytes:
        env = messages.hello("fuzz")
        if self.rng.random() < 0.8:
            return env.SerializeToString()
        if self.rng.random() < 0.5:
            env.hello.limits.max_message_bytes = self.rng.choice((1, 100, 2**32 - 1))
        else:
            env.hello.versions_bitmap = self.rng.choice((0, 1, 4, 2**64 - 1, 1 << 63))
            env.version = self.rng.choice((0, 1, 2))
        return env.SerializeToString()

    def features_reply(self, agent_id: str, xid: int) -> bytes:
        body = features(agent_id)
        env = messages.envelope(body, xid=xid)
        if self.rng.random() < 0.7:  # one field at an extreme
            slots = [(env.features_reply, fd) for fd in pb.FeaturesReply.DESCRIPTOR.fields]
            slots += [
                (env.features_reply.models[0], fd) for fd in pb.ModelDescriptor.DESCRIPTOR.fields
            ]
            msg, fd = self.rng.choice(slots)
            with contextlib.suppress(ValueError, TypeError, OverflowError):
                self._set_extreme(msg, fd)
        return env.SerializeToString()


def features(agent_id: str) -> pb.FeaturesReply:
    d = descriptor(MODEL_ID)
    d.activation_names.append(ACTIVATION)
    return pb.FeaturesReply(agent_id=agent_id, models=[d, descriptor(UNDETECTED)])


# --- what came back ---


class Tally:
    def __init__(self) -> None:
        self.kinds: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.verdicts: collections.Counter[str] = collections.Counter()
        self.sent = {"native": 0, "grpc": 0, "pre-handshake": 0}
        self.bad_len_closes = 0
        self.bad_replies: list[str] = []  # what the controller sent that is no envelope
        self.cut_frames = 0
        self.connections = 0
        self.checks = 0

    def count(self, env: pb.Envelope) -> None:
        kind = env.WhichOneof("body")
        self.kinds[kind] += 1
        if kind == "error":
            self.errors[error_name(env.error.type, env.error.code)] += 1
        elif kind == "pkg_out":
            for item in env.pkg_out.items:
                self.verdicts[pb.Verdict.Name(item.verdict)] += 1

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def summary(self) -> str:
        return (
            f"sent {self.sent} over {self.connections} connections; {self.checks} checks; "
            f"replies {dict(self.kinds.most_common())}; verdicts {dict(self.verdicts)}; "
            f"BAD_LEN closes {self.bad_len_closes}; cut frames {self.cut_frames}; "
            f"errors {dict(self.errors.most_common(20))}"
        )


class SessionGone(Exception):
    """The controller ended the session (EOF, reset); ``last`` is its last message."""

    def __init__(self, last: pb.Envelope | None) -> None:
        self.last = last
        what = "nothing" if last is None else str(last).replace("\n", " ")[:300]
        super().__init__(f"the controller closed the session; its last message: {what}")


class NativeFuzzer:
    """One native TLS connection: a reader task counts and answers what comes, the
    fuzzer writes bursts. Sentinel ECHOs (data ``sentinel-N``) mark the burst ends."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.decoder = FrameDecoder(64 * 1024 * 1024)
        self.inbox: asyncio.Queue[pb.Envelope] = asyncio.Queue()
        self.handshaking = True
        self.last: pb.Envelope | None = None
        self.closed = asyncio.Event()
        self.answered: dict[bytes, asyncio.Future] = {}
        self.sentinels = 0
        self.version = messages.PROTOCOL_VERSION

    async def open(self, address: str, context: ssl.SSLContext) -> NativeFuzzer:
        a = parse_address(address)
        self.reader, self.writer = await asyncio.open_connection(
            a.host, a.port, ssl=context, server_hostname=a.host
        )
        self.task = asyncio.create_task(self._read())
        self.tally.connections += 1
        return self

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(1 << 16):
                for f in self.decoder.feed(data):
                    self._on(pb.Envelope.FromString(f))  # the controller must send valid ones
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        except Exception as exc:  # not a frame, or not an Envelope: the controller's bug
            self.tally.bad_replies.append(repr(exc))
        finally:
            self.closed.set()
            for fut in self.answered.values():
                if not fut.done():
                    fut.set_exception(SessionGone(self.last))

    def _on(self, env: pb.Envelope) -> None:
        self.last = env
        self.tally.count(env)
        kind = env.WhichOneof("body")
        if kind == "echo_request":
            self._write(messages.reply(env, pb.EchoReply(data=env.echo_request.data)))
        elif kind == "barrier_request" and not self.handshaking:
            self._write(messages.reply(env, pb.BarrierReply()))
        elif kind == "echo_reply" and env.echo_reply.data in self.answered:
            self.answered.pop(env.echo_reply.data).set_result(env)
        elif kind == "error" and self.answered:  # before HELLO even an ECHO is refused
            key = f"sentinel-{env.xid}".encode()
            if key in self.answered:
                self.answered.pop(key).set_result(env)
        if self.handshaking and kind != "echo_request":
            self.inbox.put_nowait(env)

    def _write(self, env: pb.Envelope) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(env.SerializeToString()))

    async def expect(self, kind: str, timeout: float = 20.0) -> pb.Envelope:
        while True:
            get = asyncio.ensure_future(self.inbox.get())
            closed = asyncio.ensure_future(self.closed.wait())
            done, _ = await asyncio.wait(
                {get, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            closed.cancel()
            if get not in done:
                get.cancel()
                if self.closed.is_set() and self.inbox.empty():
                    raise SessionGone(self.last)
                raise TimeoutError(f"no {kind} in {timeout} s")
            env = get.result()
            if env.WhichOneof("body") == kind:
                return env
            if env.WhichOneof("body") == "error":
                raise SessionGone(env)

    async def handshake(self, agent_id: str) -> None:
        await self.expect("hello")
        self._write(messages.hello(agent_id))
        req = await self.expect("features_request")
        self._write(messages.reply(req, features(agent_id)))
        barrier = await self.expect("barrier_request")
        self._write(messages.reply(barrier, pb.BarrierReply()))
        self.handshaking = False

    async def send(self, frames: list[bytes], *, sentinel: bool = True) -> pb.Envelope | None:
        """Write ``frames`` (already framed) at once, then an ECHO whose answer (or, before
        HELLO, its ERROR) says every frame before it was handled."""
        fut = None
        if sentinel:
            self.sentinels += 1
            xid = 0xF0000000 + self.sentinels
            key = f"sentinel-{xid}".encode()
            fut = asyncio.get_running_loop().create_future()
            self.answered[key] = fut
            echo = messages.envelope(pb.EchoRequest(data=key), xid=xid, version=self.version)
            frames = [*frames, frame(echo.SerializeToString())]
        if self.writer.is_closing() or self.closed.is_set():
            raise SessionGone(self.last)
        self.writer.write(b"".join(frames))
        try:
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            raise SessionGone(self.last) from None
        if fut is None:
            return None
        return await asyncio.wait_for(fut, REPLY_TIMEOUT_S)

    async def wait_closed(self, timeout: float = 20.0) -> None:
        await asyncio.wait_for(self.closed.wait(), timeout)

    async def close(self) -> None:
        """Hang up gracefully (TLS close_notify, which the controller answers)."""
        self.writer.close()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


# --- the checks every CHECK_EVERY messages ---


def serving(proc) -> bool:
    channel = proc.channel_as("reader/health")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        req = health_pb2.HealthCheckRequest(service="openexample.v1.OpenExample")
        return health.Check(req, timeout=20).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


def answered_pkg_in(proc, scheme: str, xid: int) -> pb.PkgOut:
    """A well-behaved agent ("good") connects, sends a valid PKG_IN and gets a PKG_OUT."""
    if scheme == "grpc":
        peer = GrpcPeer(proc.channel_as("agent/good"))
    else:
        files = proc.pki.issue("agent/good", overwrite=False)
        peer = NativePeer(proc.address_for("tcp"), tls.client_context(files), timeout=30)
    try:
        assert peer.handshake("good", MODEL_ID).HasField("barrier_request")
        x = np.random.default_rng(xid).random((1, *SHAPE), dtype=np.float32)
        logits = np.eye(10, dtype=np.float32)[[xid % 10]] * 5
        peer.send_env(pkg_in(x, MODEL_ID, logits=logits, label=xid % 10), xid=xid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            env = peer.recv(timeout=deadline - time.monotonic())
            if env.xid == xid and env.WhichOneof("body") in ("pkg_out", "error"):
                break
        else:
            raise AssertionError(f"no answer to the good agent's PKG_IN over {scheme}")
        assert env.HasField("pkg_out"), env
        return env.pkg_out
    finally:
        peer.close()


def check_alive(proc, tally: Tally, scheme: str) -> None:
    tally.checks += 1
    assert proc.alive(), f"seed {SEED}: the controller died\n" + "\n".join(proc.log[-40:])
    assert serving(proc), f"seed {SEED}: health not SERVING after {tally.total} messages"
    out = answered_pkg_in(proc, scheme, 1_000_000 + tally.checks)
    (item,) = out.items
    assert item.verdict in (pb.VERDICT_BENIGN, pb.VERDICT_ADVERSARIAL), (SEED, out)


# --- the run ---


class FuzzRun:
    def __init__(self, proc, tmp_path: Path) -> None:
        self.proc = proc
        self.tmp_path = tmp_path
        self.tally = Tally()
        rng = random.Random(SEED)
        # One stream of randomness per phase: a phase replays alike whatever the others do.
        self.rng_pre, self.rng_main, self.rng_grpc = (
            random.Random(rng.getrandbits(64)) for _ in "abc"
        )
        self.address = proc.address_for("tcp")
        self.contexts = {
            name: tls.client_context(proc.pki.issue(f"agent/{name}", overwrite=False))
            for name in [*FUZZ_IDS, "fuzz-pre"]
        }
        self.next_check = CHECK_EVERY
        self.started = time.monotonic()

    def due(self) -> bool:
        return self.tally.total >= self.next_check

    def checked(self) -> None:
        t = time.monotonic() - self.started
        print(f"  {self.tally.total} messages in {t:.1f} s ({self.tally.total / t:.0f}/s): ok")
        self.next_check = (self.tally.total // CHECK_EVERY + 1) * CHECK_EVERY

    async def check(self) -> None:
        scheme = ("tcp", "grpc")[self.tally.checks % 2]
        await asyncio.to_thread(check_alive, self.proc, self.tally, scheme)
        self.checked()

    def dump(self, burst: list[bytes]) -> Path:
        path = self.tmp_path / f"failing-burst-{self.tally.total}.bin"
        path.write_bytes(b"".join(burst))
        return path

    # before and as the handshake

    async def pre_handshake(self, count: int) -> None:
        mut = Mutator(self.rng_pre)
        rng = self.rng_pre
        sent = 0
        while sent < count:
            conn = await NativeFuzzer(self.tally).open(self.address, self.contexts["fuzz-pre"])
            try:
                await conn.expect("hello")
                burst: list[bytes] = []
                if rng.random() < 0.5:  # fuzz HELLO itself, then whatever follows
                    burst = [mut.hello() for _ in range(rng.choice((1, 2)))]
                else:  # a valid HELLO, then a fuzzed FEATURES_REPLY with the right xid
                    conn._write(messages.hello("fuzz-pre"))
                    req = await conn.expect("features_request")
                    agent = rng.choice(("fuzz-pre", "fuzz-pre", "fuzz-0", "", "x" * 300))
                    burst = [mut.features_reply(agent, req.xid)]
                burst += [mut() for _ in range(rng.randrange(10, 60))]
                frames = [frame(m) for m in burst]
                self.tally.sent["pre-handshake"] += len(frames)
                sent += len(frames)
                conn.handshaking = False
                # The session may close (HELLO_FAILED, EPERM, BAD_LEN after a tiny limit
                # in HELLO): then the connection must end, not hang.
                try:
                    await conn.send(frames)
                except SessionGone:
                    await conn.wait_closed()
            finally:
                await conn.close()
            if self.due():
                await self.check()

    # in MAIN

    async def main_native(self, count: int) -> None:
        mut = Mutator(self.rng_main)
        rng = self.rng_main
        sent, conn, n_conn = 0, None, 0
        try:
            while sent < count:
                if conn is None:
                    agent = FUZZ_IDS[n_conn % len(FUZZ_IDS)]
                    n_conn += 1
                    conn = await NativeFuzzer(self.tally).open(self.address, self.contexts[agent])
                    await conn.handshake(agent)
                burst = [frame(mut()) for _ in range(min(BURST, count - sent))]
                ending = rng.random()
                if ending < 0.04:  # a hostile header: BAD_LEN, and the connection closes
                    burst.append(
                        struct.pack(
                            ">I", rng.choice((DEFAULT_MAX_MESSAGE_BYTES + 1, 2**32 - 1, 2**31))
                        )
                    )
                elif ending < 0.06:  # a frame cut short, and we hang up
                    burst.append(frame(mut())[: rng.randrange(1, 4)])
                if rng.random() < 0.1:  # empty frames, a big one (under the limit)
                    i = rng.randrange(len(burst))
                    burst.insert(i, frame(b"" if rng.random() < 0.7 else rng.randbytes(1 << 20)))
                sent += len(burst)
                self.tally.sent["native"] += len(burst)
                try:
                    if ending < 0.04:
                        await conn.send(burst, sentinel=False)
                        await conn.wait_closed()
                        last = conn.last
                        assert last is not None and last.HasField("error"), (SEED, last)
                        assert last.error.code == pb.BAD_REQUEST_CODE_BAD_LEN, (SEED, last)
                        self.tally.bad_len_closes += 1
                    elif ending < 0.06:
                        await conn.send(burst[:-1])
                        await conn.send(burst[-1:], sentinel=False)
                        self.tally.cut_frames += 1
                    else:
                        await conn.send(burst)
                except (SessionGone, TimeoutError) as exc:
                    path = self.dump(burst)
                    raise AssertionError(
                        f"seed {SEED}: session ended or stalled in a burst ({path}): {exc}\n"
                        + "\n".join(self.proc.log[-30:])
                    ) from exc
                if ending < 0.06:  # BAD_LEN closed it, or we hang up after the cut frame
                    await conn.close()
                    conn = None
                if self.due():
                    await self.check()
        finally:
            if conn is not None:
                await conn.close()

    # over gRPC (sync API, a reader thread)

    def main_grpc(self, count: int) -> None:
        mut = Mutator(self.rng_grpc)
        channel = self.proc.channel_as("agent/fuzz-grpc")
        out: queue.Queue[bytes | None] = queue.Queue()
        inbox: queue.Queue[pb.Envelope | None] = queue.Queue()
        call = channel.stream_stream(CONNECT)(iter(out.get, None))
        sentinel_seen = threading.Condition()
        seen: set[bytes] = set()
        tally = self.tally
        self.tally.connections += 1

        def read() -> None:
            try:
                for data in call:
                    env = pb.Envelope.FromString(data)
                    tally.count(env)
                    kind = env.WhichOneof("body")
                    if kind == "echo_request":
                        out.put(
                            messages.reply(
                                env, pb.EchoReply(data=env.echo_request.data)
                            ).SerializeToString()
                        )
                    elif kind == "barrier_request":
                        out.put(messages.reply(env, pb.BarrierReply()).SerializeToString())
                        inbox.put(env)
                    elif kind == "echo_reply":
                        with sentinel_seen:
                            seen.add(env.echo_reply.data)
                            sentinel_seen.notify_all()
                    elif kind in ("hello", "features_request"):
                        inbox.put(env)
            except grpc.RpcError:
                pass
            except Exception as exc:  # not an Envelope: the controller's bug
                tally.bad_replies.append(repr(exc))
            finally:
                inbox.put(None)
                with sentinel_seen:
                    sentinel_seen.notify_all()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert inbox.get(timeout=20).HasField("hello")
            out.put(messages.hello("fuzz-grpc").SerializeToString())
            req = inbox.get(timeout=20)
            assert req.HasField("features_request"), req
            out.put(messages.reply(req, features("fuzz-grpc")).SerializeToString())
            assert inbox.get(timeout=20).HasField("barrier_request")
            sent = 0
            while sent < count:
                burst = [mut() for _ in range(min(BURST, count - sent))]
                for m in burst:
                    out.put(m)
                sent += len(burst)
                tally.sent["grpc"] += len(burst)
                key = f"sentinel-grpc-{sent}".encode()
                out.put(messages.envelope(pb.EchoRequest(data=key), xid=sent).SerializeToString())
                with sentinel_seen:
                    ok = sentinel_seen.wait_for(
                        lambda k=key: k in seen or not reader.is_alive(), REPLY_TIMEOUT_S
                    )
                if not ok or key not in seen:
                    path = self.tmp_path / f"failing-grpc-burst-{sent}.bin"
                    path.write_bytes(b"".join(frame(m) for m in burst))
                    raise AssertionError(
                        f"seed {SEED}: gRPC session ended or stalled in a burst ({path})\n"
                        + "\n".join(self.proc.log[-30:])
                    )
                if self.due():
                    check_alive(self.proc, tally, ("tcp", "grpc")[tally.checks % 2])
                    self.checked()
        finally:
            out.put(None)
            channel.close()
            reader.join(10)


@pytest.mark.timeout(600)
def test_fuzz_the_live_controller(controller, tmp_path):
    print(f"\nfuzz seed {SEED} (OPENEXAMPLE_FUZZ_SEED={SEED} replays it), {TOTAL} messages")
    proc = controller(native=["tcp://127.0.0.1:0"])
    run = FuzzRun(proc, tmp_path)
    n_grpc, n_pre = int(TOTAL * GRPC_SHARE), int(TOTAL * PRE_SHARE)
    started = time.monotonic()

    async def native() -> None:
        await run.pre_handshake(n_pre)
        await run.main_native(TOTAL - n_grpc - n_pre)

    asyncio.run(native())
    native_s = time.monotonic() - started
    run.main_grpc(TOTAL - run.tally.total)
    elapsed = time.monotonic() - started
    tally = run.tally

    print(
        f"fuzz: {tally.total} messages in {elapsed:.1f} s ({tally.total / elapsed:.0f}/s; "
        f"native {tally.sent['native'] + tally.sent['pre-handshake']} in {native_s:.1f} s)\n"
        + tally.summary()
    )
    assert tally.total >= TOTAL
    assert not tally.bad_replies, tally.bad_replies
    check_alive(proc, tally, "tcp")
    check_alive(proc, tally, "grpc")
    assert proc.alive()
    log = "\n".join(proc.log)
    assert "Traceback" not in log, f"seed {SEED}:\n{log[-5000:]}"
    assert "reader failed" not in log, f"seed {SEED}:\n{log[-5000:]}"
    # The fuzz reached the deep paths: typed refusals of many kinds, and verdicts.
    assert tally.kinds["error"] > TOTAL // 4, tally.summary()
    assert len(tally.errors) >= 10, tally.summary()
    assert tally.verdicts["VERDICT_BENIGN"] + tally.verdicts["VERDICT_ADVERSARIAL"] > 0
    assert tally.errors["BAD_TENSOR/NOT_FINITE"] > 0 and tally.errors["BAD_REQUEST/BAD_XID"] > 0
