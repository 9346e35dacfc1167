"""Several broker URLs (one cluster's nodes): how they are given, what the topology asks the
broker for, and a client skipping a node that does not answer. The three-node cluster itself
is in tests/test_cluster.py."""

from __future__ import annotations

import pytest

from broker.topology import dead_letter_arguments, replicated
from common.settings import ConfigError, load_settings
from tests.rabbitnode import free_port

A, B, C = "amqp://u:p@a:5672/", "amqp://u:p@b:5672/", "amqp://u:p@c:5672/"


def test_a_comma_list_in_the_url_is_the_first_url_and_its_failover_urls(monkeypatch):
    monkeypatch.setenv("QFLARE_AMQP_URL", f"{A}, {B},{C}")
    s = load_settings()
    assert s.amqp_url == A and s.broker.failover_urls == [B, C] and s.amqp_urls == [A, B, C]
    monkeypatch.delenv("QFLARE_AMQP_URL")
    s = load_settings(amqp_url=A, broker={"failover_urls": [B, A]})
    assert s.amqp_urls == [A, B]  # amqp_url first, never twice
    assert load_settings(amqp_url=A).amqp_urls == [A]


def test_the_cluster_urls_are_given_once_and_in_one_scheme():
    with pytest.raises(ConfigError, match="give the cluster's URLs once"):
        load_settings(amqp_url=f"{A},{B}", broker={"failover_urls": [C]})
    with pytest.raises(ConfigError) as err:
        load_settings(amqp_url=f"{A},amqps://u:secret@b:5671/")
    assert str(err.value) == "settings: every broker URL must use amqp:// like amqp_url (got 'amqps://b:5671/')"
    assert "secret" not in str(err.value)
    with pytest.raises(ConfigError, match=r"broker.failover_urls.0: String should match"):
        load_settings(broker={"failover_urls": ["http://b/"]})


def test_replicas_sets_the_initial_members_of_quorum_queues_and_streams():
    unset = load_settings()
    assert replicated(unset, "quorum") == {"x-queue-type": "quorum"}  # the broker's default: every node
    assert replicated(unset, "stream") == {"x-queue-type": "stream"}
    three = load_settings(broker={"replicas": 3})
    assert replicated(three, "quorum") == {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
    assert replicated(three, "stream") == {"x-queue-type": "stream", "x-initial-cluster-size": 3}
    assert dead_letter_arguments(three)["x-quorum-initial-group-size"] == 3
    with pytest.raises(ConfigError, match="broker.replicas"):
        load_settings(broker={"replicas": 0})


@pytest.mark.broker
async def test_a_client_given_a_dead_node_first_connects_to_the_next(amqp_url):
    from broker.connection import FailoverConnection, connect

    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # nothing listens there
    s = load_settings(amqp_url=f"{dead},{amqp_url}")
    robust = await connect(s, name="failover-robust")
    try:
        assert isinstance(robust, FailoverConnection) and robust.at == 1 and not robust.is_closed
    finally:
        await robust.close()
    plain = await connect(s, name="failover-plain", robust=False)
    await plain.close()
    assert str(plain.url).rstrip("/") == amqp_url.rstrip("/")


@pytest.mark.broker
async def test_no_node_answering_names_every_url():
    from broker.connection import BrokerUnavailable, connect

    urls = [f"amqp://guest:guest@127.0.0.1:{free_port()}/" for _ in range(2)]
    s = load_settings(amqp_url=",".join(urls))
    for robust in (True, False):
        with pytest.raises(BrokerUnavailable) as err:
            await connect(s, robust=robust, timeout=2)
        assert all(u.replace("guest:guest", "guest:***") in str(err.value) for u in urls), str(err.value)


def test_provisioned_users_get_every_node_in_their_url():
    from broker.users import cluster_url_for

    s = load_settings(amqp_url="amqps://admin:pw@rabbit1:5671/qflare,amqps://admin:pw@rabbit2:5671/qflare")
    assert cluster_url_for(s, "qflare.p.device.D", "s3,cret") == (
        "amqps://qflare.p.device.D:s3%2Ccret@rabbit1:5671/qflare,amqps://qflare.p.device.D:s3%2Ccret@rabbit2:5671/qflare")
    one = load_settings(amqp_url="amqp://admin:pw@rabbit1:5672/")
    assert cluster_url_for(one, "u", "p") == "amqp://u:p@rabbit1:5672/"


@pytest.mark.broker
async def test_a_nacked_must_not_lose_publish_moves_to_a_new_channel_and_is_confirmed(broker):
    import asyncio

    from tests.conftest import wait_for

    # a queue that nacks while full: the broker's refusal, as during a leader election
    name = f"{broker.names.namespace}.nacking"
    q = await broker.channel.declare_queue(name, durable=True, arguments={
        "x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"})
    try:
        await broker.publisher.publish("", name, b"fills it")
        main = broker.publisher.channel
        sent = asyncio.create_task(broker.publisher.publish_until_confirmed("", name, b"must not be lost",
                                                                            what="test message"))
        await wait_for(lambda: broker.publisher.confirmed_channel is not None, timeout=15)
        assert broker.publisher.confirmed_channel is not main and not sent.done()
        await q.purge()
        await asyncio.wait_for(sent, 30)
        msg = await q.get(timeout=10)
        assert msg.body == b"must not be lost"
    finally:
        await q.delete(if_unused=False, if_empty=False)
