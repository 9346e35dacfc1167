"""Per-device broker users: a device can do its job and nothing else (real RabbitMQ)."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest

from broker.client import BrokerClient
from broker.users import BrokerAdminError, ManagementApi, create_device_user, delete_device_user
from edge_agent import client
from schemas.codec import encode
from schemas.messages import Event
from schemas.names import Names
from tests.services import EventLog, coordinator, enclave
from tests.test_rounds import honest_update, open_round

pytestmark = pytest.mark.broker


def as_user(url: str, user: str, password: str) -> str:
    u = urlsplit(url)
    return urlunsplit((u.scheme, f"{user}:{password}@{u.hostname}:{u.port or 5672}", u.path, "", ""))


@pytest.fixture
def device_user(settings, broker):
    api = ManagementApi.from_amqp_url(settings.amqp_url)
    try:
        api.request("GET", "/api/overview")
    except BrokerAdminError as exc:
        pytest.fail(f"{exc}")
    name = f"dev-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    user = create_device_user(api, broker.names, name, password)
    assert user == f"qflare-device-{name}"
    try:
        yield name, settings.model_copy(update={"amqp_url": as_user(settings.amqp_url, user, password)})
    finally:
        delete_device_user(api, name)


async def ignore(message) -> None:
    pass


async def refused(coro) -> bool:
    """True when the broker refused the operation with ACCESS_REFUSED."""
    try:
        await coro
    except aiormq.exceptions.ChannelAccessRefused:
        return True
    return False


async def test_a_device_user_enrolls_trains_and_sends_its_update(broker, settings, device_user):
    name, dev_settings = device_user
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.accepted")
        dev_broker = await BrokerClient.open(dev_settings, name=name, declare=False, client_id=name)
        try:
            rpc = await dev_broker.rpc()
            token = coord.registry.create_token(name, 600)
            dev = await client.enroll(rpc, dev_broker.names, name, token, coord.identity.sig_fp,
                                      sig_alg="ML-DSA-44", kem_alg="ML-KEM-768")
            await client.open_session(rpc, dev_broker.names, dev)
            from edge_agent.fleet import latest_model_body

            await open_round(coord, broker, 1, [name])
            _, key, body = honest_update(dev, enc, 1)
            await dev_broker.publisher.publish(dev_broker.names.updates_exchange, key, body)
            await events.wait("update.accepted")
            assert await latest_model_body(dev_broker) is not None  # may read the models stream
        finally:
            await dev_broker.close()


async def test_a_device_user_cannot_publish_for_another_device_or_to_control(settings, device_user, broker):
    name, dev_settings = device_user
    names = broker.names
    conn = await aio_pika.connect(dev_settings.amqp_url)
    try:
        async def publish(exchange: str, key: str) -> None:
            ch = await conn.channel(publisher_confirms=True)
            ex = await ch.get_exchange(exchange, ensure=False)
            await ex.publish(aio_pika.Message(encode(Event(type="x", at=0.0))), key)

        ch = await conn.channel(publisher_confirms=True)
        own = await ch.get_exchange(names.updates_exchange, ensure=False)
        await own.publish(aio_pika.Message(b"own key is allowed"), Names.update_key(name))
        assert await refused(publish(names.updates_exchange, Names.update_key("someone-else")))
        assert await refused(publish(names.control_exchange, Names.ENCLAVE_CONTROL_KEY))
        assert await refused(publish(names.events_exchange, "round.completed"))
        assert await refused(publish(names.dlx, "x"))
        assert await refused(publish(names.operator_exchange, Names.OPERATOR_KEY))  # no operator requests

        async def consume(queue: str) -> None:
            ch = await conn.channel()
            q = await ch.declare_queue(queue, passive=True)
            await q.consume(ignore)

        for queue in (names.updates_queue, names.coordinator_queue, names.enclave_control_queue,
                      names.dead_letter_queue, names.operator_queue):
            assert await refused(consume(queue)), queue
    finally:
        await conn.close()
