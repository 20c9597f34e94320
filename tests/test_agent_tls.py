"""The agent side of mTLS, over real sockets on loopback (no controller process).

Stand-in controllers (a grpc.aio server answering the raw Connect method, an asyncio
TLS listener for the native channel) record who connected; the agent is what
``channel_for`` / ``attach`` build from an :class:`AgentConfig`. The Predict API is
served by ``agents.server.start_server`` for a Guard whose controller is away.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agents.config import AgentConfig
from agents.server import start_server
from agents.transport import channel_for
from openexample import tensor
from openexample.errors import ConfigError
from openexample.framing import frame
from openexample.grpc_tls import grpc_server_credentials
from openexample.identity import Identity, Kind
from openexample.pki import DevPki, issue, make_ca, write_pair
from openexample.tls import (
    TlsFiles,
    grpc_peer_identity,
    server_context,
    ssl_peer_identity,
)
from openexample.v1 import predict_pb2, predict_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CONNECT = ("openexample.v1.OpenExample", "Connect")


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> DevPki:
    folder = tmp_path_factory.mktemp("pki")
    pki = DevPki(folder).ensure(
        [
            "controller/ctl-1",
            "agent/plc-1",
            "agent/rogue",
            "caller/alice",
            "operator/olga",
        ]
    )
    pki.issue("controller/ctl-named", hosts=["ctl.example"])
    # agent/plc-1 again, from another CA (the CA file is the right one: only the
    # certificate is foreign)
    ca_cert, ca_key = make_ca("Another CA")
    other = folder / "other"
    for ident in ("agent/plc-1", "caller/alice"):
        cert, key = issue(ca_cert, ca_key, Identity.parse(ident))
        write_pair(other, ident.replace("/", "-"), cert, key)
    # agent/old: expired yesterday
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    pki.issue("agent/old", days=1, not_before=start)
    return pki


def foreign(pki: DevPki, ident: str) -> TlsFiles:
    """``ident``'s certificate and key from another CA, with our CA file."""
    stem = pki.folder / "other" / ident.replace("/", "-")
    return TlsFiles(pki.ca, stem.with_suffix(".crt"), stem.with_suffix(".key"))


def tls_settings(files: TlsFiles) -> dict[str, str]:
    return {"tls_ca": str(files.ca), "tls_cert": str(files.cert), "tls_key": str(files.key)}


@pytest.fixture(scope="module")
def loop():
    """An event loop on its own thread, for the stand-in servers and channels."""
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, name="test-loop", daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(5)


def run(loop: asyncio.AbstractEventLoop, coro: Any, timeout_s: float = 5.0) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)


