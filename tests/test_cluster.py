"""A three-node RabbitMQ cluster on this machine (issue 13 item 3).

One cluster for the module (tests/rabbitnode.py: names, ports, data directories and a cookie
of its own; the shared node on 5672 is never touched), removed afterwards even when a test
fails. Quorum queues and streams get a member on every node; clients given every node's URL
fail over when theirs dies; killing the node that every process is connected to, and that
leads every queue, in the middle of a round loses no confirmed update and the round completes.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import time
import uuid

import pytest

from tests.faults import Rig
from tests.rabbitnode import RabbitCluster

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = ["d0", "d1", "d2"]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*$", re.MULTILINE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = RabbitCluster(tmp_path_factory.mktemp("cluster"), size=3)
    try:
        yield c.start()
    finally:
        base = c.base
        c.cleanup()
        assert not base.exists() and not any(n.running for n in c.nodes)


@pytest.fixture
def whole(cluster):
    """The cluster with all its nodes up again after the test (a test may kill one)."""
    yield cluster
    for node in cluster.nodes:
        node.start()
    cluster.wait_running(len(cluster.nodes))


def settings(cluster: RabbitCluster, **broker):
    from common.settings import load_settings

    return load_settings(amqp_url=cluster.url, broker={"namespace": "c" + uuid.uuid4().hex[:10], **broker},
                         recovery={"reconnect_seconds": 0.5})


async def test_the_topology_has_a_member_on_every_node_and_replicas_caps_it(cluster):
    from broker.client import BrokerClient

    every = {n.name for n in cluster.nodes}
    for replicas, members in ((None, 3), (2, 2), (5, 3)):  # unset: every node; more than nodes: all
        s = settings(cluster, replicas=replicas)
        async with await BrokerClient.open(s, name="cluster-topology") as b:
            names = b.names
        ours = {k: v for k, v in cluster.queues().items() if k.startswith(names.namespace + ".")}
        shared = [names.coordinator_queue, names.operator_queue, names.updates_queue, names.enclave_control_queue,
                  names.dead_letter_queue, names.models_stream, names.events_stream]
        assert sorted(ours) == sorted(shared)
        for q in shared:
            assert ours[q]["type"] == ("stream" if q in (names.models_stream, names.events_stream) else "quorum")
            assert len(ours[q]["members"]) == members and set(ours[q]["members"]) <= every, (replicas, ours[q])


async def test_a_client_skips_a_dead_node_and_fails_over_when_its_node_dies(whole):
    from broker.client import BrokerClient
    from broker.connection import connect

    cluster = whole
    s = settings(cluster)
    async with await BrokerClient.open(s, name="cluster-failover") as b:
        first = cluster.queues()[b.names.updates_queue]["leader"]
        assert str(b.connection.url).endswith(f":{cluster.nodes[0].amqp_port}/")  # the first URL first
        await b.publisher.publish(b.names.updates_exchange, "update.x", b"before", message_id="before")
        cluster.nodes[0].kill()  # the node we are connected to, and the updates queue's leader
        await b.publisher.publish_until_confirmed(b.names.updates_exchange, "update.x", b"after", what="after",
                                                  message_id="after")
        assert b.link.outages == 1 and b.connection.failovers == 1
        assert not str(b.connection.url).endswith(f":{cluster.nodes[0].amqp_port}/")
        assert first == cluster.nodes[0].name
    # a plain connection (the agent's) given the dead node first goes to the next one
    plain = await connect(s, name="cluster-plain", robust=False)
    try:
        assert not str(plain.url).endswith(f":{cluster.nodes[0].amqp_port}/")
    finally:
        await plain.close()
    # both messages are on the other nodes: read them with a client of its own (a basic.get on a
    # channel opened while the leader was being elected may end its connection with nodedown)
    live = {n.name for n in cluster.nodes[1:]}
    await wait(lambda: cluster.queues()[b.names.updates_queue]["leader"] in live, "a new leader", 60)
    async with await BrokerClient.open(s, name="cluster-reader", declare=False) as reader:
        q = await reader.channel.declare_queue(reader.names.updates_queue, passive=True)
        got = []
        for _ in range(2):
            msg = await q.get(timeout=30)
            got.append(msg.message_id)
            await msg.ack()
        assert got == ["before", "after"]


@pytest.fixture
async def rig(whole, tmp_path):
    r = Rig(whole, tmp_path / "rig")
    try:
        yield r
    finally:
        r.close()


def stamps(text: str, pattern: str) -> list[float]:
    """Wall-clock times of the log lines matching ``pattern``."""
    rx = re.compile(pattern)
    return [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for m in STAMP.finditer(text) if rx.search(m.group(0))]


async def fleet(rig: Rig) -> None:
    await rig.start_services()
    await rig.enroll(*DEVICES)
    for i, d in enumerate(DEVICES):
        rig.start_agent(d, i, len(DEVICES))
    for d in DEVICES:
        await rig.agent_ready(d)


async def test_killing_a_node_mid_round_loses_no_confirmed_update_and_the_round_completes(rig):
    cluster: RabbitCluster = rig.node
    await fleet(rig)
    leaders = {q: v["leader"] for q, v in cluster.queues().items() if q.startswith(rig.namespace + ".")}
    victim = cluster.node_of(leaders[rig.names.updates_queue])  # the updates queue's leader
    rig.freeze("d2")  # d2 sends only after the node is gone
    rig.start_rounds(2, min_updates=3, deadline=90, devices=DEVICES)
    await wait(lambda: rig.stored(1) == 2, "d0's and d1's updates durable in the enclave")
    victim.kill()  # kill -9 of the whole node, mid-round
    killed = time.time()
    rig.thaw("d2")
    await rig.wait_rounds(2, timeout=180)
    rec = rig.assert_nothing_lost_or_doubled(2, DEVICES)
    assert [rec[r].accepted for r in (1, 2)] == [3, 3]
    assert sorted(rec[1].devices) == DEVICES and sorted(rec[2].devices) == DEVICES
    if victim is cluster.nodes[0]:  # every process connected to the first URL first: all lost their node
        for svc in ("coordinator", "enclave"):
            assert "failed over to broker node" in rig.text(svc), rig.text(svc)[-2000:]
    confirmed = {d: len(rig.confirmed(d)) for d in DEVICES}
    back = {n: round(min([t for t in stamps(rig.text(n), r"broker link back after|connected as") if t >= killed],
                         default=float("nan")) - killed, 2)
            for n in ("coordinator", "enclave", *DEVICES)}
    print(f"\ncluster failover: killed {victim.name} (leader of {rig.names.updates_queue}); confirmed updates "
          f"{confirmed}, all stored once; seconds from the kill to each process's link on a live node {back}")


async def test_updates_confirmed_but_not_yet_consumed_outlive_their_queue_leader(rig):
    cluster: RabbitCluster = rig.node
    await fleet(rig)
    for d in DEVICES:
        rig.freeze(d)  # they read the round's announcement only once the enclave is frozen
    rig.start_rounds(1, min_updates=3, deadline=90, devices=DEVICES)
    await wait(lambda: rig.round_status().get(1) == "open", "round 1 open")
    rig.freeze("enclave")  # from now on updates wait in the queue (or unacked in its prefetch)
    for d in DEVICES:
        rig.thaw(d)
    for d in DEVICES:
        await rig.wait_log(d, r"update \S+ confirmed by the broker")
    updates = rig.names.updates_queue
    await wait(lambda: int(cluster.queues()[updates]["messages"]) == 3, "3 updates in the updates queue")
    leader = cluster.node_of(cluster.queues()[updates]["leader"])
    assert rig.stored(1) == 0  # every confirmed update is only in the broker
    leader.kill()
    rig.thaw("enclave")
    await rig.wait_rounds(1, timeout=120)
    rec = rig.assert_nothing_lost_or_doubled(1, DEVICES)
    assert rec[1].accepted == 3 and sorted(rec[1].devices) == DEVICES


async def wait(predicate, what: str, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.2)
