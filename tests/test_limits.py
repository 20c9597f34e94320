"""Limits as typed errors through a real controller: oversize messages over gRPC (above
gRPC's own default too) name their xid; a peer that does not read is told and closed,
and the daemon's memory stays bounded."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openexample import messages, tls
from openexample.v1 import openexample_pb2 as pb
from tests.conftest import MODEL_ID
from tests.peers import GrpcPeer, NativePeer

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def _serving(proc) -> bool:
    health = health_pb2_grpc.HealthStub(proc.channel_as("reader/health"))
    req = health_pb2.HealthCheckRequest(service="openexample.v1.OpenExample")
    return health.Check(req, timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_an_oversize_message_over_grpc_gets_bad_len_with_its_xid(controller):
    proc = controller()
    peer = GrpcPeer(proc.channel_as("agent/big"))
    assert peer.handshake("big", MODEL_ID).HasField("barrier_request")
    for size, xid in ((33 * MiB, 41), (40 * MiB, 42)):  # 40 MiB: over gRPC's old cap too
        huge = messages.envelope(pb.EchoRequest(data=b"x" * size), xid=xid)
        peer.send(huge.SerializeToString())
        err = peer.recv("error")
        assert (err.xid, err.error.code) == (xid, pb.BAD_REQUEST_CODE_BAD_LEN), err.error.text
    # The session goes on.
    peer.send_env(pb.EchoRequest(data=b"hi"), xid=43)
    assert peer.recv("echo_reply").xid == 43
    peer.close()
    assert _serving(proc)


@pytest.mark.parametrize("scheme", ["grpc", "tcp"])
def test_a_peer_that_does_not_read_is_told_and_closed(controller, scheme):
    proc = controller(native=["tcp://127.0.0.1:0"], max_outbox_bytes=4 * MiB)
    files = proc.pki.issue("agent/deaf", overwrite=False)
    if scheme == "grpc":
        peer = GrpcPeer(proc.channel_as("agent/deaf"))
    else:
        peer = NativePeer(proc.address_for("tcp"), tls.client_context(files))
    assert peer.handshake("deaf", MODEL_ID).HasField("barrier_request")
    before = _rss_mb(proc.proc.pid)
    for xid in range(1, 151):  # 150 MiB of ECHO replies asked for, none read
        peer.send_env(pb.EchoRequest(data=b"x" * MiB), xid=xid)
    # What it finally reads: perhaps a few replies the transports held, then the ERROR.
    err = peer.recv("error", timeout=30)
    assert err.error.code == pb.BAD_REQUEST_CODE_NOT_READING, err.error.text
    with pytest.raises((StopIteration, grpc.RpcError, ConnectionError, OSError, TimeoutError)):
        peer.recv(timeout=10)  # and the stream is over
    peer.close()
    assert any("NOT_READING" in line for line in proc.log)
    assert _rss_mb(proc.proc.pid) < before + 100  # not 150 MiB more (and then some)
    assert _serving(proc)
