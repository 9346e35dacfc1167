"""Chunked updates through a real broker and enclave: rounds, interleaving, limits, crashes.

A small ``chunking.chunk_bytes`` makes the digits model's 19 KB update travel as 5 chunks,
so the chunked path runs at test speed; the 100 MB case is in test_large_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from common import compression
from common.data import device_shard
from common.training import train_local
from edge_agent import updates
from enclave_worker.service import Enclave
from ops.demo import run_demo
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enclave, enrolled
from tests.test_rounds import open_round, publish

pytestmark = pytest.mark.broker

CHUNK = 4096


def chunked(settings, **chunking):
    return settings.model_copy(update={"chunking": settings.chunking.model_copy(
        update={"chunk_bytes": CHUNK, **chunking})})


def _delta(dev, enc, round_id: int, index: int) -> np.ndarray:
    x, y = device_shard(index, 5)
    return train_local(enc.params, x, y, epochs=1, lr=0.1, batch_size=16, seed=index)[0]


def chunked_update(dev, enc, round_id: int, index: int, update_id: str | None = None):
    """(update id, routing key, chunk messages) of an honest float32 update in CHUNK-byte chunks."""
    encoded = compression.encode(_delta(dev, enc, round_id, index), "f32", CHUNK)
    return updates.build_parts(dev, round_id, enc.version, enc.layout_id, encoded, 10, update_id)


async def test_rounds_of_chunked_updates_learn_like_one_message_updates(settings):
    report = await run_demo(chunked(settings), devices=4, rounds=2)
    assert [r.status for r in report.rounds] == ["completed", "completed"]
    assert all(r.accepted == 4 for r in report.rounds)
    assert report.rounds[-1].accuracy >= 0.8


async def test_interleaved_chunked_updates_from_two_devices_are_both_reassembled(broker, settings):
    s = chunked(settings)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        a, b = await enrolled(broker, coord, "a"), await enrolled(broker, coord, "b")
        await open_round(coord, broker, 1, ["a", "b", "c"])
        await events.wait("round.opened")
        ua, ka, ca = chunked_update(a, enc, 1, 0)
        ub, kb, cb = chunked_update(b, enc, 1, 1)
        assert len(ca) == len(cb) == 5
        for x, y in zip(ca, cb, strict=True):  # a0 b0 a1 b1 ...
            await publish(broker, ka, x)
            await publish(broker, kb, y)
        await events.wait("update.accepted", 2)
        assert sorted(u.update_id for u in enc.store.round_updates(1)) == sorted([ua, ub])
        stored = {u.device_id: enc.store.load_delta(u) for u in enc.store.round_updates(1)}
        np.testing.assert_array_equal(stored["a"], _delta(a, enc, 1, 0))
        assert not enc.chunks.active


async def test_more_chunked_updates_than_the_enclave_reassembles_at_once_are_refused_busy(broker, settings):
    s = chunked(settings, max_in_progress=1)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        a, b = await enrolled(broker, coord, "a"), await enrolled(broker, coord, "b")
        await open_round(coord, broker, 1, ["a", "b", "c"])
        await events.wait("round.opened")
        ua, ka, ca = chunked_update(a, enc, 1, 0)
        _, kb, cb = chunked_update(b, enc, 1, 1)
        for x, y in zip(ca, cb, strict=True):
            await publish(broker, ka, x)
            await publish(broker, kb, y)
        busy = await events.wait("update.rejected.busy")
        await events.wait("update.accepted")
        assert busy[0].device_id == "b"
        assert [u.update_id for u in enc.store.round_updates(1)] == [ua]
        await wait_for(lambda: enc.chunks.active == {})
        assert "update.rejected.chunk_sequence" not in events.types()  # b's later chunks dropped quietly


async def test_truncated_chunked_update_is_refused_incomplete_after_the_timeout(broker, settings):
    s = chunked(settings, assembly_timeout_seconds=0.5)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        a = await enrolled(broker, coord, "a")
        await open_round(coord, broker, 1, ["a", "z"])
        await events.wait("round.opened")
        _, ka, ca = chunked_update(a, enc, 1, 0)
        for x in ca[:3]:
            await publish(broker, ka, x)
        got = await events.wait("update.rejected.incomplete", timeout=10)
        assert got[0].device_id == "a"
        assert enc.store.round_updates(1) == [] and enc.chunks.active == {}


async def test_chunk_of_an_update_never_begun_is_refused(broker, settings):
    s = chunked(settings)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        a = await enrolled(broker, coord, "a")
        await open_round(coord, broker, 1, ["a", "z"])
        await events.wait("round.opened")
        _, ka, ca = chunked_update(a, enc, 1, 0)
        await publish(broker, ka, ca[2])
        await events.wait("update.rejected.chunk_sequence")


async def test_enclave_crash_mid_chunked_update_reassembles_it_after_restart(broker, settings):
    s = chunked(settings)
    async with coordinator(s) as coord:
        events = await EventLog.bind(broker, "update.*", "round.*")
        enc = Enclave(s)
        await enc.start(attest_timeout=15)
        a = await enrolled(broker, coord, "a")
        await open_round(coord, broker, 1, ["a"])
        await events.wait("round.opened")
        uid, ka, ca = chunked_update(a, enc, 1, 0)
        for x in ca[:3]:
            await publish(broker, ka, x)
        await wait_for(lambda: uid in enc.chunks.active and enc.chunks.active[uid].next_index == 3)
        await enc.broker.connection.close()  # crash: its three chunks were never acked
        enc._expiry.cancel()  # a crashed process runs no timers either
        enc.store.close()
        for x in ca[3:]:
            await publish(broker, ka, x)
        restarted = Enclave(s)
        await restarted.start(attest_timeout=15)
        try:
            done = await events.wait("round.completed", 1, timeout=30)
            assert done[0].detail["accepted"] == 1
            assert [u.update_id for u in restarted.store.round_updates(1)] == [uid]
        finally:
            await restarted.stop()


# --- chunked global models ----------------------------------------------------------------


async def test_returning_device_reads_a_complete_chunked_model_from_the_stream(broker, settings):
    from edge_agent.fleet import verify_model
    from edge_agent.models import ModelAssembly, latest_model_messages
    from schemas.codec import decode
    from schemas.messages import ModelChunk

    s = chunked(settings)
    async with coordinator(s) as coord, enclave(s) as enc:
        events = await EventLog.bind(broker, "round.*")
        dev = await enrolled(broker, coord, "late")
        await open_round(coord, broker, 1, ["late", "absent"])  # announces model 0 in 5 chunks
        await events.wait("round.opened")
        await open_round(coord, broker, 2, ["late", "absent"])  # and again: the latest is the second
        await wait_for(lambda: events.types().count("round.opened") == 2)
        messages = await latest_model_messages(broker)
        assert len(messages) == 6
        signed = verify_model(messages[0], dev)
        assert signed.next_round.round_id == 2 and len(signed.chunk_digests) == 5 and signed.params == b""
        assembly = ModelAssembly(signed)
        whole = [assembly.add(decode(m, ModelChunk)) for m in messages[1:]][-1]
        np.testing.assert_array_equal(np.frombuffer(whole.params, dtype="<f4"), enc.params)
