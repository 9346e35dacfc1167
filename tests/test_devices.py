"""Intermittently connected devices: catching up after being offline, and the outbox."""

from __future__ import annotations

import time

import numpy as np
import pytest

from broker.client import BrokerClient
from common.data import device_shard
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from schemas.messages import RoundOpen, RoundSpec
from tests.services import EventLog, coordinator, enclave, enrolled
from tests.test_rounds import honest_update

pytestmark = pytest.mark.broker


async def start_round(coord, broker, round_id: int, expected: list[str]) -> None:
    spec = RoundSpec(round_id=round_id, deadline=time.time() + 60, min_updates=len(expected), expected=expected,
                     epochs=1, lr=0.1, batch_size=16)
    await broker.publisher.publish(broker.names.control_exchange, "enclave",
                                   coord._sign(RoundOpen(spec=spec, issued_at=time.time())))


async def test_device_returning_from_offline_gets_the_latest_model_and_joins_the_round(broker, settings, tmp_path):
    async with coordinator(settings) as coord, enclave(settings):
        events = await EventLog.bind(broker, "round.completed")
        online = await enrolled(broker, coord, "online")
        away = await enrolled(broker, coord, "away")
        fleet = Fleet(broker, Outbox(tmp_path / "a.sqlite3"))
        fleet.add(Member(online, *device_shard(0, 2)))
        await fleet.listen()
        await start_round(coord, broker, 1, ["online"])
        await events.wait("round.completed", 1)
        await start_round(coord, broker, 2, ["online", "away"])
        # "away" returns now: it has missed the announcement on the fanout
        late_broker = await BrokerClient.open(settings, name="late")
        try:
            late = Fleet(late_broker, Outbox(tmp_path / "b.sqlite3"))
            member = Member(away, *device_shard(1, 2))
            late.add(member)
            await late.listen()  # reads the models stream from its last chunk
            done = await events.wait("round.completed", 2, timeout=30)
            assert done[1].round_id == 2 and done[1].detail["accepted"] == 2
            assert member.last_round == 2 and member.model_version == 2  # trained on v1, then received v2
            await late.drain()
        finally:
            await late_broker.close()
        await fleet.drain()


async def test_outbox_keeps_an_unconfirmed_update_and_resends_it_with_the_same_id(broker, settings, tmp_path):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.accepted", "update.rejected.#")
        dev = await enrolled(broker, coord, "flaky")
        await start_round(coord, broker, 1, ["flaky", "other"])
        uid, key, body = honest_update(dev, enc, 1)
        outbox = Outbox(tmp_path / "outbox.sqlite3")
        gone = await BrokerClient.open(settings, name="flaky")
        await gone.connection.close()  # the link drops before the publish
        offline = Fleet(gone, outbox)
        offline.add(Member(dev, np.zeros((1, 64), np.float32), np.zeros(1, np.int64)))
        outbox.put(uid, "flaky", key, body, 1)
        assert not await offline.send(uid, key, body)
        assert [p[0] for p in outbox.pending()] == [uid]
        # back online (a new process would do the same at start): resend what is pending
        back = Fleet(broker, outbox)
        back.add(offline.members["flaky"])
        assert await back.flush() == 1
        assert outbox.pending() == []
        accepted = await events.wait("update.accepted")
        assert accepted[0].detail["update_id"] == uid
        assert [u.update_id for u in enc.store.round_updates(1)] == [uid]


async def test_a_fleet_resends_an_update_the_broker_did_not_confirm_and_the_enclave_counts_it_once(
        broker, settings, tmp_path):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "round.completed")
        dev = await enrolled(broker, coord, "unconfirmed")
        device_broker = await BrokerClient.open(settings, name="unconfirmed", declare=False)
        try:
            fleet = Fleet(device_broker, Outbox(tmp_path / "o.sqlite3"))
            fleet.add(Member(dev, *device_shard(0, 2)))
            # a real publish with a timeout too short for any confirm: the first attempt fails
            device_broker.publisher.confirm_timeout = 1e-6
            missed: list[str] = []

            def on_unconfirmed(update_id: str) -> None:
                missed.append(update_id)
                device_broker.publisher.confirm_timeout = 30.0  # the broker answers the resend in time

            fleet.on_unconfirmed = on_unconfirmed
            await fleet.listen()
            await start_round(coord, broker, 1, ["unconfirmed"])
            done = await events.wait("round.completed", 1, timeout=45)
            await fleet.drain()
        finally:
            await device_broker.close()
        assert len(missed) == 1 and fleet.unconfirmed == 1 and fleet.resent == 1
        assert fleet.outbox.pending() == []  # confirmed on the resend
        # the same update id both times: one update in the round, however many copies arrived
        assert [u.update_id for u in enc.store.round_updates(1)] == missed
        assert done[0].detail["accepted"] == 1


async def test_an_update_over_the_message_limit_is_not_sent_and_says_why(broker, settings, tmp_path, caplog):
    small = settings.model_copy(update={"broker": settings.broker.model_copy(update={"max_message_bytes": 8192})})
    async with coordinator(settings) as coord, enclave(settings):
        dev = await enrolled(broker, coord, "big")
        refused: list[tuple[str, str]] = []
        device_broker = await BrokerClient.open(small, name="big", declare=False)
        try:
            fleet = Fleet(device_broker, Outbox(tmp_path / "o.sqlite3"),
                          on_reject=lambda d, r: refused.append((d, r)))
            fleet.add(Member(dev, *device_shard(0, 2)))
            await fleet.listen()
            await start_round(coord, broker, 1, ["big"])
            from tests.conftest import wait_for

            await wait_for(lambda: refused, 20)
            await fleet.drain()
            assert refused == [("big", "oversize")]
            assert fleet.outbox.pending() == []
            assert "max_message_bytes" in caplog.text
        finally:
            await device_broker.close()


async def test_device_ids_with_dots_route_to_the_enclave(broker, settings):
    from tests.test_rounds import honest_update, publish

    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.accepted")
        dev = await enrolled(broker, coord, "site.a.cam-1")
        await start_round(coord, broker, 1, ["site.a.cam-1", "other"])
        _, key, body = honest_update(dev, enc, 1)
        assert key == "update.site.a.cam-1"
        await publish(broker, key, body)
        accepted = await events.wait("update.accepted")
        assert accepted[0].device_id == "site.a.cam-1"
