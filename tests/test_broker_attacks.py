"""Attacks on the broker-facing surface, each named for what it tried (real RabbitMQ).

A device that can publish to the RPC exchange chooses the request's properties itself:
its ``reply_to`` must not make a service write where the device chooses.
"""

from __future__ import annotations

import asyncio
import secrets

import aio_pika
import pytest

from broker.client import BrokerClient
from broker.topology import delete_topology
from schemas.codec import encode
from schemas.messages import Event, Ping
from schemas.names import REASON_HEADER, Names
from schemas.reasons import Reason
from tests.services import coordinator

pytestmark = pytest.mark.broker


async def next_dead_letter(broker: BrokerClient, timeout: float = 20.0) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message in the namespace's dead-letter queue (waits for it)."""
    ch = await broker.connection.channel()
    q = await ch.declare_queue(broker.names.dead_letter_queue, passive=True)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (m := await q.get(fail=False, no_ack=True)) is None:
        if loop.time() > end:
            raise AssertionError("nothing was dead-lettered")
        await asyncio.sleep(0.05)
    return m


async def first_in_stream(broker: BrokerClient, stream: str) -> bytes:
    """The first body in ``stream``: after a marker is published, proves what came before it."""
    ch = await broker.connection.channel()
    await ch.set_qos(prefetch_count=1)
    q = await ch.declare_queue(stream, passive=True)
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on(message) -> None:
        if not got.done():
            got.set_result(bytes(message.body))
        await message.ack()

    await q.consume(on, arguments={"x-stream-offset": "first"})
    try:
        return await asyncio.wait_for(got, 20)
    finally:
        await ch.close()


async def send_ping(broker: BrokerClient, nonce: bytes, reply_to: str) -> None:
    """A ping as an attacker builds it: any reply_to it likes."""
    ex = await broker.channel.get_exchange(broker.names.rpc_exchange, ensure=False)
    await ex.publish(aio_pika.Message(encode(Ping(nonce=nonce)) if len(nonce) <= 64 else _raw_ping(nonce),
                                      reply_to=reply_to, correlation_id="x"), Names.COORDINATOR_KEY)


def _raw_ping(nonce: bytes) -> bytes:
    import msgpack

    from schemas.codec import WIRE_VERSION

    return msgpack.packb({"v": WIRE_VERSION, "t": Ping.TYPE, "b": {"nonce": nonce}}, use_bin_type=True)


async def mark(broker: BrokerClient, stream: str) -> bytes:
    marker = encode(Event(type="marker", at=0.0, detail={"id": secrets.token_hex(8)}))
    await broker.publisher.publish("", stream, marker)
    return marker


async def test_a_device_cannot_make_the_coordinator_write_a_megabyte_pong_into_the_models_stream(broker, settings):
    async with coordinator(settings):
        await send_ping(broker, b"\x00" * (1024 * 1024), broker.names.models_stream)
        refused = await next_dead_letter(broker)
        assert refused.headers[REASON_HEADER] == Reason.INVALID_FIELD
        marker = await mark(broker, broker.names.models_stream)
        assert await first_in_stream(broker, broker.names.models_stream) == marker


async def test_a_device_cannot_make_the_coordinator_write_into_another_namespaces_stream(broker, settings):
    other_settings = settings.model_copy(update={"broker": settings.broker.model_copy(
        update={"namespace": settings.broker.namespace + "x"})})
    other = await BrokerClient.open(other_settings, name="pytest-other")
    try:
        async with coordinator(settings):
            await send_ping(broker, b"ping", other.names.models_stream)
            refused = await next_dead_letter(broker)
            assert refused.headers[REASON_HEADER] == Reason.INVALID_FIELD
            assert b"reply_to" in refused.headers["x-qflare-detail"].encode()
            marker = await mark(other, other.names.models_stream)
            assert await first_in_stream(other, other.names.models_stream) == marker
    finally:
        ch = await other.connection.channel()
        await delete_topology(ch, other.names)
        await other.close()


async def test_rpc_replies_come_back_over_direct_reply_to(broker, settings):
    async with coordinator(settings):
        rpc = await broker.rpc()
        from schemas.messages import Pong

        pong = await rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, Ping(nonce=b"n" * 64), Pong, 10)
        assert pong.nonce == b"n" * 64


async def test_a_megabyte_of_junk_costs_the_dead_letter_queue_a_few_kilobytes(broker, settings):
    """The dead-letter queue was unbounded and kept whole bodies (16 MiB of disk per junk message)."""
    from broker.users import ManagementApi
    from schemas.names import BODY_BYTES_HEADER, DETAIL_HEADER

    async with coordinator(settings):
        ex = await broker.channel.get_exchange(broker.names.rpc_exchange, ensure=False)
        await ex.publish(aio_pika.Message(b"\xc1" * (1024 * 1024), headers={"x-mine": "kept"}),
                         Names.COORDINATOR_KEY)
        m = await next_dead_letter(broker)
    assert len(m.body) == settings.broker.dead_letter_body_bytes
    assert m.headers[BODY_BYTES_HEADER] == 1024 * 1024
    assert m.headers[REASON_HEADER] == Reason.MALFORMED and m.headers[DETAIL_HEADER]
    assert m.headers["x-mine"] == "kept"
    info = ManagementApi.from_settings(settings).request("GET", f"/api/queues/%2F/{broker.names.dead_letter_queue}")
    args = info["arguments"]
    assert args["x-max-length-bytes"] == settings.broker.dead_letter_max_bytes
    assert args["x-overflow"] == "drop-head"
    assert args["x-message-ttl"] == int(settings.broker.dead_letter_ttl_seconds * 1000)
