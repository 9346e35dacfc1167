"""Chunk format rules the device, the enclave and the model readers follow (pure).

An update whose encoded delta exceeds ``chunking.chunk_bytes`` travels as ``UpdateChunk``
messages sealed with :mod:`pqc.stream` (one KEM encapsulation per update). What binds them:

- every chunk key is derived with the update's associated data (label ‖ header) as info,
  and every chunk's AEAD associated data is :func:`chunk_aad` (header digest, update id,
  index, count), so a chunk opens only in its own place of its own update;
- the device signs header ‖ :class:`ChunkDigest` (a running SHA-256 over the encapsulation
  and each chunk's length and AEAD tag): one signature per update, verified once the last
  chunk is in, without the enclave keeping (or hashing) any ciphertext. Only the device and
  the enclave hold the chunk keys, so a chunk's tag binds its bytes (pqc.seal.binding).

A global model too large for one message is a signed ``GlobalModel`` listing the SHA-256 of
each ``ModelChunk`` that follows it; the one signature covers every chunk through those digests.
"""

from __future__ import annotations

import hashlib
import math
import struct

from common.updates import update_aad
from pqc.seal import TAG_SIZE

CHUNK_AAD_LABEL = b"qflare/v1/update-chunk\0"
DIGEST_LABEL = b"qflare/v1/update-chunks-digest\0"
#: Room left in a message beside a chunk's payload: header (with the grant), encapsulation,
#: signature and the envelope all fit in well under this.
MESSAGE_OVERHEAD = 64 * 1024


def header_digest(header_bytes: bytes) -> bytes:
    return hashlib.sha256(header_bytes).digest()


def stream_info(header_bytes: bytes) -> bytes:
    """The info every chunk key of the update is derived with: the update's associated data."""
    return update_aad(header_bytes)


def chunk_aad(header_sha: bytes, update_id: str, index: int, count: int) -> bytes:
    """Associated data of chunk ``index`` of ``count``: which update, which place, how many."""
    uid = update_id.encode("utf-8")
    return CHUNK_AAD_LABEL + header_sha + struct.pack(">H", len(uid)) + uid + struct.pack(">II", index, count)


class ChunkDigest:
    """Running SHA-256 over the encapsulation, then each chunk's length and tag, in order."""

    def __init__(self, enc: bytes) -> None:
        self._h = hashlib.sha256(DIGEST_LABEL)
        self._part(enc)

    def _part(self, data: bytes | memoryview) -> None:
        self._h.update(struct.pack(">Q", memoryview(data).nbytes))
        self._h.update(data)

    def add(self, ciphertext: bytes | memoryview) -> None:
        view = memoryview(ciphertext).cast("B")
        self._h.update(struct.pack(">Q", view.nbytes))
        self._h.update(view[max(0, view.nbytes - TAG_SIZE):])

    def digest(self) -> bytes:
        return self._h.digest()


def chunked_signed_parts(header_bytes: bytes, digest: bytes) -> list[bytes]:
    """What the device signs for a chunked update: the header and :class:`ChunkDigest`."""
    return [header_bytes, digest]


def max_update_chunks(n_params: int, chunk_bytes: int) -> int:
    """Most chunks any encoding of ``n_params`` takes (float32 is the largest)."""
    return max(1, math.ceil(4 * n_params / (chunk_bytes - chunk_bytes % 4)))


def split(data: bytes | memoryview, chunk_bytes: int) -> list[memoryview]:
    """``data`` in slices of at most ``chunk_bytes`` (views, no copies)."""
    view = memoryview(data).cast("B")
    return [view[i:i + chunk_bytes] for i in range(0, max(view.nbytes, 1), chunk_bytes)]


def chunk_sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()
