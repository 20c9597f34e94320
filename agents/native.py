"""The agent's native channel: ``Envelope`` frames over TCP or a Unix socket.

A :class:`agents.transport.Channel` for ``tcp://HOST:PORT`` and ``unix:///PATH``
controller addresses: an asyncio :class:`asyncio.Protocol` on the transport's (uv)loop.
Without TLS, a frame is written straight to the socket from whichever thread has it
(``writes_from_any_thread``): a caller's PKG_IN goes out from the caller's own thread,
with no handoff to the I/O thread (on a VM, waking a sleeping thread costs tens of
microseconds). Writes hold a lock, so frames never interleave; if the kernel ever takes
only part of one, the rest and every later frame go through the loop's transport, in
order. Every complete frame goes to the core from ``data_received`` under the callers'
lock, with no reader task in between. TCP_NODELAY is set on TCP.

TLS: pass an :class:`ssl.SSLContext` (:func:`openexample.tls.client_context`; ALPN
``openexample/1`` is set on it); then the transport does every write, on the loop
thread. After the handshake the controller's certificate must carry a
``controller/<id>`` identity (an agent's certificate would verify too: same CA, same
host names); otherwise the connection is dropped before HELLO and :meth:`open` raises.
A TLS failure (certificate not verified, refused by the controller, not a TLS listener)
comes out as an OSError / outage reason starting with ``TLS:``, one line, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from ssl import SSLCertVerificationError, SSLContext, SSLError
from typing import TYPE_CHECKING

from openexample.addresses import TCP, Address
from openexample.errors import ProtocolError
from openexample.framing import FrameDecoder, frame
from openexample.identity import Kind
from openexample.limits import Limits
from openexample.tls import ssl_peer_identity

if TYPE_CHECKING:
    from agents.transport import Transport

ALPN = "openexample/1"
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# A TLS 1.3 client finishes its handshake before the server checks the client
# certificate: a refused one shows as a stream closed before any answer.
REFUSED_HINT = "TLS: does the controller accept tls_cert? signed by its CA, unexpired?"


def tls_failure(exc: BaseException) -> str:
    """One line saying why a TLS connection failed (an outage reason)."""
    if isinstance(exc, SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        return f"TLS: the controller's certificate does not verify ({why})"
    if isinstance(exc, SSLError):
        reason = exc.reason or str(exc)
        if "ALERT" in reason.upper():
            return f"TLS: the controller refused the handshake or our certificate ({reason})"
        if "WRONG_VERSION_NUMBER" in reason.upper() or "RECORD" in reason.upper():
            return f"TLS: the controller does not speak TLS there ({reason})"
        return f"TLS: handshake failed ({reason})"
    return (
        f"TLS: the controller closed the connection during the handshake"
        f" ({type(exc).__name__}; not a TLS listener, or it refused our certificate)"
    )


class FramedChannel(asyncio.Protocol):
    """One connection to the controller's native listener."""

    def __init__(
        self,
        address: Address,
        limits: Limits,
        *,
        connect_timeout_s: float,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.ssl = ssl
        self.server_hostname = server_hostname
        self._decoder = FrameDecoder(limits.max_message_bytes)
        self._owner: Transport | None = None
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[str | None] | None = None
        self._finishing = False  # this side ends the stream
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1  # the socket, for direct writes (-1: TLS, the transport writes)
        self._wlock = threading.Lock()
        self._queued = False  # a write was left to the transport: all later ones go there
        self._refused: str | None = None  # why the peer was dropped after the handshake
        self._answered = False  # the controller sent something (so it took our certificate)

    @property
    def writes_from_any_thread(self) -> bool:
        return self._fd >= 0

    # -- Channel --

    async def open(self, owner: Transport) -> None:
        self._owner = owner
        loop = self._loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        ssl = self.ssl
        if ssl is not None:
            ssl.set_alpn_protocols([ALPN])
        a = self.address
        if a.scheme == TCP:
            connect = loop.create_connection(
                lambda: self, a.host, a.port, ssl=ssl, server_hostname=self.server_hostname
            )
        else:
            hostname = self.server_hostname if ssl is None else self.server_hostname or "localhost"
            connect = loop.create_unix_connection(
                lambda: self, a.path, ssl=ssl, server_hostname=hostname
            )
        try:
            await asyncio.wait_for(connect, self.connect_timeout_s)
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            raise  # nobody listens (or answers): not a TLS matter
        except (SSLError, ConnectionError, EOFError) as exc:
            if ssl is None:
                raise
            raise OSError(tls_failure(exc)) from None
        if self._refused is not None:
            raise OSError(self._refused)

    def write(self, data: bytes) -> None:
        """One frame, from any thread when ``writes_from_any_thread`` (else the loop's)."""
        buf = frame(data)
        transport = self._transport
        if transport is None:
            return
        if self._fd < 0:
            transport.write(buf)
            return
        with self._wlock:
            if not self._queued:
                try:
                    n = os.write(self._fd, buf)
                except BlockingIOError:
                    n = 0
                except OSError:
                    return  # the connection is gone: connection_lost says so
                if n == len(buf):
                    return
                buf = buf[n:]
                self._queued = True  # the socket is full: the transport queues from here
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to send
                self._loop.call_soon_threadsafe(transport.write, buf)

    def finish(self) -> None:
        self._finishing = True
        transport = self._transport
        if transport is not None:
            with self._wlock:
                if self._queued:  # after the writes still queued on the loop
                    assert self._loop is not None
                    self._loop.call_soon(transport.close)
                    return
            transport.close()  # what was written goes out first

    def set_message_limit(self, max_message_bytes: int) -> None:
        self._decoder.max_message_bytes = max_message_bytes

    async def wait_closed(self) -> str | None:
        assert self._lost is not None
        return await asyncio.shield(self._lost)

    async def aclose(self) -> None:
        transport = self._transport
        if transport is None or self._lost is None:
            return
        self._finishing = True
        transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), 1.0)
        except TimeoutError:
            transport.abort()  # the peer does not read: drop what is buffered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), 1.0)

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self.ssl is not None:
            peer = ssl_peer_identity(transport.get_extra_info("ssl_object"))
            if peer is None or peer.kind is not Kind.CONTROLLER:
                what = f"identity {peer}" if peer is not None else "no openexample identity"
                self._refused = f"TLS: controller certificate carries {what}, not a controller"
                self._finishing = True
                transport.close()  # nothing was written: only close_notify goes out
                return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in _TCP_FAMILIES:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None and self.ssl is None:
            self._fd = sock.fileno()
        self._owner.connected(self)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return  # not our controller: nothing it says reaches the core
        self._answered = True
        owner = self._owner
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as err:
            if not self._finishing:
                owner.refuse(err)
            return
        for f in frames:
            owner.received(f)

    def eof_received(self) -> bool:
        return False  # the controller finished: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        with self._wlock:
            self._fd = -1  # the fd may be reused: never write to it again
        self._owner.lost(self)
        lost = self._lost
        if lost is not None and not lost.done():
            if self._finishing:
                lost.set_result(self._refused)
            elif self.ssl is not None and isinstance(exc, SSLError):
                lost.set_result(tls_failure(exc))  # e.g. an alert: refused our certificate
            elif self.ssl is not None and not self._answered:
                # A refused certificate looks like this (asyncio's server sends no alert).
                lost.set_result(
                    f"{'closed the stream' if exc is None else exc} before answering HELLO"
                    f" ({REFUSED_HINT})"
                )
            elif exc is None:
                lost.set_result("closed the stream")
            else:
                lost.set_result(str(exc))
