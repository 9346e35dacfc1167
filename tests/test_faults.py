"""Faults with real processes on a private RabbitMQ node (issue 10 item 6).

Each test runs the coordinator, the enclave and the devices as separate ``qflare`` processes,
injects one fault, and asserts: 0 confirmed updates lost, 0 counted twice, every round of the
plan completed. The fault is timed by conditions (a log line, a round state), never by sleeps.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults import Rig

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = ["d0", "d1", "d2"]


@pytest.fixture
async def rig(rabbit_node, tmp_path):
    node = rabbit_node()
    r = Rig(node, tmp_path / "rig")
    try:
        yield r
    finally:
        r.close()


async def fleet(rig: Rig, devices: list[str] = DEVICES) -> None:
    """Services up, devices enrolled and running, each following the models fanout."""
    await rig.start_services()
    await rig.enroll(*devices)
    for i, d in enumerate(devices):
        rig.start_agent(d, i, len(devices))
    for d in devices:
        await rig.agent_ready(d)


async def test_broker_node_stop_and_start_with_the_deadline_inside_the_outage(rig):
    await fleet(rig)
    deadline = 20.0
    opened = time.time()
    # no expected list: the round can only close at its deadline, which falls in the outage
    rig.start_rounds(2, min_updates=3, deadline=deadline)
    for d in DEVICES:
        await rig.wait_log(d, r"update \S+ confirmed by the broker")
    # every update is the broker's now: some consumed by the enclave, maybe some still queued
    rig.node.stop()
    assert time.time() < opened + deadline, "the node must be down before the deadline"
    while time.time() < opened + deadline + 2:  # the deadline passes while the node is down
        await asyncio.sleep(0.2)
    rig.node.start()
    await rig.wait_rounds(2, timeout=150)
    rec = rig.assert_nothing_lost_or_doubled(2, DEVICES)
    assert sorted(rec[1].devices) == DEVICES and rec[1].accepted == 3
    assert "reached its deadline with the broker away" in rig.text("enclave")


async def test_enclave_kill_9_with_updates_in_its_intake(rig):
    await fleet(rig)
    rig.freeze("d2")  # d2 sends late, into an enclave that is about to die
    rig.start_rounds(2, min_updates=3, deadline=90, devices=DEVICES)
    await wait(lambda: rig.stored(1) == 2, "d0's and d1's updates durable")
    rig.freeze("enclave")  # from now on deliveries sit in its prefetch, never acked...
    rig.thaw("d2")
    await rig.wait_log("d2", r"update \S+ confirmed by the broker")
    await wait(lambda: rig.unacked(rig.names.updates_queue) == 1, "d2's update delivered to the enclave")
    rig.kill("enclave")  # ...then it dies with d2's update in its intake
    await rig.restart("enclave", "enclave", "run", ready="enclave started")
    await rig.wait_rounds(2, timeout=120)
    rec = rig.assert_nothing_lost_or_doubled(2, DEVICES)
    assert [rec[r].accepted for r in (1, 2)] == [3, 3]


async def test_coordinator_kill_9_mid_round(rig):
    await fleet(rig)
    rig.start_rounds(2, min_updates=3, deadline=60, devices=DEVICES)
    await wait(lambda: rig.round_status().get(1) == "open", "round 1 open")
    rig.kill("coordinator")  # the plan's driver dies with round 1 open
    await rig.wait_rounds(1, timeout=90)  # the enclave and the devices finish it alone
    await rig.restart("coordinator", "coordinator", "run", ready="coordinator started")
    await rig.wait_rounds(2, timeout=120)  # the new coordinator hears round 1 ended, runs round 2
    rig.assert_nothing_lost_or_doubled(2, DEVICES)


async def test_coordinator_kill_9_mid_enrollment(rig):
    await fleet(rig, DEVICES[:2])
    rig.freeze("coordinator")
    late = asyncio.create_task(rig.enroll("d2"))  # its request reaches the frozen coordinator...
    await wait(lambda: rig.unacked(rig.names.coordinator_queue) >= 1, "the enrollment delivered, unanswered")
    rig.kill("coordinator")  # ...which dies before answering
    await rig.restart("coordinator", "coordinator", "run", ready="coordinator started")
    await asyncio.wait_for(late, 60)  # redelivered to the new coordinator, answered to the same device
    rig.start_agent("d2", 2, 3)
    await rig.agent_ready("d2")
    rig.start_rounds(1, min_updates=3, deadline=60, devices=DEVICES)
    await rig.wait_rounds(1, timeout=90)
    rec = rig.assert_nothing_lost_or_doubled(1, DEVICES)
    assert sorted(rec[1].devices) == DEVICES


async def test_device_offline_at_the_announcement_joins_when_back_before_the_deadline(rig):
    await fleet(rig)
    rig.stop("d2")  # offline: no connection, no process
    rig.start_rounds(1, min_updates=3, deadline=150, devices=DEVICES)
    await wait(lambda: rig.round_status().get(1) == "open", "round 1 open")
    rig.start_agent("d2", 2, 3)  # back: it reads the open round from the models stream
    await rig.wait_rounds(1, timeout=150)
    rec = rig.assert_nothing_lost_or_doubled(1, DEVICES)
    assert sorted(rec[1].devices) == DEVICES  # d2 took part although it missed the announcement
    assert "joined round 1" in rig.text("d2", run=2)


async def test_device_asleep_across_a_whole_round_says_so_and_joins_the_next(rig):
    devices = DEVICES + ["d3"]
    await fleet(rig, devices)
    rig.freeze("d3")  # suspended: its connection stays, it reads nothing
    rig.start_rounds(2, min_updates=3, deadline=12, devices=devices)
    await rig.wait_rounds(1, timeout=90)  # closes at its deadline with the three others
    rig.thaw("d3")  # wakes with round 1's announcement waiting: too late for it, then round 2
    await rig.wait_rounds(2, timeout=90)
    rec = rig.assert_nothing_lost_or_doubled(2, devices)
    assert sorted(rec[1].devices) == DEVICES and sorted(rec[2].devices) == devices
    assert "round 1 is past its deadline; waiting for the next round" in rig.text("d3")


async def wait(predicate, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.2)
