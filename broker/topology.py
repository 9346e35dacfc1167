"""Declaring the whole topology, idempotently (docs/architecture.md, Broker topology).

Every queue dead-letters into one fanout exchange; the updates and control queues are
quorum queues with a delivery limit, so a poison message cannot loop forever. On a cluster
every quorum queue and stream is replicated: on ``broker.replicas`` nodes (capped by the broker
at the node count), or on every node when that is unset (docs/scaling.md).
"""

from __future__ import annotations

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel

from common.settings import Settings
from schemas.names import Names

#: Bytes of global-model history the models stream keeps for returning devices.
MODELS_STREAM_MAX_BYTES = 2 * 1024 * 1024 * 1024


def replicated(settings: Settings, queue_type: str) -> dict[str, object]:
    """A quorum queue's or stream's arguments for ``broker.replicas`` (none: the broker's default)."""
    n = settings.broker.replicas
    if n is None:
        return {"x-queue-type": queue_type}
    size = "x-quorum-initial-group-size" if queue_type == "quorum" else "x-initial-cluster-size"
    return {"x-queue-type": queue_type, size: n}


def _dead_lettered(names: Names) -> dict[str, object]:
    return {"x-dead-letter-exchange": names.dlx}


def dead_letter_arguments(settings: Settings) -> dict[str, object]:
    """The dead-letter queue is bounded in bytes (oldest dropped) and in age.

    Quorum queue arguments cannot change: a broker holding the queue with other arguments
    refuses the declaration (PRECONDITION_FAILED; docs/operations.md says how to upgrade).
    """
    b = settings.broker
    return {**replicated(settings, "quorum"), "x-max-length-bytes": b.dead_letter_max_bytes, "x-overflow": "drop-head",
            "x-message-ttl": int(b.dead_letter_ttl_seconds * 1000)}


async def declare_topology(channel: AbstractChannel, settings: Settings) -> Names:
    """Declare exchanges, queues and bindings; safe to call from every process at start."""
    names = Names(settings.broker.namespace)
    limit = settings.broker.delivery_limit
    ex = {}
    for name, kind in (
        (names.rpc_exchange, ExchangeType.DIRECT),
        (names.updates_exchange, ExchangeType.TOPIC),
        (names.models_exchange, ExchangeType.FANOUT),
        (names.events_exchange, ExchangeType.TOPIC),
        (names.dlx, ExchangeType.FANOUT),
        (names.control_exchange, ExchangeType.DIRECT),
        (names.operator_exchange, ExchangeType.DIRECT),
    ):
        ex[name] = await channel.declare_exchange(name, kind, durable=True)

    dlq = await channel.declare_queue(names.dead_letter_queue, durable=True,
                                      arguments=dead_letter_arguments(settings))
    await dlq.bind(ex[names.dlx])

    quorum = {**replicated(settings, "quorum"), "x-delivery-limit": limit, **_dead_lettered(names)}
    coord = await channel.declare_queue(names.coordinator_queue, durable=True, arguments=quorum)
    await coord.bind(ex[names.rpc_exchange], Names.COORDINATOR_KEY)
    # signed operator requests: their own exchange, which device users have no write permission on
    operator = await channel.declare_queue(names.operator_queue, durable=True, arguments=quorum)
    await operator.bind(ex[names.operator_exchange], Names.OPERATOR_KEY)
    updates = await channel.declare_queue(names.updates_queue, durable=True, arguments=quorum)
    await updates.bind(ex[names.updates_exchange], "update.#")  # device ids may contain dots
    control = await channel.declare_queue(names.enclave_control_queue, durable=True, arguments=quorum)
    await control.bind(ex[names.control_exchange], Names.ENCLAVE_CONTROL_KEY)
    stream = await channel.declare_queue(
        names.models_stream, durable=True,
        arguments={**replicated(settings, "stream"), "x-max-length-bytes": MODELS_STREAM_MAX_BYTES},
    )
    await stream.bind(ex[names.models_exchange])
    events = await channel.declare_queue(
        names.events_stream, durable=True,
        arguments={**replicated(settings, "stream"), "x-max-length-bytes": settings.events.stream_max_bytes})
    await events.bind(ex[names.events_exchange], "#")
    return names


async def declare_shard_queues(channel: AbstractChannel, settings: Settings, shard: int) -> None:
    """A sharded enclave's own queues (docs/scaling.md, "Sharded enclaves"). Shard 0 keeps the
    single enclave's updates and control queues, its updates queue also bound to shard 0's
    keys, and adds the partials queue it combines; shard i > 0 gets its own devices' updates
    (``shard.<i>.#`` only, no copies) and a copy of every control message and global model.
    Every shard has a peers queue: the other shards' admissions (``PeerAdmission``).

    :func:`declare_topology` (every process, any ``enclave.shards``) binds only ``update.#``,
    which no sharded key matches, so it never adds other shards' updates to a shard's queue."""
    names = Names(settings.broker.namespace)
    quorum = {**replicated(settings, "quorum"), "x-delivery-limit": settings.broker.delivery_limit,
              **_dead_lettered(names)}
    peers = await channel.declare_queue(names.shard_queue(shard, "peers"), durable=True, arguments=quorum)
    await peers.bind(names.rpc_exchange, Names.PEERS_KEY)
    if shard == 0:
        partials = await channel.declare_queue(names.partials_queue, durable=True, arguments=quorum)
        await partials.bind(names.rpc_exchange, Names.PARTIALS_KEY)
        updates = await channel.declare_queue(names.updates_queue, durable=True, arguments=quorum)
        await updates.bind(names.updates_exchange, Names.shard_updates_binding(0))
        return
    for what, exchange, key in (("updates", names.updates_exchange, Names.shard_updates_binding(shard)),
                                ("control", names.control_exchange, Names.ENCLAVE_CONTROL_KEY),
                                ("models", names.models_exchange, "")):
        q = await channel.declare_queue(names.shard_queue(shard, what), durable=True, arguments=quorum)
        await q.bind(exchange, key)


async def delete_topology(channel: AbstractChannel, names: Names) -> None:
    """Remove everything :func:`declare_topology` made (tests, ``qflare broker reset``)."""
    for q in (names.coordinator_queue, names.operator_queue, names.updates_queue, names.enclave_control_queue,
              names.models_stream, names.events_stream, names.dead_letter_queue):
        await channel.queue_delete(q)
    await delete_shard_queues(channel, names)
    for e in (names.rpc_exchange, names.updates_exchange, names.models_exchange,
              names.events_exchange, names.dlx, names.control_exchange, names.operator_exchange):
        await channel.exchange_delete(e)


async def delete_shard_queues(channel: AbstractChannel, names: Names, shards: int = 8) -> None:
    """Remove a sharded enclave's queues (shards below ``shards``), if any were made."""
    await channel.queue_delete(names.partials_queue)
    for shard in range(shards):
        for what in ("updates", "control", "models", "peers"):
            await channel.queue_delete(names.shard_queue(shard, what))
