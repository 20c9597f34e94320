"""The I/O thread: one grpc.aio stream to the controller, reconnecting until closed.

A thin shell around :class:`agents.core.AgentCore`: bytes in -> ``core.receive`` ->
bytes out, a ticker for ``core.tick``, and a flush of the PKG_IN outbox when a caller
kicks it. The thread runs its own (uv)loop so synchronous callers never touch asyncio;
they hand work over with ``loop.call_soon_threadsafe`` and wait on a plain lock.
Every core call is made under the lock the callers share.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from time import perf_counter

import grpc

from agents.core import AgentCore, AgentOutput
from agents.results import Result

log = logging.getLogger(__name__)

CONNECT_METHOD = "/openexample.v1.OpenExample/Connect"


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works too
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Transport:
    """Owns the I/O thread and the session with one controller (``host:port``)."""

    def __init__(
        self,
        core: AgentCore,
        lock: threading.Lock,
        *,
        tick_cap_s: float = 0.1,
        on_retraction: Callable[[Result], object] | None = None,
        up: threading.Event | None = None,
    ) -> None:
        cfg = core.config
        self.core = core
        self.target = cfg.controller
        self._lock = lock
        self._window_s = cfg.batch_window_us * 1e-6
        self._backoff = (cfg.backoff_initial_s, cfg.backoff_cap_s)
        self._tick_cap_s = tick_cap_s
        self._on_retraction = on_retraction
        self.up = up if up is not None else threading.Event()  # set while in MAIN
        self._ready = threading.Event()
        self._closed = False
        self._was_up = True  # so the first failure to connect is logged
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        # Per session: serialized messages for the one writer task.
        self._out: collections.deque[bytes | None] = collections.deque()
        self._out_ready: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="openexample-agent-io", daemon=True)

    # ---- caller side (any thread) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def kick(self) -> None:
        """The core's outbox went non-empty: flush it on the I/O thread."""
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
                out = self.core.disconnected(perf_counter())
            self.up.clear()
            self._carry_out(out)
            # The loop is left stopped, not closed: grpc's process-wide completion queue
            # may still post late channel events to it, which raise on a closed loop.

    async def _main(self) -> None:
        assert self._stop is not None
        attempt = 0
        while not self._stop.is_set() and not self._closed:
            reached_main = await self._session()
            if self._stop.is_set():
                break
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
        self._out = collections.deque()
        self._out_ready = asyncio.Event()
        self._reached_main = False
        channel = grpc.aio.insecure_channel(
            self.target, options=self.core.config.limits.grpc_options()
        )
        call = channel.stream_stream(CONNECT_METHOD)()  # no serializers: raw bytes
        with self._lock:
            out = self.core.connected(perf_counter())
        self._send(out.send)
        tasks = [
            asyncio.ensure_future(self._writer(call)),
            asyncio.ensure_future(self._reader(call)),
            asyncio.ensure_future(self._ticker()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if isinstance(exc, grpc.aio.AioRpcError):
                    # Once per outage at INFO; every retry after that at DEBUG.
                    level = logging.INFO if self._was_up else logging.DEBUG
                    log.log(level, "controller %s: %s", self.target, exc.code().name)
                    self._was_up = False
                elif exc is not None:
                    log.error("agent session failed", exc_info=exc)
        finally:
            for t in tasks:
                t.cancel()
            call.cancel()
            with self._lock:
                out = self.core.disconnected(perf_counter())
            self.up.clear()
            self._carry_out(out)
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
            await asyncio.gather(*tasks, return_exceptions=True)
        return self._reached_main

    def _send(self, envs: list) -> None:
        if envs:
            for env in envs:
                self._out.append(env.SerializeToString())
            assert self._out_ready is not None
            self._out_ready.set()

    async def _writer(self, call: grpc.aio.StreamStreamCall) -> None:
        out, ready = self._out, self._out_ready
        assert ready is not None
        while True:
            while not out:
                ready.clear()
                await ready.wait()
            data = out.popleft()
            if data is None:  # the core asked to close after what it sent
                await call.done_writing()
                return
            await call.write(data)

    async def _reader(self, call: grpc.aio.StreamStreamCall) -> None:
        core = self.core
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                log.info("controller %s closed the stream", self.target)
                return
            with self._lock:
                out = core.receive(data, perf_counter())
            self._carry_out(out)
            if out.established:
                self._reached_main = self._was_up = True
                self.up.set()
                log.info("session with controller %s is up", self.target)
            if out.close:
                self._out.append(None)
                assert self._out_ready is not None
                self._out_ready.set()

    async def _ticker(self) -> None:
        core = self.core
        while True:
            now = perf_counter()
            with self._lock:
                out = core.tick(now)
                deadline = core.next_deadline()
            self._carry_out(out)
            if out.close:  # echo liveness or the handshake deadline ended it
                log.warning("controller %s: %s", self.target, out.close)
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
        core = self.core
        with self._lock:
            batches = core.take_outbox(perf_counter())
        if not batches:
            return
        size = 0
        for batch in batches:  # protobuf building happens here, off the callers' path
            data = core.build_pkg_in(batch).SerializeToString()
            size += len(data)
            self._out.append(data)
        assert self._out_ready is not None
        self._out_ready.set()
        with self._lock:
            core.count_sent_bytes(size)

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
