"""The native channel: framing, addresses, and a real controller listening on gRPC, TCP
and a Unix socket at once, with agents and raw framed clients on each."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl
import stat
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.config import AgentConfig
from bench.procs import ControllerProcess
from openexample import messages, tls
from openexample.addresses import Address, parse_address, parse_addresses
from openexample.errors import ConfigError, ProtocolError
from openexample.framing import FrameDecoder, frame
from openexample.v1 import openexample_pb2 as pb
from tests.conftest import MODEL_ID

SHAPE = (1, 28, 28)

# ---- framing ---------------------------------------------------------------------------


def test_frame_is_a_big_endian_length_and_the_body():
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"


def test_decoder_many_frames_in_one_chunk_and_one_split_over_many():
    dec = FrameDecoder(1000)
    assert dec.feed(frame(b"a") + frame(b"") + frame(b"ccc")) == [b"a", b"", b"ccc"]
    data = frame(b"x" * 100) + frame(b"yz")
    out = []
    for i in range(len(data)):  # one byte at a time, header included
        out += dec.feed(data[i : i + 1])
    assert out == [b"x" * 100, b"yz"] and dec.buffered == 0
    assert dec.feed(frame(b"p")[:3]) == [] and dec.buffered == 3
    assert dec.feed(frame(b"p")[3:] + frame(b"qqq")[:5]) == [b"p"]
    assert dec.feed(b"") == [] and dec.feed(b"") == []
    assert dec.buffered == 5
    done = dec.feed(frame(b"qqq")[5:] + frame(b"r"))
    assert done == [b"qqq", b"r"] and [type(f) for f in done] == [bytes, bytes]


def test_an_oversize_header_is_refused_before_any_body_is_buffered():
    dec = FrameDecoder(10)
    assert dec.feed(frame(b"0123456789")) == [b"0123456789"]  # at the limit: fine
    with pytest.raises(ProtocolError) as e:
        dec.feed(struct.pack(">I", 11))  # the header alone
    assert e.value.name == "BAD_REQUEST/BAD_LEN" and "11 bytes > limit 10" in e.value.text
    assert dec.buffered == 0
    with pytest.raises(ProtocolError):  # the framing is lost for good
        dec.feed(frame(b"ok"))


def test_an_oversize_header_after_good_frames_in_the_same_chunk_and_a_lowered_limit():
    dec = FrameDecoder(1 << 20)
    assert dec.feed(frame(b"x" * 50)) == [b"x" * 50]
    dec.max_message_bytes = 40  # negotiated in HELLO
    with pytest.raises(ProtocolError, match="BAD_LEN"):
        dec.feed(frame(b"ok") + frame(b"x" * 50))
    dec = FrameDecoder(8)
    with pytest.raises(ProtocolError, match="BAD_LEN"):
        dec.feed(b"\x00")  # a header split over chunks is checked once complete
        dec.feed(b"\x00\x00\x09")


@given(
    st.lists(st.binary(max_size=300), max_size=12),
    st.lists(st.integers(0, 4000), max_size=30),
)
def test_random_chunkings_reassemble_exactly(msgs, cuts):
    data = b"".join(frame(m) for m in msgs)
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    dec = FrameDecoder(300)
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += dec.feed(data[a:b])
    assert out == msgs and dec.buffered == 0


# ---- addresses and configuration -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:6653", Address("grpc", "127.0.0.1", 6653)),
        ("grpc://ctl.local:1", Address("grpc", "ctl.local", 1)),
        ("tcp://127.0.0.1:0", Address("tcp", "127.0.0.1", 0)),
        ("TCP://[::1]:7", Address("tcp", "::1", 7)),
        ("[::1]:6653", Address("grpc", "::1", 6653)),
        ("unix:///run/oe.sock", Address("unix", path="/run/oe.sock")),
    ],
)
def test_addresses_parse(text, want):
    assert parse_address(text) == want


def test_address_forms_round_trip():
    assert str(parse_address("[::1]:5")) == "grpc://[::1]:5"
    assert parse_address("tcp://[::1]:5").host_port == "[::1]:5"
    assert str(parse_address("unix:///tmp/a.sock")) == "unix:///tmp/a.sock"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("localhost", "no port"),
        ("h:65536", "port must be 0..65535"),
        ("::1:80", "IPv6 host goes in brackets"),
        ("ftp://h:1", "unknown scheme 'ftp'"),
        ("unix://", "no socket path"),
        ("unix://" + "a" * 200, "longer than 107 bytes"),
        ("tcp://:5", "no host"),
    ],
)
def test_bad_addresses_name_the_key_and_the_text(text, why):
    with pytest.raises(ConfigError) as e:
        parse_address(text, "controller")
    assert str(e.value).startswith(f"controller: HOST:PORT, got {text!r}") and why in str(e.value)


def test_listen_lists_name_the_bad_entry_and_want_one_grpc_address():
    from controller import cli
    from controller.config import Config, from_mapping, validate

    cfg = from_mapping({"listen": ["127.0.0.1:0", "tcp://127.0.0.1:0", "unix:///tmp/x.sock"]})
    assert cfg.grpc_listen == Address("grpc", "127.0.0.1", 0)
    assert [a.scheme for a in cfg.native_listen] == ["tcp", "unix"]
    assert validate(Config(listen="grpc://127.0.0.1:1, tcp://127.0.0.1:2")).native_listen == (
        Address("tcp", "127.0.0.1", 2),
    )
    with pytest.raises(ConfigError, match=r"listen\[1\]: HOST:PORT, got 'tcp://x'"):
        from_mapping({"listen": ["127.0.0.1:0", "tcp://x"]})
    with pytest.raises(ConfigError, match="listen: exactly one gRPC address"):
        from_mapping({"listen": ["tcp://127.0.0.1:0"]})
    with pytest.raises(ConfigError, match="listen: exactly one gRPC address"):
        from_mapping({"listen": ["127.0.0.1:1", "grpc://127.0.0.1:2"]})
    with pytest.raises(ConfigError, match=r"listen\[0\]: expected str"):
        from_mapping({"listen": [5]})
    with pytest.raises(ConfigError, match=r"listen\[1\]: unix:///a is listed twice"):
        parse_addresses(["unix:///a", "unix:///a"])
    # --listen: repeatable, comma-separated, one value stays a string
    args = cli.build_parser().parse_args(
        ["serve", "--listen", "127.0.0.1:1,tcp://127.0.0.1:2", "--listen", "unix:///s"]
    )
    assert cli._listen(args.listen) == ("127.0.0.1:1", "tcp://127.0.0.1:2", "unix:///s")
    assert cli._listen(["127.0.0.1:9"]) == "127.0.0.1:9" and cli._listen(None) is None


def test_agents_take_native_addresses_and_pick_the_channel_by_scheme():
    from agents.cli import build_parser, config_from_args
    from agents.native import FramedChannel
    from agents.transport import GrpcChannel, channel_for

    for addr in ("tcp://127.0.0.1:6654", "unix:///tmp/oe.sock", "grpc://127.0.0.1:6653"):
        assert AgentConfig(controller=addr).controller == addr

    def plain(addr):
        return AgentConfig(controller=addr, plaintext=True)

    assert isinstance(channel_for(plain("tcp://127.0.0.1:1"))(), FramedChannel)
    assert isinstance(channel_for(plain("unix:///s"))(), FramedChannel)
    assert isinstance(channel_for(plain("grpc://127.0.0.1:1"))(), GrpcChannel)
    args = build_parser().parse_args(
        ["attach", "--model", "m.pt", "--controller", "unix:///run/oe.sock", "--serve", ":0"]
    )
    assert config_from_args(args).controller == "unix:///run/oe.sock"
    with pytest.raises(ConfigError, match="controller: HOST:PORT, got 'tcp://h'"):
        AgentConfig(controller="tcp://h")


# ---- the Unix socket file --------------------------------------------------------------


class _NoHost:
    accepting = False


def test_unix_listener_is_0600_replaces_a_stale_file_and_is_removed_on_close(tmp_path):
    from controller import native

    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: what a killed daemon leaves
    stale.close()

    async def run() -> None:
        listener = await native.listen(_NoHost(), parse_address(f"unix://{path}"), 1024)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            with pytest.raises(OSError, match="another process listens there"):
                native.bind_unix(str(path))
        finally:
            listener.close()
        assert not path.exists()

    asyncio.run(run())
    path.write_text("not a socket")
    with pytest.raises(OSError, match="no socket"):
        native.bind_unix(str(path))


# ---- the agent refuses an oversize frame from its controller ---------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _recv_frame(sock: socket.socket) -> bytes | None:
    head = _recv_exactly(sock, 4)
    if head is None:
        return None
    return _recv_exactly(sock, struct.unpack(">I", head)[0])


def test_an_agent_answers_an_oversize_frame_with_bad_len_then_closes(tmp_path):
    from agents import attach

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(10)
    got: dict = {}

    def controller() -> None:
        conn, _ = server.accept()
        conn.settimeout(10)
        with conn:
            got["hello"] = pb.Envelope.FromString(_recv_frame(conn))
            conn.sendall(frame(messages.hello("fake").SerializeToString()))
            conn.sendall(struct.pack(">I", 0xFFFFFFF0))
            frames = []
            while (f := _recv_frame(conn)) is not None:
                frames.append(pb.Envelope.FromString(f))
            got["after"] = frames

    t = threading.Thread(target=controller, daemon=True)
    t.start()
    port = server.getsockname()[1]
    g = attach(
        lambda x: np.zeros((len(x), 3), np.float32),
        controller=f"tcp://127.0.0.1:{port}",
        model_id="m",
        input_shape=(2,),
        backoff_initial_s=5,
        backoff_cap_s=5,
        plaintext=True,  # the fake controller speaks plain TCP
    )
    try:
        t.join(10)
        assert got["hello"].HasField("hello")
        errors = [e.error for e in got["after"] if e.HasField("error")]
        assert [(e.type, e.code) for e in errors] == [
            (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_BAD_LEN)
        ]
    finally:
        g.close()
        server.close()


# ---- a real controller on gRPC + TCP + Unix --------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, artifacts):
    workdir = tmp_path_factory.mktemp("native")
    sock = Path(f"/tmp/oe-test-{os.getpid()}.sock")  # short: sun_path is 108 bytes
    proc = ControllerProcess(
        workdir,
        {
            "models": {MODEL_ID: {"detectors": [str(p) for p in artifacts], "fpr": 0.01}},
            "budget_us": 3_000_000,
        },
        native=["tcp://127.0.0.1:0", f"unix://{sock}"],
    )
    try:
        yield proc.start()
    finally:
        proc.stop()
        assert not sock.exists(), "the Unix socket file outlived the daemon"


@pytest.fixture
def agent(daemon, example_model):
    from agents import attach

    made = []

    def make(scheme: str, agent_id: str, **kw):
        g = attach(
            str(example_model),
            controller=daemon.address_for(scheme),
            model_id=MODEL_ID,
            input_shape=SHAPE,
            connect_timeout_s=20,
            **daemon.agent_tls(agent_id),
            **kw,
        )
        made.append(g)
        assert g.connected, f"agent over {scheme} did not reach MAIN"
        return g

    try:
        yield make
    finally:
        for g in made:
            g.close()


@pytest.fixture(scope="module")
def fgsm(example_model, mnist):
    """FGSM eps 0.3 (ART) on test images the example model gets right."""
    import torch
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    from controller.reference_model import load_model

    clf = PyTorchClassifier(
        load_model(example_model),
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=SHAPE,
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    x, y = mnist.test.x[:150], mnist.test.y[:150]
    adv = FastGradientMethod(clf, eps=0.3).generate(x).astype(np.float32)
    return adv[clf.predict(adv).argmax(1) != y]


class RawClient:
    """A framed client on a socket, no agent code: for what a bad peer sends."""

    def __init__(self, address: str, context: ssl.SSLContext | None = None) -> None:
        a = parse_address(address)
        if a.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(a.path)
        else:
            sock = socket.create_connection((a.host, a.port))
        sock.settimeout(10)
        if context is not None:  # mTLS, as every agent
            sock = context.wrap_socket(sock, server_hostname=a.host or "localhost")
        self.sock = sock

    def send(self, env: pb.Envelope) -> None:
        self.sock.sendall(frame(env.SerializeToString()))

    def recv(self) -> pb.Envelope | None:
        data = _recv_frame(self.sock)
        return None if data is None else pb.Envelope.FromString(data)

    def until(self, kind: str) -> pb.Envelope:
        while (env := self.recv()) is not None:
            if env.WhichOneof("body") == kind:
                return env
        raise AssertionError(f"EOF before {kind}")

    def handshake(self) -> None:
        assert self.recv().HasField("hello")
        self.send(messages.hello("raw-client"))
        self.until("features_request")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon):
    made = []

    files = daemon.pki.issue("agent/raw-client", overwrite=False)

    def make(scheme: str = "tcp") -> RawClient:
        c = RawClient(daemon.address_for(scheme), tls.client_context(files))
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


def _echo(c: RawClient, xid: int) -> pb.Envelope:
    c.send(messages.envelope(pb.EchoRequest(data=b"hi"), xid=xid))
    return c.until("echo_reply")


@pytest.mark.integration
def test_the_daemon_listens_on_every_address_and_the_unix_socket_is_private(daemon):
    assert daemon.native_addresses["tcp"].startswith("tcp://127.0.0.1:")
    path = parse_address(daemon.address_for("unix")).path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    log = "\n".join(daemon.log)
    for scheme in ("tcp", "unix"):
        assert f"native listening on {daemon.address_for(scheme)}" in log


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_agents_over_the_native_channel_get_verdicts(agent, mnist, scheme):
    g = agent(scheme, agent_id=f"native-{scheme}")
    start = 100 if scheme == "tcp" else 200  # inputs nobody sent: no RT entry from the daemon
    results = [g(x) for x in mnist.test.x[start : start + 30]]
    assert {r.decided_by for r in results} == {"controller"}
    assert sum(r.verdict == "benign" for r in results) >= 27
    r = next(r for r in results if r.verdict == "benign")
    assert r.released and r.output.shape == (10,)


@pytest.mark.integration
def test_rt_push_crosses_channels(daemon, agent, fgsm):
    a, b = agent("tcp", agent_id="native-a"), agent("grpc", agent_id="grpc-b")
    for x in fgsm[:40]:
        first = a(x)
        if first.verdict == "adversarial":
            break
    else:
        pytest.fail("no FGSM input was flagged by the detectors")
    assert not first.released and first.decided_by == "controller"
    # A round trip to b after the verdict orders the push before it on b's stream.
    assert daemon.cli("rules", "--controller", daemon.address, "list").returncode == 0
    r = b(x)
    assert (r.decided_by, r.verdict, r.released) == ("rt", "adversarial", False)


@pytest.mark.integration
def test_an_oversize_length_header_gets_bad_len_then_eof_and_others_go_on(raw, agent, mnist):
    g = agent("tcp", agent_id="bystander")
    bad = raw("tcp")
    bad.handshake()
    bad.sock.sendall(struct.pack(">I", 0xFFFFFFFF) + b"never read")
    env = bad.until("error")
    assert (env.error.type, env.error.code) == (
        pb.ERROR_TYPE_BAD_REQUEST,
        pb.BAD_REQUEST_CODE_BAD_LEN,
    )
    assert bad.recv() is None  # then EOF
    assert g(mnist.test.x[0]).decided_by == "controller"
    other = raw("unix")
    other.handshake()
    assert _echo(other, 7).echo_reply.data == b"hi"


@pytest.mark.integration
def test_garbage_in_a_valid_frame_is_refused_and_the_session_goes_on(raw):
    c = raw("unix")
    c.handshake()
    c.sock.sendall(frame(b"\xff\xff\xff\xff"))
    env = c.until("error")
    assert (env.error.type, env.error.code) == (
        pb.ERROR_TYPE_BAD_REQUEST,
        pb.BAD_REQUEST_CODE_MALFORMED,
    )
    assert _echo(c, 42).xid == 42


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_a_client_gone_mid_frame_harms_nothing(daemon, raw, agent, mnist, scheme):
    c = raw(scheme)
    c.handshake()
    c.sock.sendall(struct.pack(">I", 1000) + b"x" * 10)
    c.close()
    early = raw(scheme)
    early.sock.sendall(b"\x00\x00")  # half a header, then gone
    early.close()
    g = agent(scheme, agent_id=f"after-{scheme}")
    assert g(mnist.test.x[1]).decided_by == "controller"
    assert daemon.alive()
    late = raw(scheme)
    late.handshake()
    assert _echo(late, 3).xid == 3


class _Owner:
    """What FramedChannel calls back into (agents.transport.Transport's side)."""

    def __init__(self) -> None:
        self.up = threading.Event()

    def connected(self, channel: object) -> None:
        self.up.set()

    def received(self, data: bytes) -> None:
        pass

    def refuse(self, err: ProtocolError) -> None:
        pass

    def lost(self, channel: object) -> None:
        pass


def test_direct_writes_from_many_threads_keep_frames_whole_and_in_order():
    """Callers write frames from their own threads; when the peer does not read, the
    socket fills and the rest goes through the loop's transport: nothing interleaves,
    nothing is lost, each thread's frames arrive in its order."""
    import uvloop

    from agents.native import FramedChannel
    from openexample.limits import Limits

    server = socket.create_server(("127.0.0.1", 0))
    loop = uvloop.new_event_loop()
    io = threading.Thread(target=loop.run_forever, daemon=True)
    io.start()
    channel = FramedChannel(
        parse_address(f"tcp://127.0.0.1:{server.getsockname()[1]}"),
        Limits(),
        connect_timeout_s=10,
    )
    owner = _Owner()
    try:
        asyncio.run_coroutine_threadsafe(channel.open(owner), loop).result(10)
        peer, _ = server.accept()
        assert owner.up.wait(10) and channel.writes_from_any_thread
        threads, per_thread, payload = 4, 300, b"x" * 8000  # ~10 MB: far over the buffers

        def writer(t: int) -> None:
            for i in range(per_thread):
                channel.write(struct.pack(">HI", t, i) + payload)

        workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        decoder, got = FrameDecoder(1 << 20), []
        peer.settimeout(10)
        while len(got) < threads * per_thread:
            chunk = peer.recv(1 << 16)
            assert chunk, f"stream ended after {len(got)} frames"
            got += decoder.feed(chunk)
        peer.close()
        assert all(f[6:] == payload for f in got)
        seen = [struct.unpack(">HI", f[:6]) for f in got]
        for t in range(threads):
            assert [i for tt, i in seen if tt == t] == list(range(per_thread))
        assert channel._queued  # the socket did fill: the queued path was taken too
    finally:
        asyncio.run_coroutine_threadsafe(channel.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        io.join(10)
        server.close()
