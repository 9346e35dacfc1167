"""Which enclave shard owns a device (docs/scaling.md, "Sharded enclaves").

A pure function of the device id, so the broker's routing, the shard's own check and the
tests all agree, and a device cannot choose its shard: its id is pinned by its broker user.
"""

from __future__ import annotations

import hashlib

from schemas.messages import MAX_SHARDS

__all__ = ["MAX_SHARDS", "partial_aad", "shard_of"]


def shard_of(device_id: str, shards: int) -> int:
    """The shard (0 .. ``shards`` - 1) of ``device_id``: SHA-256 of its UTF-8 bytes, mod ``shards``.

    Stable across processes, hosts and Python versions (no ``hash()`` salt); close to uniform.
    """
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") % shards


def partial_aad(namespace: str, round_id: int, shard: int, base_version: int) -> bytes:
    """The associated data a shard's partial is sealed under: it cannot be moved to another
    namespace, round, shard or base model without failing to open."""
    return f"qflare/shard-partial/v1|{namespace}|{round_id}|{shard}|{base_version}".encode()
