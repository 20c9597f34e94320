"""Explicit protocol limits and their negotiation.

Each side announces in HELLO what it accepts; 0 in a field means the default
below. Both sides then enforce the smaller of the two values.
"""

from __future__ import annotations

from dataclasses import dataclass

from openexample.v1 import openexample_pb2 as pb

DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_BATCH_ITEMS = 1024
DEFAULT_MAX_TENSOR_ELEMENTS = 4 * 1024 * 1024
# Not negotiated: structural bounds no sane peer needs to exceed.
MAX_TENSOR_DIMS = 8
MAX_ID_BYTES = 256
FINGERPRINT_BYTES = 16
MAX_PRIORITY = 0xFFFF


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS

    def to_pb(self) -> pb.Limits:
        return pb.Limits(
            max_message_bytes=self.max_message_bytes,
            max_batch_items=self.max_batch_items,
            max_tensor_elements=self.max_tensor_elements,
        )

    def merge(self, peer: pb.Limits) -> Limits:
        """The limits in force once ``peer`` has announced its own (min of each)."""

        def lower(mine: int, theirs: int) -> int:
            return min(mine, theirs) if theirs > 0 else mine

        return Limits(
            max_message_bytes=lower(self.max_message_bytes, peer.max_message_bytes),
            max_batch_items=lower(self.max_batch_items, peer.max_batch_items),
            max_tensor_elements=lower(self.max_tensor_elements, peer.max_tensor_elements),
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC channel/server options so the transport admits what the protocol does."""
        # Headroom over the protocol limit so an oversize message reaches the protocol
        # layer and gets a typed ERROR (BAD_LEN, with its xid) instead of the transport's
        # RESOURCE_EXHAUSTED: up to 4x the limit. Beyond, gRPC refuses it itself (it
        # would have to buffer the whole message first; only authenticated peers get
        # this far).
        size = min(4 * self.max_message_bytes, 2**31 - 1)
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ]


DEFAULT_LIMITS = Limits()