@pytest.fixture
def free_port():
    """A loopback port where nothing listens (bound, never listening: refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def _logits(x: np.ndarray) -> np.ndarray:
    return np.tile(np.array([0.0, 1.0, 0.5], np.float32), (len(x), 1))


def wait_for(cond: Callable[[], object], timeout_s: float = 4.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


class Owner:
    """What a channel calls back into (the Transport's side), recording it."""

    def __init__(self) -> None:
        self.connects = 0
        self.messages: list[bytes] = []

    def connected(self, channel: object) -> None:
        self.connects += 1
        channel.write(b"hello")  # type: ignore[attr-defined]

    def received(self, data: bytes) -> None:
        self.messages.append(data)

    def refuse(self, err: object) -> None:
        pass

    def lost(self, channel: object) -> None:
        pass


# ---- stand-in controllers ----------------------------------------------------------------


class GrpcController:
    """A grpc.aio server with the raw Connect method: records the peer's identity and
    what it sent first, then hangs up."""

    def __init__(self, files: TlsFiles | None) -> None:
        self.files = files
        self.peers: list[Identity | None] = []
        self.first: list[bytes] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _connect(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        self.peers.append(grpc_peer_identity(context))
        async for data in requests:
            self.first.append(data)
            break
        return
        yield  # a stream handler that answers nothing

    async def start(self) -> GrpcController:
        handler = grpc.method_handlers_generic_handler(
            CONNECT[0], {CONNECT[1]: grpc.stream_stream_rpc_method_handler(self._connect)}
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([handler])
        if self.files is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc_server_credentials(self.files)
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


class NativeController:
    """An asyncio TLS listener (``server_context``): records the peer's identity and the
    bytes it sent, answers one frame (``bye``), then hangs up."""

    def __init__(self, files: TlsFiles | None, path: Path | None = None) -> None:
        self.files = files
        self.path = path
        self.peers: list[Identity | None] = []
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(ssl_peer_identity(writer.get_extra_info("ssl_object")))
        if self.files is None:  # plain text: answer whatever came with a frame
            writer.write(frame(b"bye"))
        try:
            data = await asyncio.wait_for(reader.read(1 << 16), 2.0)
            self.received.append(data)
            if data:
                writer.write(frame(b"bye"))
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            self.received.append(repr(exc).encode())
        writer.close()

    async def start(self) -> NativeController:
        ctx = server_context(self.files) if self.files is not None else None
        if self.path is not None:
            self.server = await asyncio.start_unix_server(self._handle, self.path, ssl=ctx)
        else:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"unix://{self.path}" if self.path else f"tcp://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _session(make: Callable[[], Any], owner: Owner) -> str | None:
    """Open one channel, wait until the peer ends it; returns wait_closed's reason."""
    channel = make()
    try:
        await channel.open(owner)
        return await asyncio.wait_for(channel.wait_closed(), 3.0)
    finally:
        await channel.aclose()


# ---- (a) the gRPC channel presents the agent's certificate -------------------------------


@pytest.mark.parametrize("server_name", ["", "ctl.example"])
def test_grpc_channel_presents_the_agent_identity(pki, loop, server_name):
    ctl_name = "controller/ctl-named" if server_name else "controller/ctl-1"
    ctl = run(loop, GrpcController(pki.files(ctl_name)).start())
    try:
        cfg = AgentConfig(
            controller=f"127.0.0.1:{ctl.port}",
            tls_server_name=server_name,
            **tls_settings(pki.files("agent/plc-1")),
        )
        owner = Owner()
        reason = run(loop, _session(channel_for(cfg), owner))
        assert ctl.peers == [Identity(Kind.AGENT, "plc-1")]
        assert ctl.first == [b"hello"]
        assert reason == "closed the stream"
    finally:
        run(loop, ctl.stop())


def test_grpc_channel_verifies_the_controller_name(pki, loop):
    ctl = run(loop, GrpcController(pki.files("controller/ctl-named")).start())
    try:
        cfg = AgentConfig(
            controller=f"127.0.0.1:{ctl.port}",
            tls_server_name="other.example",  # not in the certificate
            **tls_settings(pki.files("agent/plc-1")),
        )
        reason = run(loop, _session(channel_for(cfg), Owner()))
        assert ctl.peers == []
        assert reason.startswith("TLS: handshake failed (UNAVAILABLE: ")
        assert "Hostname Verification" in reason
    finally:
        run(loop, ctl.stop())


def test_grpc_channel_says_tls_when_the_controller_refuses_the_certificate(pki, loop):
    ctl = run(loop, GrpcController(pki.files("controller/ctl-1")).start())
    try:
        cfg = AgentConfig(
            controller=f"127.0.0.1:{ctl.port}", **tls_settings(foreign(pki, "agent/plc-1"))
        )
        reason = run(loop, _session(channel_for(cfg), Owner()))
        assert ctl.peers == []
        assert reason.startswith("UNAVAILABLE: closed the connection before answering HELLO")
        assert "TLS: does the controller accept tls_cert?" in reason
    finally:
        run(loop, ctl.stop())


def test_grpc_channel_to_a_plaintext_controller_fails_as_tls(pki, loop):
    ctl = run(loop, GrpcController(None).start())
    try:
        cfg = AgentConfig(
            controller=f"127.0.0.1:{ctl.port}", **tls_settings(pki.files("agent/plc-1"))
        )
        reason = run(loop, _session(channel_for(cfg), Owner()))
        assert ctl.peers == []
        assert reason.startswith("TLS: the controller does not speak TLS there")
        # and plain text to it works only when asked for
        plain = AgentConfig(controller=f"127.0.0.1:{ctl.port}", plaintext=True)
        assert run(loop, _session(channel_for(plain), Owner())) == "closed the stream"
        assert ctl.peers == [None]
    finally:
        run(loop, ctl.stop())


# ---- (b) the native channel, over TCP and a Unix socket -----------------------------------


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_native_channel_presents_the_agent_identity(pki, loop, tmp_path, scheme):
    path = tmp_path / "ctl.sock" if scheme == "unix" else None
    ctl = run(loop, NativeController(pki.files("controller/ctl-1"), path).start())
    try:
        cfg = AgentConfig(controller=ctl.address, **tls_settings(pki.files("agent/plc-1")))
        owner = Owner()
        reason = run(loop, _session(channel_for(cfg), owner))
        assert ctl.peers == [Identity(Kind.AGENT, "plc-1")]
        assert owner.connects == 1 and ctl.received == [frame(b"hello")]
        assert owner.messages == [b"bye"]
        assert reason == "closed the stream"
    finally:
        run(loop, ctl.stop())


def test_native_channel_checks_the_server_name(pki, loop):
    ctl = run(loop, NativeController(pki.files("controller/ctl-named")).start())
    try:
        settings = tls_settings(pki.files("agent/plc-1"))
        cfg = AgentConfig(controller=ctl.address, tls_server_name="ctl.example", **settings)
        assert run(loop, _session(channel_for(cfg), Owner())) == "closed the stream"
        bad = cfg.replace(tls_server_name="other.example")
        with pytest.raises(OSError, match=r"^TLS: the controller's certificate does not verify"):
            run(loop, _session(channel_for(bad), Owner()))
        assert ctl.peers[0] == Identity(Kind.AGENT, "plc-1")
    finally:
        run(loop, ctl.stop())


# ---- (c) the agent refuses a controller that is not one ------------------------------------


def test_native_channel_refuses_a_controller_with_an_agent_certificate(pki, loop):
    ctl = run(loop, NativeController(pki.files("agent/rogue")).start())  # verifies, wrong kind
    try:
        cfg = AgentConfig(controller=ctl.address, **tls_settings(pki.files("agent/plc-1")))
        owner = Owner()
        with pytest.raises(OSError) as e:
            run(loop, _session(channel_for(cfg), owner))
        assert str(e.value) == (
            "TLS: controller certificate carries identity agent/rogue, not a controller"
        )
        assert owner.connects == 0  # no HELLO went out: only TLS's close_notify
        assert wait_for(lambda: ctl.received) and ctl.received == [b""]
        assert ctl.peers == [Identity(Kind.AGENT, "plc-1")]
    finally:
        run(loop, ctl.stop())


@pytest.mark.parametrize(
    ("kind", "controller", "agent", "why"),
    [
        ("native", "agent/rogue", "agent/plc-1", "identity agent/rogue, not a controller"),
        ("native", "controller/ctl-1", "foreign", "TLS: does the controller accept tls_cert?"),
        ("native", None, "agent/plc-1", "TLS: the controller does not speak TLS there"),
        ("grpc", "controller/ctl-1", "foreign", "TLS: does the controller accept tls_cert?"),
        ("grpc", None, "agent/plc-1", "TLS: the controller does not speak TLS there"),
    ],
)
def test_an_attached_agent_logs_a_tls_failure_once_without_a_traceback(
    pki, loop, caplog, kind, controller, agent, why
):
    from agents import attach

    files = pki.files(controller) if controller else None
    ctl = run(loop, (NativeController if kind == "native" else GrpcController)(files).start())
    address = ctl.address if kind == "native" else f"127.0.0.1:{ctl.port}"
    mine = foreign(pki, "agent/plc-1") if agent == "foreign" else pki.files(agent)
    caplog.set_level(logging.DEBUG, logger="agents")
    guard = None

    def outages() -> list[logging.LogRecord]:
        return [r for r in caplog.records if why in r.getMessage()]

    try:
        guard = attach(
            _logits, controller=address, input_shape=(2,), backoff_cap_s=0.1, **tls_settings(mine)
        )
        assert guard.config.agent_id == "plc-1"
        assert wait_for(lambda: len(outages()) >= 3)  # it keeps retrying
        assert not guard.connected
        res = guard(np.zeros(2, np.float32))  # meanwhile the fail mode decides
        assert res.decided_by == "disconnected" and res.released
        assert res.reason.startswith("no controller: ") and why in res.reason  # and says why
    finally:
        if guard is not None:
            guard.close()
        run(loop, ctl.stop())
    first, *retries = outages()
    assert first.levelno == logging.WARNING and "\n" not in first.getMessage()
    assert all(r.levelno == logging.DEBUG for r in retries)  # once per outage
    assert not any(r.exc_info for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    if kind == "native" and controller == "agent/rogue":
        assert all(data == b"" for data in ctl.received)  # never a frame: no HELLO


def test_a_lasting_outage_is_logged_again_at_warning(caplog, monkeypatch):
    """The first failure at WARNING, retries at DEBUG, and a WARNING again every
    OUTAGE_REPEAT_S while the controller stays unreachable (shortened here)."""
    from agents import attach, transport

    monkeypatch.setattr(transport, "OUTAGE_REPEAT_S", 0.3)
    caplog.set_level(logging.DEBUG, logger="agents")
    guard = attach(
        _logits, controller="127.0.0.1:1", plaintext=True, input_shape=(2,), backoff_cap_s=0.05
    )
    try:
        assert wait_for(
            lambda: any("still unreachable after" in r.getMessage() for r in caplog.records)
        )
        res = guard(np.zeros(2, np.float32))
        assert res.decided_by == "disconnected" and res.reason.startswith("no controller: ")
    finally:
        guard.close()
    ours = [r for r in caplog.records if r.name == "agents.transport"]
    assert ours[0].levelno == logging.WARNING
    assert any(r.levelno == logging.DEBUG for r in ours)  # retries in between
    again = [r for r in ours if "still unreachable after" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in again)


# ---- (d) certificates the agent cannot use -------------------------------------------------


def test_native_channel_with_a_foreign_certificate_is_refused_by_the_controller(pki, loop):
    ctl = run(loop, NativeController(pki.files("controller/ctl-1")).start())
    try:
        cfg = AgentConfig(controller=ctl.address, **tls_settings(foreign(pki, "agent/plc-1")))
        try:
            reason = run(loop, _session(channel_for(cfg), Owner()))
        except OSError as exc:  # TLS 1.2: the handshake itself fails
            reason = str(exc)
        assert "TLS: does the controller accept tls_cert?" in reason or (
            reason.startswith("TLS: ") and "ALERT" in reason
        )
        assert ctl.peers == []  # its handshake failed
    finally:
        run(loop, ctl.stop())


def test_an_expired_or_foreign_or_wrong_kind_certificate_is_refused_at_attach(pki, free_port):
    from agents import attach

    where = {"controller": f"127.0.0.1:{free_port}", "input_shape": (2,)}
    old = tls_settings(pki.files("agent/old"))
    with pytest.raises(ConfigError) as e:
        attach(_logits, **where, **old)
    assert str(e.value).startswith("tls_cert: ")
    assert "agent-old.crt expired on" in str(e.value)
    with pytest.raises(ConfigError, match=r"tls_cert: .* expired on"):
        TlsFiles.from_settings(old["tls_ca"], old["tls_cert"], old["tls_key"])
    with pytest.raises(ConfigError, match=r"^tls_cert: identity caller/alice is not an agent$"):
        attach(_logits, **where, **tls_settings(pki.files("caller/alice")))
    with pytest.raises(ConfigError) as e:
        attach(_logits, **where, agent_id="plc-2", **tls_settings(pki.files("agent/plc-1")))
    assert str(e.value).startswith("agent_id: 'plc-2', but tls_cert proves agent/plc-1")
    # a foreign certificate is only found out by the controller (the handshake)
    guard = attach(_logits, **where, **tls_settings(foreign(pki, "agent/plc-1")))
    guard.close()


def test_the_agent_id_is_the_certificate_name(pki, free_port, caplog):
    from agents import attach

    caplog.set_level(logging.WARNING, logger="agents")
    where = {"controller": f"127.0.0.1:{free_port}", "input_shape": (2,)}
    for agent_id in ("", "plc-1"):
        guard = attach(
            _logits, **where, agent_id=agent_id, **tls_settings(pki.files("agent/plc-1"))
        )
        try:
            assert guard.config.agent_id == "plc-1" and guard.core.agent_id == "plc-1"
        finally:
            guard.close()
    assert not [r for r in caplog.records if "plain text" in r.getMessage()]
    guard = attach(_logits, **where, plaintext=True)
    try:
        host = socket.gethostname()
        assert guard.config.agent_id.startswith(f"{host}-")  # <host>-<pid>-<model_id>
    finally:
        guard.close()
    warned = [r for r in caplog.records if "plain text" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "unauthenticated" in warned[0].getMessage()


def test_cli_agent_id_that_is_not_the_certificate_is_one_line_exit_2(pki, tmp_path):
    files = pki.files("agent/plc-1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "agents.cli",
            "attach",
            *("--model", str(tmp_path / "m.pt"), "--controller", "127.0.0.1:1"),
            *("--serve", "127.0.0.1:0", "--agent-id", "plc-9"),
            *("--tls-ca", str(files.ca), "--tls-cert", str(files.cert)),
            *("--tls-key", str(files.key)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("openexample-agent: error: agent_id: 'plc-9', but tls_cert proves")


# ---- (e) the Predict API ---------------------------------------------------------------------


@pytest.fixture
def predict(pki, loop, free_port):
    """Factory: a Guard (controller away, plaintext to it, standalone: releases) served
    by start_server(**kw); returns (port, the source ids that reached guard.abatch)."""
    from agents import attach

    guard = attach(
        _logits,
        controller=f"127.0.0.1:{free_port}",
        plaintext=True,
        model_id="m",
        input_shape=(2,),
    )
    sources: list[Any] = []
    real = guard.abatch

    async def abatch(xs: Any, *, source_id: Any = "") -> Any:
        sources.append(source_id)
        return await real(xs, source_id=source_id)

    guard.abatch = abatch  # type: ignore[method-assign]
    servers = []

    def serve(**kw: Any) -> tuple[int, list[Any]]:
        server, port = run(loop, start_server(guard, "127.0.0.1:0", **kw))
        servers.append(server)
        return port, sources

    yield serve
    for server in servers:
        run(loop, server.stop(None))
    guard.close()


def _call(port: int, creds: grpc.ChannelCredentials | None, source_id: str = "") -> Any:
    target = f"127.0.0.1:{port}"
    with (
        grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    ) as ch:
        stub = predict_pb2_grpc.PredictorStub(ch)
        req = predict_pb2.PredictRequest(
            input=tensor.encode(np.zeros((1, 2), np.float32)), source_id=source_id
        )
        return stub.Predict(req, timeout=3)


def _creds(files: TlsFiles, *, client_cert: bool = True) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(ca, key, cert)


def test_predict_source_is_the_caller_certificate_name(pki, predict):
    port, sources = predict(tls=pki.files("agent/plc-1"))
    alice = _creds(pki.files("caller/alice"))
    resp = _call(port, alice)
    assert len(resp.results) == 1 and resp.results[0].released
    _call(port, alice, source_id="alice")  # claiming the certified name is fine
    assert sources == ["alice", "alice"]
    with pytest.raises(grpc.RpcError) as e:
        _call(port, alice, source_id="bob")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.details() == "source_id bob: your certificate says caller/alice"
    assert sources == ["alice", "alice"]  # the refused call never reached the guard


@pytest.mark.parametrize("who", ["operator/olga", "agent/rogue"])
def test_predict_refuses_certificates_that_are_not_callers(pki, predict, who):
    port, sources = predict(tls=pki.files("agent/plc-1"))
    with pytest.raises(grpc.RpcError) as e:
        _call(port, _creds(pki.files(who)), source_id="x")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"identity {who}" in e.value.details()
    assert sources == []


def test_predict_refuses_plaintext_no_certificate_and_a_foreign_certificate(pki, predict):
    port, sources = predict(tls=pki.files("agent/plc-1"))
    for creds in (
        None,  # plain text to the TLS port
        _creds(pki.files("caller/alice"), client_cert=False),
        _creds(foreign(pki, "caller/alice")),
    ):
        with pytest.raises(grpc.RpcError) as e:
            _call(port, creds, source_id="alice")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sources == []


def test_predict_without_client_auth_namespaces_unauthenticated_sources(pki, predict):
    port, sources = predict(tls=pki.files("agent/plc-1"), client_auth=False)
    anon = _creds(pki.files("caller/alice"), client_cert=False)
    _call(port, anon, source_id="alice")
    _call(port, anon)
    assert sources == ["unauth:127.0.0.1/alice", "unauth:127.0.0.1"]


def test_predict_in_plaintext_is_loopback_only_and_unauthenticated(pki, predict, loop, caplog):
    caplog.set_level(logging.WARNING, logger="agents")
    port, sources = predict(tls=None)
    _call(port, None, source_id="alice")
    assert sources == ["unauth:127.0.0.1/alice"]
    assert any("plain text" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"^serve: plaintext only on loopback"):
        run(loop, start_server(None, "0.0.0.0:0", tls=None))  # type: ignore[arg-type]


# ---- (f) configuration ---------------------------------------------------------------------


def test_plaintext_to_a_remote_controller_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^controller: plaintext only on loopback"):
        AgentConfig(controller="tcp://10.1.2.3:6654", plaintext=True)
    with pytest.raises(ConfigError, match=r"^tls_ca: required"):
        channel_for(AgentConfig(controller="10.1.2.3:6653"))
    with pytest.raises(ConfigError, match=r"^tls_ca: cannot read"):
        channel_for(
            AgentConfig(
                controller="tcp://10.1.2.3:6654",
                tls_ca=str(tmp_path / "nope.crt"),
                tls_cert=str(tmp_path / "a.crt"),
                tls_key=str(tmp_path / "a.key"),
            )
        )
