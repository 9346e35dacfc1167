"""Async rounds (FedBuff, issue 10 item 4) on a real broker: buffered models, staleness rules,
and devices that go really offline (edge_agent/availability.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.data import device_shard
from common.training import train_local
from edge_agent import availability, updates
from edge_agent.fleet import Fleet, Member, verify_model
from edge_agent.models import latest_model_messages
from edge_agent.outbox import Outbox
from schemas.messages import RoundOpen, RoundSpec
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enclave, enrolled, start_rounds

pytestmark = pytest.mark.broker


def async_settings(settings, buffer_size: int = 3, max_staleness: int = 2, min_updates: int = 2):
    return settings.model_copy(update={"fl": settings.fl.model_copy(update={
        "mode": "async", "buffer_size": buffer_size, "max_staleness": max_staleness, "min_updates": min_updates})})


async def test_an_async_round_publishes_a_model_per_buffer_and_devices_train_on_each(broker, settings, tmp_path):
    s = async_settings(settings)
    ids = ["a0", "a1", "a2", "a3"]
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "model.published", "round.*", "update.#")
        devices = [await enrolled(broker, coord, d) for d in ids]
        fleet = Fleet(broker, Outbox(tmp_path / "outbox.sqlite3"))
        for i, dev in enumerate(devices):
            fleet.add(Member(dev, *device_shard(i, len(ids))))
        await fleet.listen()
        await start_rounds(s, rounds=1, min_updates=2, deadline_seconds=12, expected=ids, epochs=1, lr=0.1,
                           batch_size=16)
        done = await events.wait("round.completed", timeout=60)
        published = await events.wait("model.published", 2)
        await fleet.drain()
        versions = [e.detail["version"] for e in published]
        assert versions == list(range(1, len(versions) + 1))  # every buffer made the next version
        assert all(e.round_id == done[0].round_id for e in published)
        assert all(e.detail["staleness_max"] <= 2 for e in published)
        # the round's record adds up its models' updates, each counted once
        assert done[0].detail["accepted"] == sum(e.detail["accepted"] for e in published)
        assert done[0].detail["version"] == versions[-1] == enc.version
        accepted = [e for e in events.events if e.type == "update.accepted"]
        assert len({e.detail["update_id"] for e in accepted}) == len(accepted)
        # devices trained again on later versions: more updates than devices
        assert len(accepted) > len(ids)
        assert enc.store.buffered_updates(done[0].round_id) == []
        # the models stream carries every version: the latest one verifies and is the enclave's
        latest = verify_model((await latest_model_messages(broker))[0], devices[0])
        assert latest.version == enc.version
        np.testing.assert_array_equal(np.frombuffer(latest.params, dtype="<f4"), enc.params)


async def open_async_round(coord, broker, round_id: int, *, buffer_size: int = 1, max_staleness: int = 1,
                           deadline: float = 60.0) -> RoundSpec:
    spec = RoundSpec(round_id=round_id, deadline=time.time() + deadline, min_updates=1, epochs=1, lr=0.1,
                     batch_size=16, mode="async", buffer_size=buffer_size, max_staleness=max_staleness)
    await broker.publisher.publish(broker.names.control_exchange, "enclave",
                                   coord._sign(RoundOpen(spec=spec, issued_at=time.time())))
    return spec


def update_on(dev, enc, params: np.ndarray, base: int, index: int, round_id: int = 1):
    x, y = device_shard(index, 5)
    delta, n = train_local(params, x, y, epochs=1, lr=0.1, batch_size=16, seed=index)
    return updates.build(dev, round_id, base, enc.layout_id, delta, n)


async def publish(broker, key: str, body: bytes) -> None:
    await broker.publisher.publish(broker.names.updates_exchange, key, body)


async def test_async_intake_refuses_unpublished_bases_stale_updates_and_a_second_update_on_one_base(broker,
                                                                                                     settings):
    s = async_settings(settings, buffer_size=1, max_staleness=1)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "update.#", "model.published", "round.*")
        a, b, c = [await enrolled(broker, coord, d) for d in ("a", "b", "c")]
        await open_async_round(coord, broker, 1)
        await events.wait("round.opened")
        v0 = enc.params.copy()

        # a base version the enclave never published
        _, key, body = update_on(c, enc, v0, 5, 2)
        await publish(broker, key, body)
        await events.wait("update.rejected.unknown_base")

        # a buffer of one: each accepted update makes the next version
        _, key, body = update_on(a, enc, v0, 0, 0)
        await publish(broker, key, body)
        await events.wait("model.published", 1)
        assert enc.version == 1
        _, key2, body2 = update_on(a, enc, v0, 0, 3)  # a second update of "a" on v0: a replay
        await publish(broker, key2, body2)
        await events.wait("update.rejected.replay")
        _, key, body = update_on(b, enc, enc.params.copy(), 1, 1)
        await publish(broker, key, body)
        await events.wait("model.published", 2)
        assert enc.version == 2

        # trained on v0, two versions behind: over max_staleness 1
        _, key, body = update_on(c, enc, v0, 0, 2)
        await publish(broker, key, body)
        stale = await events.wait("update.rejected.too_stale")
        assert "2 versions behind" in stale[0].detail["detail_text"]
        # on v1, one behind: accepted, weighed 1/sqrt(2)
        _, key, body = update_on(c, enc, v0, 1, 4)
        await publish(broker, key, body)
        third = await events.wait("model.published", 3)
        assert third[2].detail["staleness_max"] == 1 and enc.version == 3
        rejected = enc.store.rejections(1)
        assert rejected.get("too_stale") == 1 and rejected.get("unknown_base") == 1


@pytest.mark.slow
async def test_devices_that_go_really_offline_follow_their_trace_and_the_async_round_goes_on(broker, settings,
                                                                                              tmp_path):
    s = async_settings(settings, buffer_size=2, max_staleness=3)
    ids = ["i0", "i1", "i2", "i3"]
    # i0 online throughout; i1 leaves at 1 s and comes back at 5 s; i2 only from 3 s; i3 never
    trace = availability.Trace(12.0, (((0.0, 12.0),), ((0.0, 1.0), (5.0, 12.0)), ((3.0, 12.0),), ()))
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "model.published", "round.*", "update.accepted")
        devices = [await enrolled(broker, coord, d) for d in ids]
        members = [Member(dev, *device_shard(i, len(ids)), pace_seconds=0.3) for i, dev in enumerate(devices)]
        sim = availability.IntermittentFleet(s, trace, members, tmp_path, enc.task)
        try:
            sim.start()
            await start_rounds(s, rounds=1, min_updates=2, deadline_seconds=10, expected=ids, epochs=1, lr=0.1,
                               batch_size=16)
            done = await events.wait("round.completed", timeout=60)
        finally:
            await sim.stop()
        senders = {e.device_id for e in events.events if e.type == "update.accepted"}
        assert senders == {"i0", "i1", "i2"}  # i3 never came online
        assert sim.counts["connects"] == 4 and sim.counts["disconnects"] >= 4  # i1 twice; all closed at the end
        assert done[0].detail["version"] == enc.version >= 2


async def test_an_offline_fleet_keeps_its_update_until_it_is_back(broker, settings, tmp_path):
    """A device that goes offline mid-training keeps the update in its outbox and sends it on return."""
    s = async_settings(settings, buffer_size=1, min_updates=1)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "update.accepted")
        dev = await enrolled(broker, coord, "z")
        trace = availability.Trace(30.0, (((0.0, 30.0),),))
        member = Member(dev, *device_shard(0, 2), pace_seconds=2.0)
        sim = availability.IntermittentFleet(s, trace, [member], tmp_path, enc.task)
        try:
            await sim._online(0)
            fleet = sim.fleets[0]
            await start_rounds(s, rounds=1, min_updates=1, deadline_seconds=30, expected=["z"], epochs=1, lr=0.1,
                               batch_size=16)
            await wait_for(lambda: member.busy, 20)
            await sim._offline(0)  # leaves while training
            await wait_for(lambda: not member.busy, 20)
            assert len(fleet.outbox.pending()) == 1 and not events.events
            await sim._online(0)
            got = await events.wait("update.accepted", timeout=20)
            assert got[0].device_id == "z" and fleet.outbox.pending() == []
        finally:
            await sim.stop()


@pytest.mark.slow
def test_bench_intermittent_json_prints_only_json_and_leaves_the_docs_alone(sh, tmp_path):
    import json

    from common.report import DOC

    before = DOC.read_text()
    res = sh.run("bench", "intermittent", "--json", "--devices", "4", "--seconds", "10", "--deadline", "5",
                 "--mean-online", "4", "--train-seconds", "0.3", "--target", "0.5")
    out = json.loads(res.stdout)
    assert out["target_accuracy"] == 0.5
    for mode in ("sync", "async"):
        r = out[mode]
        assert r["time_to_target_s"] is None or r["time_to_target_s"] >= 0
        assert 0 <= r["final_accuracy"] <= 1 and r["updates_sent"] >= r["updates_wasted"] >= 0
        assert r["curve"][0][0] == 0.0
    assert out["sync"]["models"] <= out["sync"]["rounds"] == 2 and out["async"]["rounds"] == 1
    assert DOC.read_text() == before, "bench rewrote docs/benchmarks.md without --write-docs"
    # a trace file for another fleet: one line, a usage error
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"horizon": 10, "devices": [[[0, 10]]]}))
    bad = sh.run("bench", "intermittent", "--json", "--devices", "4", "--trace", str(trace), ok=False)
    assert bad.returncode == 2 and "describes 1 devices, not 4" in bad.stderr


async def test_a_device_has_one_update_in_a_buffer(broker, settings):
    s = async_settings(settings, buffer_size=2, max_staleness=2)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "update.#", "model.published", "round.*")
        a, b, c = [await enrolled(broker, coord, d) for d in ("a", "b", "c")]
        await open_async_round(coord, broker, 1, buffer_size=2, max_staleness=2)
        await events.wait("round.opened")
        v0 = enc.params.copy()
        for dev, i in ((a, 0), (b, 1)):
            _, key, body = update_on(dev, enc, v0, 0, i)
            await publish(broker, key, body)
        await events.wait("model.published", 1)
        _, key, body = update_on(c, enc, v0, 0, 2)  # c on v0, one version behind: in the buffer
        await publish(broker, key, body)
        await events.wait("update.accepted", 3)
        _, key, body = update_on(c, enc, enc.params.copy(), 1, 3)  # c again, on v1: c is in the buffer already
        await publish(broker, key, body)
        refused = await events.wait("update.rejected.replay")
        assert "already has an update in the buffer" in refused[0].detail["detail_text"]
        assert enc.version == 1 and len(enc.store.buffered_updates(1)) == 1
