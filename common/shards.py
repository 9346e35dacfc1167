"""Which enclave shard owns a device (docs/scaling.md, "Sharded enclaves").

A pure function of the device id, so the broker's routing, the shard's own check and the
tests all agree, and a device cannot choose its shard: its id is pinned by its broker user.
"""

from __future__ import annotations

import hashlib

from schemas.messages import MAX_SHARDS
from schemas.names import Names

__all__ = ["MAX_SHARDS", "partial_aad", "shard_of", "update_key"]


def shard_of(device_id: str, shards: int) -> int:
    """The shard (0 .. ``shards`` - 1) of ``device_id``: SHA-256 of its UTF-8 bytes, mod ``shards``.

    Stable across processes, hosts and Python versions (no ``hash()`` salt); close to uniform.
    """
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") % shards


def update_key(device_id: str, shards: int) -> str:
    """The routing key ``device_id`` publishes its updates under: today's ``update.<id>`` with
    one enclave, else ``shard.<shard_of>.<id>``, which reaches only its shard's queue. The
    broker pins the id part to the device's user; the shard checks the signed id is its own."""
    return Names.update_key(device_id) if shards == 1 else Names.update_key(device_id, shard_of(device_id, shards))


def partial_aad(namespace: str, round_id: int, shard: int, base_version: int) -> bytes:
    """The associated data a shard's partial is sealed under: it cannot be moved to another
    namespace, round, shard or base model without failing to open."""
    return f"qflare/shard-partial/v1|{namespace}|{round_id}|{shard}|{base_version}".encode()
