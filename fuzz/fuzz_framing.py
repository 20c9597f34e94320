"""Fuzz the native channel's ``FrameDecoder.feed``.

Input: byte 0 picks the message limit, byte 1 how the rest is cut into chunks; the rest
is the byte stream. However the stream is cut, the decoder must give the same frames
and refuse (BAD_LEN) at the same point as when it gets the stream in one piece, and it
must agree with a naive reference decoder.

    python fuzz/fuzz_framing.py fuzz/corpus/framing -max_total_time=600
    python fuzz/fuzz_framing.py --replay fuzz/corpus/framing
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.common import main
from openexample.errors import ProtocolError
from openexample.framing import HEADER_BYTES, FrameDecoder
from openexample.v1 import openexample_pb2 as pb

TARGET = "framing"
LIMITS = (0, 1, 4, 16, 100, 1000, 65536, 2**32 - 1)


def reference(stream: bytes, limit: int) -> tuple[list[bytes], bool, int]:
    """(frames, refused, bytes left over): the obvious decoder."""
    frames, i = [], 0
    while len(stream) - i >= HEADER_BYTES:
        n = int.from_bytes(stream[i : i + HEADER_BYTES], "big")
        if n > limit:
            return frames, True, 0
        if len(stream) - i - HEADER_BYTES < n:
            break
        frames.append(stream[i + HEADER_BYTES : i + HEADER_BYTES + n])
        i += HEADER_BYTES + n
    return frames, False, len(stream) - i


def chunked(stream: bytes, pattern: int) -> list[bytes]:
    sizes = [1 + (pattern >> s & 7) * (1 + (pattern >> 6)) for s in (0, 3)]
    chunks, i, k = [], 0, 0
    while i < len(stream):
        size = sizes[k % 2] if pattern else len(stream)
        chunks.append(stream[i : i + size])
        i += size
        k += 1
    return chunks


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    limit = LIMITS[data[0] % len(LIMITS)]
    stream = data[2:]
    want, want_refused, want_left = reference(stream, limit)
    decoder = FrameDecoder(limit)
    frames: list[bytes] = []
    refused = False
    for chunk in chunked(stream, data[1]):
        try:
            frames += decoder.feed(chunk)
        except ProtocolError as err:
            if err.code != pb.BAD_REQUEST_CODE_BAD_LEN:
                raise AssertionError(f"refused with {err}") from err
            refused = True
            break
    if refused:  # a refused stream stays refused
        try:
            decoder.feed(b"\x00")
        except ProtocolError:
            pass
        else:
            raise AssertionError("a refused decoder took more bytes")
    # Frames completed before the refusal in the same chunk are dropped with it (the
    # stream is broken anyway): compare what came out as a prefix.
    if refused != want_refused or frames != want[: len(frames)]:
        raise AssertionError(f"frames {len(frames)}/{len(want)}, refused {refused}")
    if not refused and (frames != want or decoder.buffered != want_left):
        raise AssertionError(f"{len(frames)} frames, {decoder.buffered} buffered; want "
                             f"{len(want)}, {want_left}")  # fmt: skip


if __name__ == "__main__":
    main(test_one_input, TARGET)
