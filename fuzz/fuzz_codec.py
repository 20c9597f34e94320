"""Fuzz the envelope codec: ``decode_envelope``, ``peek_xid``, and for what decodes, the
tensors in it (``tensor.decode``) and the FEATURES_REPLY / PKG_IN checks.

Input: one message as a peer would send it. Only typed refusals (ProtocolError) may
come out; ``peek_xid`` never raises and agrees with the parser on what parses (the
last of repeated xid fields, none inside a group).

    python fuzz/fuzz_codec.py fuzz/corpus/codec -max_total_time=600
    python fuzz/fuzz_codec.py --replay fuzz/corpus/codec
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.common import descriptor, main
from openexample import messages, tensor
from openexample.errors import ProtocolError
from openexample.limits import Limits
from openexample.validate import validate_features, validate_pkg_in

TARGET = "codec"
SMALL = Limits(max_message_bytes=4096, max_batch_items=8, max_tensor_elements=1000)
MODELS = {"m": descriptor()}


def test_one_input(data: bytes) -> None:
    xid = messages.peek_xid(data)
    if not 0 <= xid <= messages.XID_MAX:
        raise AssertionError(f"peek_xid gave {xid}")
    for limits in (Limits(), SMALL):
        try:
            env = messages.decode_envelope(data, limits)
        except ProtocolError:
            continue
        if env.WhichOneof("body") is None:
            raise AssertionError("decode_envelope returned an envelope without a body")
        # (Up to 4096 top-level fields, peek_xid's bound: at least 8 KiB of them.)
        if len(data) < 8192 and messages.peek_xid(data) != env.xid:
            raise AssertionError(f"peek_xid {messages.peek_xid(data)} != parsed {env.xid}")
        _deep(env, limits)


def _deep(env: object, limits: Limits) -> None:
    kind = env.WhichOneof("body")
    if kind == "pkg_in":
        pkg = env.pkg_in
        tensors = [pkg.inputs, pkg.logits, *(a.tensor for a in pkg.activations)]
        for t in tensors:
            for finite in (True, False):
                try:
                    arr = tensor.decode(
                        t, max_elements=limits.max_tensor_elements, check_finite=finite
                    )
                except ProtocolError:
                    continue
                if arr.size != _elements(t.shape) or arr.flags.writeable:
                    raise AssertionError(f"decoded {arr.shape} from {list(t.shape)}")
        with contextlib.suppress(ProtocolError):
            validate_pkg_in(pkg, MODELS, limits)
    elif kind == "features_reply":
        with contextlib.suppress(ProtocolError):
            validate_features(env.features_reply, limits)


def _elements(shape: object) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main(test_one_input, TARGET)
