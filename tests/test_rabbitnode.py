"""The private-node helper that fault and TLS tests stand on: its own node, stopped for real,
started again on the same data, removed afterwards, and the shared node never touched."""

from __future__ import annotations

import socket

import aio_pika
import pytest

pytestmark = pytest.mark.broker


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def test_a_private_node_stops_fully_and_restarts_on_its_own_data(rabbit_node, amqp_url):
    node = rabbit_node()
    assert node.amqp_port != 5672 and node.name.endswith("@localhost")
    conn = await aio_pika.connect(node.url)
    ch = await conn.channel()
    q = await ch.declare_queue("survivor", durable=True, arguments={"x-queue-type": "quorum"})
    await ch.default_exchange.publish(aio_pika.Message(b"kept", delivery_mode=2), "survivor")
    await conn.close()

    node.stop()
    assert not node.running and not listening(node.amqp_port)
    assert listening(5672), "the shared node must keep running"

    node.start()
    conn = await aio_pika.connect(node.url)
    ch = await conn.channel()
    q = await ch.declare_queue("survivor", durable=True, passive=True)
    msg = await q.get(timeout=10)
    assert msg.body == b"kept"
    await conn.close()

    base = node.base
    node.cleanup()
    assert not base.exists() and not node.running
