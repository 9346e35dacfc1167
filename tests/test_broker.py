"""The broker layer against a real RabbitMQ: topology, confirms, dead-lettering, RPC."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from broker.messaging import consume, serve_rpc
from broker.topology import declare_topology
from schemas.codec import encode
from schemas.messages import ErrorReply, Event, Ping, Pong
from schemas.names import REASON_HEADER, Names
from schemas.reasons import QflareError, Reason
from tests.conftest import wait_for

pytestmark = pytest.mark.broker


async def drain_dead_letters(broker, n: int, timeout: float = 10.0) -> list:
    q = await broker.channel.declare_queue(broker.names.dead_letter_queue, passive=True)
    got = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(got) < n and loop.time() < end:
        m = await q.get(fail=False)
        if m is None:
            await asyncio.sleep(0.05)
            continue
        await m.ack()
        got.append(m)
    return got


async def test_topology_declaration_is_idempotent(broker):
    await declare_topology(broker.channel, broker.settings)
    await declare_topology(broker.channel, broker.settings)


@pytest.mark.parametrize("queue_attr, route", [
    ("coordinator_queue", ("rpc_exchange", Names.COORDINATOR_KEY)),
    ("updates_queue", ("updates_exchange", "update.dev1")),
    ("enclave_control_queue", ("control_exchange", Names.ENCLAVE_CONTROL_KEY)),
])
async def test_rejected_messages_are_dead_lettered_with_reason_and_consumer_survives(broker, queue_attr, route):
    names = broker.names
    seen: list[Event] = []

    async def handler(msg, raw):
        seen.append(msg)

    max_bytes = 4096
    await consume(broker.channel, broker.publisher, getattr(names, queue_attr), handler,
                  expected=Event, max_bytes=max_bytes)
    exchange, key = getattr(names, route[0]), route[1]
    bad = [
        (b"\xc1\xc1garbage", Reason.MALFORMED),
        (encode(Ping()), Reason.UNKNOWN_TYPE),  # a valid message of the wrong type
        (b"\x00" * (max_bytes + 1), Reason.OVERSIZE),
        (msgpack.packb({"v": 99, "t": "event", "b": {}}), Reason.UNKNOWN_VERSION),
    ]
    for body, _ in bad:
        await broker.publisher.publish(exchange, key, body)
    good = Event(type="ok", at=1.0)
    await broker.publisher.publish(exchange, key, good)

    await wait_for(lambda: len(seen) == 1)
    assert seen == [good]
    dead = await drain_dead_letters(broker, len(bad))
    reasons = sorted(m.headers[REASON_HEADER] for m in dead)
    assert reasons == sorted(r.value for _, r in bad)
    assert {m.headers["x-qflare-queue"] for m in dead} == {getattr(names, queue_attr)}


async def test_handler_errors_dead_letter_and_do_not_stop_the_consumer(broker):
    calls = []

    async def handler(msg, raw):
        calls.append(msg.type)
        if msg.type == "boom":
            raise RuntimeError("bug")
        if msg.type == "refuse":
            raise QflareError(Reason.REPLAY, "seen before")

    await consume(broker.channel, broker.publisher, broker.names.updates_queue, handler,
                  expected=Event, max_bytes=1 << 20)
    for t in ("boom", "refuse", "fine"):
        await broker.publisher.publish(broker.names.updates_exchange, "update.x", Event(type=t, at=0.0))
    await wait_for(lambda: len(calls) == 3)
    dead = await drain_dead_letters(broker, 2)
    assert sorted(m.headers[REASON_HEADER] for m in dead) == ["internal", "replay"]


async def test_rpc_round_trip_and_typed_errors(broker):
    async def handler(msg, caller):
        assert caller == "guest"  # the broker-verified user_id of the request
        if msg.nonce == b"bad":
            raise QflareError(Reason.RATE_LIMITED, "slow down")
        return Pong(nonce=msg.nonce, service="test", version="1")

    await serve_rpc(broker.channel, broker.publisher, broker.names.coordinator_queue, handler,
                    expected=(Ping,), max_bytes=1 << 20)
    rpc = await broker.rpc()
    pong = await rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, Ping(nonce=b"n1"), Pong, 5)
    assert pong.nonce == b"n1"
    with pytest.raises(QflareError) as exc:
        await rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, Ping(nonce=b"bad"), Pong, 5)
    assert exc.value.reason == Reason.RATE_LIMITED
    # a request of the wrong type gets a typed error reply, not silence
    with pytest.raises(QflareError) as exc:
        await rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, ErrorReply(reason="x"), Pong, 5)
    assert exc.value.reason == Reason.UNKNOWN_TYPE


async def test_rpc_times_out_with_a_reason(broker):
    rpc = await broker.rpc()
    with pytest.raises(QflareError) as exc:
        await rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, Ping(), Pong, 0.3)
    assert exc.value.reason == Reason.TIMEOUT


async def test_bodies_of_every_frame_layout_arrive_whole(broker):
    """Bodies put together by broker/framing.py: empty, one frame, exactly a frame, a frame
    and a byte, and a 4 MB body of many frames all arrive byte for byte, in order."""
    import os

    from aiormq.channel import Channel

    from broker import framing

    assert getattr(Channel, "_read_content") is framing._read_content  # installed by connect()
    # and every connection's stream reader buffers more than a frame before it pauses the socket
    from aiormq.connection import FrameReceiver

    assert FrameReceiver(asyncio.StreamReader()).reader._limit == framing.READ_LIMIT > 2 * 131072
    frame = broker.connection.transport.connection.connection_tune.frame_max - 8  # content bytes a frame
    bodies = [b"", b"x", os.urandom(frame), os.urandom(frame + 1), os.urandom(4_000_000 + 7)]
    ch = await broker.connection.channel()
    q = await ch.declare_queue(exclusive=True, auto_delete=True)
    got: list[bytes] = []

    async def on(message) -> None:
        got.append(message.body)

    await q.consume(on, no_ack=True)
    for body in bodies:
        await broker.publisher.publish("", q.name, body)
    await wait_for(lambda: len(got) == len(bodies), 20)
    assert got == bodies
    await ch.close()
