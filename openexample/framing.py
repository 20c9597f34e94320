"""Length-prefixed frames for the native channel, sans-I/O.

A frame is a 4-byte unsigned big-endian length followed by that many bytes: one
serialized ``Envelope``. :func:`frame` builds one; :class:`FrameDecoder` turns the
chunks a socket delivers (many frames per chunk, or one frame split over many) back
into messages. A length header above the limit is refused as soon as the header is
complete, before any of the body is buffered: ``BAD_REQUEST/BAD_LEN``, after which the
stream cannot be resynchronised (the shell sends the ERROR and closes).
"""

from __future__ import annotations

import struct

from openexample.errors import ProtocolError, bad_request
from openexample.v1 import openexample_pb2 as pb

HEADER_BYTES = 4
MAX_FRAME_BYTES = 0xFFFFFFFF  # what the header can say
_HEADER = struct.Struct(">I")
_pack = _HEADER.pack
_unpack_from = _HEADER.unpack_from


def frame(data: bytes) -> bytes:
    """``data`` with its length header (one allocation)."""
    return _pack(len(data)) + data


def oversize(n: int, limit: int) -> ProtocolError:
    return bad_request(pb.BAD_REQUEST_CODE_BAD_LEN, f"frame of {n} bytes > limit {limit}")


class FrameDecoder:
    """Chunks in, complete message bodies out.

    ``max_message_bytes`` may be lowered at any time (e.g. to the limit negotiated in
    HELLO); it applies to every header read after that. After a refused header every
    later :meth:`feed` raises the same error: the byte stream has lost its framing.
    """

    __slots__ = ("_buf", "_error", "_need", "max_message_bytes")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()  # the incomplete tail of what was fed
        self._need = HEADER_BYTES  # bytes _buf must hold before a frame can complete
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data``, in order (often none, often one)."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            src = buf
        else:
            src = data
            end = len(data)
            # Fast path: the chunk is exactly one frame (the usual request/response case).
            if end >= HEADER_BYTES:
                n = _unpack_from(data, 0)[0]
                if n + HEADER_BYTES == end and n <= self.max_message_bytes:
                    return [data[HEADER_BYTES:]]
        frames: list[bytes] = []
        pos, end = 0, len(src)
        limit = self.max_message_bytes
        with memoryview(src) as view:
            while end - pos >= HEADER_BYTES:
                n = _unpack_from(src, pos)[0]
                if n > limit:
                    self._error = oversize(n, limit)
                    break
                start = pos + HEADER_BYTES
                if end - start < n:
                    self._need = HEADER_BYTES + n
                    break
                pos = start + n
                frames.append(bytes(view[start:pos]))
            else:
                self._need = HEADER_BYTES
            if src is not buf and pos < end and self._error is None:
                buf += view[pos:]
        if self._error is not None:
            buf.clear()
            raise self._error
        if src is buf:
            del buf[:pos]  # O(1) amortised: a bytearray drops its head in place
        return frames
