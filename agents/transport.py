"""The I/O thread: one session with the controller over a channel, reconnecting until closed.

A thin shell around :class:`agents.core.AgentCore`: bytes in -> ``core.receive`` ->
bytes out, a ticker for ``core.tick``, and a flush of the PKG_IN outbox when a caller
kicks it. The thread runs its own (uv)loop so synchronous callers never touch asyncio;
they hand work over with ``loop.call_soon_threadsafe`` and wait on a plain lock.
Every core call is made under the lock the callers share.

The channel is pluggable (:class:`Channel`): it only moves messages. The reconnect
loop, the ticker, the flush, carrying out :class:`~agents.core.AgentOutput` and the
thread/lock model are :class:`Transport`'s, whatever the channel:

- :class:`GrpcChannel`: one grpc.aio ``Connect`` stream (``HOST:PORT``, ``grpc://``),
  with a writer task draining a queue and a reader task.
- :class:`agents.native.FramedChannel`: the native channel (``tcp://``, ``unix://``),
  an asyncio Protocol writing frames straight from the loop thread and feeding frames to
  the core from ``data_received``.

:func:`channel_for` picks one from the address scheme.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from time import perf_counter
from typing import Protocol

import grpc

from agents.config import AgentConfig
from agents.core import AgentCore, AgentOutput
from agents.native import REFUSED_HINT, FramedChannel
from agents.results import Result
from openexample.addresses import TCP, parse_address
from openexample.errors import ProtocolError
from openexample.grpc_tls import grpc_channel_credentials
from openexample.limits import Limits
from openexample.messages import PROTOCOL_VERSION, error_envelope
from openexample.session import State
from openexample.tls import client_context

log = logging.getLogger(__name__)
OUTAGE_REPEAT_S = 60.0  # a lasting outage is logged again at WARNING this often

CONNECT_METHOD = "/openexample.v1.OpenExample/Connect"
_GRPC_ADDRESS = re.compile(r"^[A-Z_]+: (?:ipv4|ipv6|unix|unix-abstract):\S*?:\d+: ")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works too
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Channel(Protocol):
    """One stream to the controller, driven by :class:`Transport` on its loop thread."""

    # True when write() may be called from any thread (callers then send their own
    # PKG_IN, with no handoff to the I/O thread); False: the loop thread only.
    writes_from_any_thread: bool

    async def open(self, owner: Transport) -> None:
        """Connect. Call ``owner.connected(self)`` as soon as messages can be written
        and before any is delivered, then ``owner.received(data)`` per message (and
        ``owner.refuse(err)`` for one that cannot even be framed, ``owner.lost(self)``
        once nothing can be written any more). Raise OSError (or TimeoutError) when the
        controller cannot be reached."""
        ...

    def write(self, data: bytes) -> None:
        """Send one serialized Envelope (loop thread)."""
        ...

    def finish(self) -> None:
        """End the stream after what was written."""
        ...

    def set_message_limit(self, max_message_bytes: int) -> None:
        """The limit negotiated in HELLO, for channels that check sizes themselves."""
        ...

    async def wait_closed(self) -> str | None:
        """Until the stream ends: how (an outage or the controller closing it, logged),
        or None when this side ended it."""
        ...

    async def aclose(self) -> None:
        """Tear the stream down (idempotent)."""
        ...


def channel_for(config: AgentConfig, controller: str | None = None) -> Callable[[], Channel]:
    """A maker of channels to ``controller`` (default: ``config.controller``, which must
    then be one address): gRPC for ``HOST:PORT`` and ``grpc://``, the native channel for
    ``tcp://`` and ``unix://``.

    Both use mTLS from the config's ``tls_*`` files (read here, once: a ConfigError names
    a missing or expired one), verifying the controller's certificate for
    ``tls_server_name`` (default: the address's host, ``localhost`` for unix://). Plain
    text only with ``config.plaintext`` (which the config allows on loopback only)."""
    address = parse_address(controller or config.controller, "controller")
    files = config.tls_files()
    server_name = config.tls_server_name
    if address.native:
        timeout_s = config.handshake_timeout_s
        if files is None:
            return lambda: FramedChannel(address, config.limits, connect_timeout_s=timeout_s)
        ctx = client_context(files)
        hostname = server_name or (address.host if address.scheme == TCP else "localhost")
        return lambda: FramedChannel(
            address, config.limits, connect_timeout_s=timeout_s, ssl=ctx, server_hostname=hostname
        )
    target = address.host_port
    if files is None:
        return lambda: GrpcChannel(target, config.limits)
    creds = grpc_channel_credentials(files)
    return lambda: GrpcChannel(target, config.limits, credentials=creds, server_name=server_name)


class Transport:
    """Owns the I/O thread and the session with the controller: one session at a time,
    with the first of ``config.controllers`` that answers. When a session is lost the
    next address is tried at once (failover); the backoff starts only when every address
    failed in a row. Calls in flight when a session ends get the fail mode
    (``core.disconnected``); the next session starts from HELLO and resyncs."""

    def __init__(
        self,
        core: AgentCore,
        lock: threading.Lock,
        *,
        channel: Callable[[], Channel] | None = None,
        tick_cap_s: float = 0.1,
        on_retraction: Callable[[Result], object] | None = None,
        up: threading.Event | None = None,
    ) -> None:
        cfg = core.config
        self.core = core
        self._targets = cfg.controllers if channel is None else (cfg.controller,)
        self._current = 0  # index in _targets of the controller in use or being tried
        self._lock = lock
        self._makers = (
            [channel] if channel is not None else [channel_for(cfg, t) for t in self._targets]
        )
        self._window_s = cfg.batch_window_us * 1e-6
        self._backoff = (cfg.backoff_initial_s, cfg.backoff_cap_s)
        self._tick_cap_s = tick_cap_s
        self._on_retraction = on_retraction
        self.up = up if up is not None else threading.Event()  # set while in MAIN
        self._ready = threading.Event()
        self._closed = False
        self._was_up = True  # so the first failure to connect is logged
        self._last_outage = ""  # why the last session ended (or never began)
        self._outage_since = self._outage_logged = 0.0
        self._attempts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._channel: Channel | None = None  # the stream in use, between connected() and its end
        self._limited = False  # the channel has the limit negotiated in HELLO
        self._reached_main = False
        self._thread = threading.Thread(target=self._run, name="openexample-agent-io", daemon=True)

    # ---- caller side (any thread) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def kick(self) -> None:
        """The core's outbox went non-empty: flush it now in the caller's thread when the
        channel can write from any thread and there is no batch window, else on the I/O
        thread."""
        channel = self._channel
        if (
            self._window_s == 0
            and channel is not None
            and channel.writes_from_any_thread
            and not self._closed
        ):
            self._send_outbox()
            return
        loop = self._loop
        if loop is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # loop closed under us
                loop.call_soon_threadsafe(self._on_kick)

    def call_in_loop(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the I/O thread (used to measure the handoff)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop reconnecting, end the session (waiters get the fail mode), join."""
        if self._closed:
            return
        self._closed = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    # ---- I/O thread ----------------------------------------------------------------

    def _run(self) -> None:
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            loop.run_until_complete(self._main())
        except Exception:  # pragma: no cover - a bug; keep the traceback
            log.exception("agent I/O thread crashed")
        finally:
            with self._lock:
                out = self.core.disconnected(perf_counter(), self._last_outage)
            self.up.clear()
            self._carry_out(out)
            # The loop is left stopped, not closed: grpc's process-wide completion queue
            # may still post late channel events to it, which raise on a closed loop.

    @property
    def target(self) -> str:
        """The controller in use, or being tried."""
        return self._targets[self._current]

    async def _main(self) -> None:
        assert self._stop is not None
        attempt = failed = 0
        while not self._stop.is_set() and not self._closed:
            reached_main = await self._session()
            if self._stop.is_set():
                break
            if len(self._targets) > 1:
                lost = self.target
                self._current = (self._current + 1) % len(self._targets)
                failed = 0 if reached_main else failed + 1
                if reached_main:
                    log.warning("controller %s lost; failing over to %s", lost, self.target)
                if failed % len(self._targets):
                    continue  # another address to try before backing off
            attempt = 0 if reached_main else attempt + 1
            # Exponential backoff with jitter (half fixed, half random), capped.
            initial, cap = self._backoff
            span = min(cap, initial * 2 ** min(attempt, 30))
            delay = span / 2 + random.uniform(0, span / 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _session(self) -> bool:
        """One stream, from HELLO to its end. Returns whether it reached MAIN."""
        assert self._stop is not None
        self._reached_main = False
        self._limited = False
        channel = self._makers[self._current]()
        stopping = asyncio.ensure_future(self._stop.wait())
        opening = asyncio.ensure_future(channel.open(self))
        tasks = [stopping, opening]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                return self._reached_main
            exc = opening.exception()
            if exc is not None:
                if isinstance(exc, OSError | TimeoutError):
                    self._outage(str(exc) or type(exc).__name__)
                else:
                    log.error("agent session failed", exc_info=exc)
                return False
            closing = asyncio.ensure_future(channel.wait_closed())
            running = [stopping, closing, asyncio.ensure_future(self._ticker())]
            tasks += running[1:]
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is stopping:
                    continue
                exc = t.exception()
                if exc is not None:
                    log.error("agent session failed", exc_info=exc)
                elif t is closing and (reason := t.result()):
                    self._outage(reason)
        finally:
            for t in tasks:
                t.cancel()
            self._channel = None
            with self._lock:
                out = self.core.disconnected(perf_counter(), self._last_outage)
            self.up.clear()
            self._carry_out(out)
            with contextlib.suppress(Exception):
                await channel.aclose()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self._reached_main

    def _outage(self, reason: str) -> None:
        # At WARNING when the outage starts, then again at most every OUTAGE_REPEAT_S
        # while it lasts (calls are decided by the fail mode meanwhile; a TLS reason is a
        # certificate or CA to fix); the retries in between at DEBUG.
        now = time.monotonic()
        self._last_outage = reason
        if self._was_up:
            self._outage_since, self._outage_logged, self._attempts = now, now, 0
            log.warning("controller %s: %s", self.target, reason)
        elif now - self._outage_logged >= OUTAGE_REPEAT_S:
            self._outage_logged = now
            log.warning(
                "controller %s: still unreachable after %d attempts in %.0f s: %s",
                self.target,
                self._attempts,
                now - self._outage_since,
                reason,
            )
        else:
            log.debug("controller %s: %s", self.target, reason)
        self._attempts += 1
        self._was_up = False

    # ---- what channels call (loop thread) ------------------------------------------

    def connected(self, channel: Channel) -> None:
        """The stream can take messages: a fresh session, our HELLO goes first."""
        self._channel = channel
        with self._lock:
            out = self.core.connected(perf_counter())
        self._carry_out(out)

    def lost(self, channel: Channel) -> None:
        """The channel's stream is gone: write nothing more to it."""
        if self._channel is channel:
            self._channel = None

    def received(self, data: bytes) -> None:
        """One message from the controller."""
        core = self.core
        limit = 0
        with self._lock:
            out = core.receive(data, perf_counter())
            if not self._limited and (s := core.session) is not None and s.state is not State.HELLO:
                self._limited = True
                limit = s.limits.max_message_bytes
        if limit and self._channel is not None:
            self._channel.set_message_limit(limit)
        self._carry_out(out)
        if out.established:
            self._reached_main = self._was_up = True
            self.up.set()
            log.info("session with controller %s is up", self.target)
        if out.close and self._channel is not None:
            self._channel.finish()

    def refuse(self, err: ProtocolError) -> None:
        """A message that cannot even be framed (oversize): a typed ERROR, then end."""
        log.warning("controller %s: %s; closing the stream", self.target, err)
        with self._lock:
            s = self.core.session
            version = s.version if s is not None else PROTOCOL_VERSION
        channel = self._channel
        if channel is not None:
            channel.write(error_envelope(err, b"", version).SerializeToString())
            channel.finish()

    # ---- shared by every channel ---------------------------------------------------

    async def _ticker(self) -> None:
        core = self.core
        while True:
            now = perf_counter()
            with self._lock:
                out = core.tick(now)
                deadline = core.next_deadline()
            self._carry_out(out)
            if out.close:  # echo liveness or the handshake deadline ended it (the core logs why)
                return
            delay = self._tick_cap_s if deadline is None else deadline - now
            await asyncio.sleep(min(max(delay, 0.001), self._tick_cap_s))

    def _on_kick(self) -> None:
        if self._flush_handle is not None:
            return  # a windowed flush is already due
        if self._window_s > 0:
            assert self._loop is not None
            self._flush_handle = self._loop.call_later(self._window_s, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        self._send_outbox()

    def _send_outbox(self) -> None:
        """Take the queued batches, build their PKG_INs outside the lock, write them (on
        the I/O thread, or on a caller's own thread for channels that allow it)."""
        core = self.core
        with self._lock:
            batches = core.take_outbox(perf_counter())
        if not batches:
            return
        channel = self._channel
        size = 0
        for batch in batches:
            data = core.build_pkg_in(batch).SerializeToString()
            size += len(data)
            if channel is not None:
                channel.write(data)
        with self._lock:
            core.count_sent_bytes(size)

    def _send(self, envs: list) -> None:
        channel = self._channel
        if channel is not None:
            for env in envs:
                channel.write(env.SerializeToString())

    def _carry_out(self, out: AgentOutput) -> None:
        """Do what a core call returned (outside the lock): send, wake, deliver."""
        if out.send:
            self._send(out.send)
        for t in out.settled:
            if t.wake is not None:
                t.wake()
        if out.retractions:
            self._deliver(out.retractions)

    def _deliver(self, retracted: list[Result]) -> None:
        if self._on_retraction is None:
            return
        for res in retracted:
            try:
                self._on_retraction(res)
            except Exception:
                log.exception("on_retraction callback failed")


class GrpcChannel:
    """One grpc.aio ``Connect`` stream: a writer task drains a queue, a reader task
    hands each message to the transport."""

    writes_from_any_thread = False  # grpc.aio calls belong to the loop thread

    def __init__(
        self,
        target: str,
        limits: Limits,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self.target = target
        self.limits = limits
        self.credentials = credentials  # None: plain text
        self.server_name = server_name  # "" = the target's host
        self._out: collections.deque[bytes | None] = collections.deque()
        self._out_ready = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._tasks: list[asyncio.Future] = []
        self._received = False  # a message came: the connection (and TLS) worked

    async def open(self, owner: Transport) -> None:
        options = self.limits.grpc_options()
        if self.credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            self._channel = grpc.aio.secure_channel(self.target, self.credentials, options=options)
        self._call = self._channel.stream_stream(CONNECT_METHOD)()  # no serializers: raw bytes
        owner.connected(self)  # HELLO is queued; the writer sends it once the stream is up
        self._tasks = [
            asyncio.ensure_future(self._writer()),
            asyncio.ensure_future(self._reader(owner.received)),
        ]

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_ready.set()

    def finish(self) -> None:
        self._out.append(None)
        self._out_ready.set()

    def set_message_limit(self, max_message_bytes: int) -> None:
        pass  # gRPC's own limits are set on the channel; the session checks the rest

    async def wait_closed(self) -> str | None:
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            exc = t.exception()
            if isinstance(exc, grpc.aio.AioRpcError):
                return self._reason(exc)
            if exc is not None:
                raise exc
            if t is self._tasks[1]:
                return "closed the stream"
        return None  # the writer finished: the core asked to close

    def _reason(self, exc: grpc.aio.AioRpcError) -> str:
        """One line for the outage log: the code, and for TLS what went wrong."""
        code = exc.code().name
        details = exc.details() or ""
        if self.credentials is None:
            return code
        low = details.lower()
        if any(w in low for w in ("handshake", "ssl", "tls", "certificate", "verification")):
            # "failed to connect to all addresses; last error: UNKNOWN: ipv4:H:P: <why>"
            why = _GRPC_ADDRESS.sub("", details.rsplit("last error: ", 1)[-1])
            why = why.rsplit("OPENSSL_internal:", 1)[-1].removesuffix(": OK").strip()
            if "WRONG_VERSION_NUMBER" in why:
                return f"TLS: the controller does not speak TLS there ({code}: {why})"
            return f"TLS: handshake failed ({code}: {why})"
        if not self._received and "socket closed" in low:
            return f"{code}: closed the connection before answering HELLO ({REFUSED_HINT})"
        return code

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close(grace=None)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _writer(self) -> None:
        out, ready, call = self._out, self._out_ready, self._call
        assert call is not None
        while True:
            while not out:
                ready.clear()
                await ready.wait()
            data = out.popleft()
            if data is None:  # the core asked to close after what it sent
                await call.done_writing()
                return
            await call.write(data)

    async def _reader(self, received: Callable[[bytes], None]) -> None:
        call = self._call
        assert call is not None
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                return
            self._received = True
            received(data)
