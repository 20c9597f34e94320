"""The controller's native channel: ``Envelope`` frames over TCP or a Unix socket.

An asyncio :class:`asyncio.Protocol` per connection, on the daemon's (uv)loop beside
grpc.aio. A frame is a 4-byte big-endian length and one serialized Envelope
(:mod:`openexample.framing`). Each connection is one session of the same
:class:`controller.core.ControllerCore` the gRPC shell drives, through the same
:class:`StreamHost` methods of :class:`controller.server.ControllerServer`:

- ``connection_made``: ``open_stream(self)``; this connection is the session's sender
  (``send`` = ``transport.write(frame(data))`` on the loop thread, ``close``).
- ``data_received``: every complete frame goes straight to ``on_message`` (no task hop).
  A length header above the message limit (ours, then the one negotiated in HELLO) is
  answered with a typed ``BAD_REQUEST/BAD_LEN`` ERROR, then the connection is closed.
- ``connection_lost``: ``end_stream``.

TLS: pass an :class:`ssl.SSLContext` to :func:`listen` (ALPN ``openexample/1`` is set on
it); the peer's identity is read from its verified certificate when the connection is
made. A failed handshake (no certificate, wrong CA, expired, plain text) is one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl as ssl_module
import stat
from typing import Protocol

from openexample.addresses import TCP, Address
from openexample.errors import ProtocolError
from openexample.framing import FrameDecoder, frame
from openexample.identity import Identity
from openexample.tls import ssl_peer_identity

log = logging.getLogger("openexample.controller")
ALPN = "openexample/1"
HANDSHAKE_TIMEOUT_S = 10.0
DISCARD_GRACE_S = 10.0  # a peer that does not read: how long its last bytes wait
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class StreamHost(Protocol):
    """What a connection calls on the daemon (:class:`controller.server.ControllerServer`)."""

    @property
    def accepting(self) -> bool: ...

    def open_stream(
        self, sender: NativeConnection, identity: Identity | None = None, *, peer: str = ""
    ) -> int: ...

    def on_message(self, sid: int, data: bytes) -> None: ...

    def refuse_stream(self, sid: int, err: ProtocolError, offending: bytes) -> None: ...

    def end_stream(self, sid: int, reason: str, *, errored: bool = False) -> None: ...

    def negotiated_limit(self, sid: int) -> int | None: ...


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a TCP transport (no-op for Unix sockets)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in _TCP_FAMILIES:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def with_alpn(context: ssl_module.SSLContext | None) -> ssl_module.SSLContext | None:
    if context is not None:
        context.set_alpn_protocols([ALPN])
    return context


class NativeConnection(asyncio.Protocol):
    """One agent connection: a session's framed I/O and its sender."""

    def __init__(self, host: StreamHost, max_message_bytes: int) -> None:
        self.host = host
        self.sid = 0
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(max_message_bytes)
        self._limited = False  # the decoder has the limit negotiated in HELLO

    # -- the session's sender (called by ControllerServer._dispatch) --

    def send(self, data: bytes) -> None:
        self.transport.write(frame(data))

    def backlog(self) -> int:
        return self.transport.get_write_buffer_size()

    def discard(self, last: bytes) -> None:
        """The peer does not read: nothing more is written but ``last`` (a typed ERROR);
        what it sends is read and dropped (so its writes never block on us), and the
        connection closes once the peer has read what is queued, or is aborted
        (buffer dropped) after ``DISCARD_GRACE_S``."""
        self.sid = 0
        self.transport.write(frame(last))
        self._close_when_drained(asyncio.get_running_loop().time() + DISCARD_GRACE_S)

    def _close_when_drained(self, deadline: float) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        if transport.get_write_buffer_size() == 0:
            transport.close()
        elif loop.time() >= deadline:
            transport.abort()
        else:
            loop.call_later(0.1, self._close_when_drained, deadline)

    def close(self) -> None:
        self.transport.close()  # what was written goes out first

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        set_nodelay(transport)
        if not self.host.accepting:  # draining: as gRPC answers UNAVAILABLE
            transport.close()
            return
        # With TLS the handshake is done (and the peer's certificate verified) by now.
        ssl_object = transport.get_extra_info("ssl_object")
        identity = ssl_peer_identity(ssl_object) if ssl_object is not None else None
        peer = transport.get_extra_info("peername")
        where = f"tcp:{_peer(peer)}" if isinstance(peer, tuple) else "unix"
        self.sid = self.host.open_stream(self, identity, peer=where)

    def data_received(self, data: bytes) -> None:
        sid = self.sid
        if not sid:
            return
        host = self.host
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as err:
            log.warning("session %d: %s; closing", sid, err)
            host.refuse_stream(sid, err, b"")  # no body was read: nothing to quote
            self.sid = 0
            return
        try:
            for f in frames:
                host.on_message(sid, f)
            if not self._limited and (limit := host.negotiated_limit(sid)) is not None:
                self.decoder.max_message_bytes = limit
                self._limited = True
        except Exception:  # the daemon never dies of what a peer sends
            log.exception("session %d: reader failed", sid)
            self.sid = 0
            host.end_stream(sid, "reader failed", errored=True)
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the peer finished: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        sid, self.sid = self.sid, 0
        if sid:
            self.host.end_stream(sid, f"connection lost: {exc}" if exc else "stream ended")


