"""`ChunkError`: why a received chunk is refused (its `ChunkErrorKind`); the transfer it
belongs to fails."""

from __future__ import annotations

import enum


class ChunkErrorKind(enum.Enum):
    BAD_LAYOUT = "bad_layout"  # dtype or layout differs from the reservation's
    BAD_RANGE = "bad_range"  # layer or block range outside what was reserved
    BAD_SIZE = "bad_size"  # data length differs from num_blocks * layer_block_bytes
    BAD_CHECKSUM = "bad_checksum"
    BAD_MESSAGE = "bad_message"  # the bytes do not parse as a KVChunk
    UNKNOWN_RESERVATION = "unknown_reservation"  # no such request, wrong epoch, or expired


class ChunkError(Exception):
    """A chunk that must be rejected; the transfer it belongs to fails."""

    def __init__(self, kind: ChunkErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
