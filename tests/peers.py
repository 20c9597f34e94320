"""Raw protocol peers for integration tests: they speak OpenExample by hand, over gRPC or
the native channel, with whatever credentials a test gives them (an attacker's too)."""

from __future__ import annotations

import queue
import socket
import ssl
import time

import grpc
import numpy as np

from openexample import messages, tensor
from openexample.addresses import TCP, parse_address
from openexample.framing import FrameDecoder, frame
from openexample.v1 import openexample_pb2 as pb

SHAPE = (1, 28, 28)


def descriptor(model_id: str) -> pb.ModelDescriptor:
    return pb.ModelDescriptor(
        model_id=model_id,
        input_shape=SHAPE,
        input_dtype=pb.DTYPE_FLOAT32,
        class_names=[str(i) for i in range(10)],
    )


def pkg_in(
    x: np.ndarray, model_id: str, logits: np.ndarray | None = None, **item: object
) -> pb.PkgIn:
    """One PKG_IN item per row of ``x`` (fields of PkgInItem in ``item``)."""
    item.setdefault("label", 1)
    item.setdefault("confidence", 0.5)
    item.setdefault("reason", pb.PKG_IN_REASON_TABLE_MISS)
    items = [pb.PkgInItem(**item) for _ in range(len(x))]
    pkg = pb.PkgIn(model_id=model_id, inputs=tensor.encode(x.astype(np.float32)), items=items)
    if logits is not None:
        pkg.logits.CopyFrom(tensor.encode(logits.astype(np.float32)))
    return pkg


class _Peer:
    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def _next(self, timeout: float) -> bytes:
        raise NotImplementedError

    def send_env(self, body: object, xid: int = 0) -> None:
        self.send(messages.envelope(body, xid=xid).SerializeToString())

    def recv(self, kind: str | None = None, timeout: float = 10.0) -> pb.Envelope:
        """The next envelope of ``kind`` (answering ECHOs on the way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            env = pb.Envelope.FromString(self._next(deadline - time.monotonic()))
            if kind is None or env.WhichOneof("body") == kind:
                return env
            if env.HasField("echo_request"):
                self.send(messages.reply(env, pb.EchoReply()).SerializeToString())
        raise TimeoutError(kind)

    def handshake(self, agent_id: str, model_id: str) -> pb.Envelope:
        """HELLO and FEATURES as ``agent_id``; returns the controller's answer to
        FEATURES_REPLY (its first BARRIER_REQUEST, or an ERROR)."""
        self.recv("hello")
        self.send(messages.hello(agent_id).SerializeToString())
        req = self.recv("features_request")
        reply = pb.FeaturesReply(agent_id=agent_id, models=[descriptor(model_id)])
        self.send(messages.reply(req, reply).SerializeToString())
        while True:
            env = self.recv()
            if env.WhichOneof("body") in ("barrier_request", "error"):
                if env.HasField("barrier_request"):
                    self.send(messages.reply(env, pb.BarrierReply()).SerializeToString())
                return env


class GrpcPeer(_Peer):
    """A raw ``Connect`` stream on a channel the test made (secure or not)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self._q: queue.Queue[bytes | None] = queue.Queue()
        self._call = channel.stream_stream("/openexample.v1.OpenExample/Connect")(iter(self._gen()))

    def _gen(self):
        while (item := self._q.get()) is not None:
            yield item

    def send(self, data: bytes) -> None:
        self._q.put(data)

    def _next(self, timeout: float) -> bytes:
        return next(self._call)

    def close(self) -> None:
        self._q.put(None)
        self.channel.close()


class NativePeer(_Peer):
    """A raw native-channel connection (TLS with ``context``, or plain TCP)."""

    def __init__(self, address: str, context: ssl.SSLContext | None, timeout: float = 10.0):
        a = parse_address(address)
        assert a.scheme == TCP
        raw = socket.create_connection((a.host, a.port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=a.host) if context else raw
        self.decoder = FrameDecoder(64 * 1024 * 1024)
        self._frames: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(frame(data))

    def _next(self, timeout: float) -> bytes:
        self.sock.settimeout(max(timeout, 0.01))
        while not self._frames:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the controller closed the connection")
            self._frames += self.decoder.feed(data)
        return self._frames.pop(0)

    def close(self) -> None:
        self.sock.close()


def serve_agent_cli(proc, model: str, agent_id: str, model_id: str, *, http: bool = False) -> tuple:
    """``openexample-agent attach --serve 127.0.0.1:0`` for ``proc`` as ``agent_id`` (its
    certificate); returns the process and the gRPC port once it serves (and the REST
    port, with ``http``: ``--serve-http 127.0.0.1:0``). The caller terminates the
    process."""
    import re
    import subprocess
    import sys

    from bench.procs import ROOT

    files = proc.agent_tls(agent_id)
    cmd = [sys.executable, "-m", "agents.cli", "attach", "--model", model]
    cmd += ["--controller", proc.address, "--serve", "127.0.0.1:0", "--model-id", model_id]
    cmd += ["--input-shape", ",".join(map(str, SHAPE)), "--connect-timeout", "20"]
    cmd += ["--tls-ca", files["tls_ca"], "--tls-cert", files["tls_cert"]]
    cmd += ["--tls-key", files["tls_key"]]
    if http:
        cmd += ["--serve-http", "127.0.0.1:0"]
    agent = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in agent.stdout:
        m = re.search(r"serving model id .*? on [^\s,]+:(\d+)(?:, REST on \S+:(\d+))?\s*$", line)
        if m:
            return (agent, int(m[1]), int(m[2])) if http else (agent, int(m[1]))
    agent.terminate()
    agent.wait(20)
    raise AssertionError("agent CLI did not start serving")