class _TlsConnection(asyncio.Protocol):
    """TLS done here, on memory BIOs, around a :class:`NativeConnection`.

    Why not the loop's ``ssl=``: a handshake that fails there (no or a bad certificate,
    wrong CA, expired, plain text) vanishes without a word, and uvloop's ``start_tls``
    on the server side stalls most handshakes (measured: 22 of 30). Here a failed
    handshake is one log line naming the peer and the reason.
    """

    def __init__(
        self, host: StreamHost, max_message_bytes: int, context: ssl_module.SSLContext
    ) -> None:
        self.conn = NativeConnection(host, max_message_bytes)
        self._in = ssl_module.MemoryBIO()
        self._out = ssl_module.MemoryBIO()
        self.sslobj = context.wrap_bio(self._in, self._out, server_side=True)
        self.transport: asyncio.Transport | None = None
        self._established = False
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT_S, self._refuse, "no handshake in time")

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        if not self._established:
            try:
                self.sslobj.do_handshake()
            except ssl_module.SSLWantReadError:
                self._flush()
                return
            except ssl_module.SSLError as exc:
                self._flush()  # the alert tells the client why
                self._refuse(exc.reason or str(exc))
                return
            self._established = True
            if self._timer is not None:
                self._timer.cancel()
            self._flush()
            self.conn.connection_made(_TlsTransport(self))  # type: ignore[arg-type]
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(1 << 16)
            except ssl_module.SSLWantReadError:
                break
            except ssl_module.SSLZeroReturnError:  # close_notify: the peer is done
                self.close()
                break
            except ssl_module.SSLError as exc:
                log.warning("native: TLS error from %s: %s", self._peer(), exc.reason or exc)
                self.transport.abort()
                return
            if not chunk:  # close_notify read as end of data: the peer is done
                self.close()
                break
            chunks.append(chunk)
        self._flush()
        if chunks:
            self.conn.data_received(b"".join(chunks))

    def _refuse(self, reason: str) -> None:
        log.warning("native: TLS handshake with %s refused: %s", self._peer(), reason)
        if self.transport is not None:
            self.transport.close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return _peer(peer) if peer else "a Unix socket peer"

    def _flush(self) -> None:
        out = self._out.read()
        if out and self.transport is not None:
            self.transport.write(out)

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self.sslobj.write(data)
        self._flush()

    def close(self) -> None:
        if self._closing or self.transport is None:
            return
        self._closing = True
        with contextlib.suppress(ssl_module.SSLError):
            self.sslobj.unwrap()  # close_notify
        self._flush()
        self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._established:
            self.conn.connection_lost(exc)


class _TlsTransport:
    """What :class:`NativeConnection` writes to when the connection is TLS."""

    def __init__(self, tls: _TlsConnection) -> None:
        self._tls = tls
        self.write = tls.write
        self.close = tls.close

    def abort(self) -> None:
        assert self._tls.transport is not None
        self._tls.transport.abort()

    def get_write_buffer_size(self) -> int:
        assert self._tls.transport is not None
        return self._tls.transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self._tls.transport is None or self._tls.transport.is_closing()

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "ssl_object":
            return self._tls.sslobj
        assert self._tls.transport is not None
        return self._tls.transport.get_extra_info(name, default)


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class NativeListener:
    """One listening address; :meth:`close` stops it (and removes a Unix socket file)."""

    def __init__(self, address: Address, server: asyncio.AbstractServer, inode: int = 0) -> None:
        self.address = address  # as bound: a tcp port 0 is resolved
        self.server = server
        self._inode = inode

    def close(self) -> None:
        self.server.close()
        if self._inode:
            with contextlib.suppress(OSError):
                if os.stat(self.address.path).st_ino == self._inode:
                    os.unlink(self.address.path)
            self._inode = 0


async def listen(
    host: StreamHost,
    address: Address,
    max_message_bytes: int,
    *,
    ssl: ssl_module.SSLContext | None = None,
) -> NativeListener:
    """Listen on a tcp:// or unix:// address; an OSError naming it when it cannot."""
    try:
        return await _listen(host, address, max_message_bytes, with_alpn(ssl))
    except OSError as exc:
        raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from None


async def _listen(
    host: StreamHost,
    address: Address,
    max_message_bytes: int,
    ssl: ssl_module.SSLContext | None,
) -> NativeListener:
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        if ssl is not None:
            return _TlsConnection(host, max_message_bytes, ssl)
        return NativeConnection(host, max_message_bytes)

    if address.scheme == TCP:
        server = await loop.create_server(factory, address.host, address.port, reuse_address=True)
        port = server.sockets[0].getsockname()[1]
        return NativeListener(address.with_port(port), server)
    sock = bind_unix(address.path)
    try:
        inode = os.stat(address.path).st_ino
        server = await loop.create_unix_server(factory, sock=sock)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(address.path)
        raise
    return NativeListener(address, server, inode)


def bind_unix(path: str) -> socket.socket:
    """A Unix stream socket bound at ``path`` with mode 0600, not listening yet.

    The mode is set between bind() and listen(), so nobody can connect before it holds.
    A stale socket file (nobody accepting) is replaced; a live one or any other file is
    an OSError.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError("the path exists and is no socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: left by a process that died
        else:
            raise OSError("another process listens there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
