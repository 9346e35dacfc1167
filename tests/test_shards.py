"""Sharded enclaves end to end on the real broker with real crypto (docs/scaling.md,
"Sharded enclaves"): two shards and a root make one enclave's FedAvg model; partials from an
unadmitted key, replayed partials and updates sent to the wrong shard are refused."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from common.data import device_shard
from common.shards import shard_of
from common.training import train_local
from edge_agent import updates
from enclave_worker import aggregate as agg
from enclave_worker import shards as sharding
from enclave_worker.service import Enclave
from pqc.identity import Identity
from schemas.messages import RoundOpen, RoundSpec, ShardPartial
from schemas.names import Names
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enrolled

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SHARDS = 2


def shard_settings(settings, shard: int, **fl):
    """``settings`` for shard ``shard`` of 2 (the same state directory: the enclave keys are shared)."""
    return settings.model_copy(update={
        "enclave": settings.enclave.model_copy(update={"shards": SHARDS, "shard": shard,
                                                        "partial_wait_seconds": 2.0}),
        "fl": settings.fl.model_copy(update={"defend": False, **fl})})


def device_ids(per_shard: int) -> list[str]:
    """Device ids, ``per_shard`` of them on each shard (shard_of decides)."""
    out: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    i = 0
    while min(len(v) for v in out.values()) < per_shard:
        d = f"dev{i}"
        if len(out[shard_of(d, SHARDS)]) < per_shard:
            out[shard_of(d, SHARDS)].append(d)
        i += 1
    return [d for s in range(SHARDS) for d in out[s]]


@contextlib.asynccontextmanager
async def sharded(settings, **fl):
    """The root (shard 0), then shard 1: the root makes the shared keys on its first start."""
    root = Enclave(shard_settings(settings, 0, **fl))
    await root.start(attest_timeout=15)
    other = Enclave(shard_settings(settings, 1, **fl))
    try:
        await other.start(attest_timeout=15)
        yield root, other
    finally:
        await other.stop()
        await root.stop()


async def open_round(coord, broker, round_id: int, expected: list[str], deadline: float = 60.0) -> None:
    spec = RoundSpec(round_id=round_id, deadline=time.time() + deadline, min_updates=1, expected=expected,
                     epochs=1, lr=0.1, batch_size=16)
    await broker.publisher.publish(broker.names.control_exchange, "enclave",
                                   coord._sign(RoundOpen(spec=spec, issued_at=time.time())))


def trained(dev, enc: Enclave, round_id: int, index: int, samples: int = 60):
    """(delta, routing key, encoded update): ``samples`` examples each, so no claim is capped."""
    x, y = device_shard(index, 10)
    delta, _ = train_local(enc.params, x[:samples], y[:samples], epochs=1, lr=0.1, batch_size=16, seed=index)
    _, key, body = updates.build(dev, round_id, enc.version, enc.layout_id, delta, samples)
    return delta, key, body


async def test_two_shards_and_a_root_make_the_single_enclaves_fedavg_model(broker, settings):
    async with coordinator(settings) as coord, sharded(settings) as (root, other):
        events = await EventLog.bind(broker, "update.#", "round.*", "shard.#")
        ids = device_ids(3)
        devices = [await enrolled(broker, coord, d) for d in ids]
        before = root.params.copy()
        await open_round(coord, broker, 1, ids)
        await events.wait("round.opened")
        built = [trained(d, root, 1, i) for i, d in enumerate(devices)]
        for _, key, body in built:
            await broker.publisher.publish(broker.names.updates_exchange, key, body)
        done = await events.wait("round.completed", timeout=30)
        assert done[0].detail["accepted"] == 6, done[0].detail
        sent = await events.wait("shard.partial.sent")
        assert sent[0].detail == {"shard": 1, "received": 3, "accepted": 3}
        # each shard stored exactly its own devices' updates
        assert sorted(u.device_id for u in root.store.round_updates(1)) == sorted(ids[:3])
        assert sorted(u.device_id for u in other.store.round_updates(1)) == sorted(ids[3:])
        # one enclave's FedAvg over all six (equal sample counts: no claim capped)
        expected = before + agg.fedavg(np.stack([b[0] for b in built]), np.full(6, 60.0))
        np.testing.assert_allclose(root.params, expected, rtol=1e-5, atol=1e-6)
        assert root.version == 1
        await wait_for(lambda: other.version == 1)  # shard 1 follows the root's model
        np.testing.assert_array_equal(other.params, root.params)
        assert "shard.missing" not in events.types()


async def test_a_replayed_partial_and_a_partial_signed_by_an_unadmitted_key_are_refused(broker, settings):
    async with coordinator(settings) as coord, sharded(settings) as (root, _other):
        events = await EventLog.bind(broker, "round.*", "shard.#")
        copies = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
        await copies.bind(broker.names.rpc_exchange, Names.PARTIALS_KEY)  # a copy of each partial sent
        ids = device_ids(2)
        devices = [await enrolled(broker, coord, d) for d in ids]
        await open_round(coord, broker, 1, ids)
        await events.wait("round.opened")
        built = [trained(d, root, 1, i) for i, d in enumerate(devices)]
        for _, key, body in built[2:]:  # shard 1's devices only: the root waits for its own
            await broker.publisher.publish(broker.names.updates_exchange, key, body)
        await events.wait("shard.partial.sent")
        await wait_for(lambda: root._book is not None and 1 in root._book.taken)
        captured = await copies.get(timeout=5)

        # the same sealed partial again: one per shard per round
        await broker.publisher.publish(broker.names.rpc_exchange, Names.PARTIALS_KEY, captured.body)
        await events.wait("shard.partial.rejected.replay")

        # a well-formed partial sealed to the root, signed by a key the coordinator never admitted
        rogue = Identity.generate(settings.crypto.signature, settings.crypto.kem)
        forged = ShardPartial(round_id=1, shard=1, shards=2, base_version=0, layout_id=root.layout_id,
                              weighted_sum=np.full(root.params.shape[0], 100.0).tobytes(), weight_total=1.0,
                              received=1, accepted=1, issued_at=time.time())
        body = sharding.seal_partial(forged, rogue, root.identity.kem_alg, root.identity.kem_pk,
                                     broker.names.namespace)
        await broker.publisher.publish(broker.names.rpc_exchange, Names.PARTIALS_KEY, body)
        await events.wait("shard.partial.rejected.bad_signature")

        for _, key, body in built[:2]:
            await broker.publisher.publish(broker.names.updates_exchange, key, body)
        done = await events.wait("round.completed", timeout=30)
        assert done[0].detail["accepted"] == 4
        assert np.abs(root.params).max() < 50  # the forged sum of 100s is nowhere in the model


async def test_an_update_sent_to_the_wrong_shard_is_refused_by_that_shard(broker, settings):
    async with coordinator(settings) as coord, sharded(settings) as (root, other):
        events = await EventLog.bind(broker, "update.#", "round.*", "shard.#")
        ids = device_ids(1)
        devices = [await enrolled(broker, coord, d) for d in ids]
        await open_round(coord, broker, 1, ids, deadline=4.0)
        await events.wait("round.opened")
        # shard 0's device's update put straight into shard 1's queue (not by the updates exchange)
        _, _, body = trained(devices[0], root, 1, 0)
        await broker.publisher.publish("", broker.names.shard_queue(1, "updates"), body)
        refused = await events.wait("update.rejected.wrong_shard")
        assert refused[0].device_id == ids[0]
        assert other.store.round_updates(1) == []
        # a missing partial: shard 1 is stopped, the root closes at the deadline without it
        await other.stop()
        _, key, body = trained(devices[0], root, 1, 0)
        await broker.publisher.publish(broker.names.updates_exchange, key, body)
        missing = await events.wait("shard.missing", timeout=20)
        assert missing[0].detail == {"shard": 1} and missing[0].reason == "missing_shard"
        done = await events.wait("round.completed", timeout=10)
        assert done[0].detail["accepted"] == 1
        assert "missing_shard=1" in done[0].detail["rejected"]


def test_bench_shards_json_prints_only_json_and_both_runs_close_their_round(sh):
    import json

    from common.report import DOC

    before = DOC.read_text()
    res = sh.run("bench", "shards", "--quick", "--json", "--params", "2000")
    out = json.loads(res.stdout)
    assert [c["shards"] for c in out["cases"]] == [1, 2]
    for case in out["cases"]:
        assert case["status"] == "round.completed" and case["model_accepted"] == case["updates"], case
        assert len(case["enclave_cores"]) == case["shards"]
    assert DOC.read_text() == before, "bench rewrote docs/benchmarks.md without --write-docs"


async def test_a_round_whose_devices_are_all_on_the_root_closes_without_waiting_for_the_other_shard(broker, settings):
    async with coordinator(settings) as coord, sharded(settings) as (root, other):
        events = await EventLog.bind(broker, "round.*", "shard.#")
        ids = device_ids(1)[:1]  # shard 0's device only
        devices = [await enrolled(broker, coord, d) for d in ids]
        await open_round(coord, broker, 1, ids, deadline=120.0)
        await events.wait("round.opened")
        await wait_for(lambda: other.store.round_status(1) == "completed")  # nothing of shard 1's expected
        _, key, body = trained(devices[0], root, 1, 0)
        t0 = time.time()
        await broker.publisher.publish(broker.names.updates_exchange, key, body)
        done = await events.wait("round.completed", timeout=20)
        assert time.time() - t0 < 30 and done[0].detail["accepted"] == 1  # long before the 120 s deadline
        assert "shard.missing" not in events.types() and "shard.partial.sent" not in events.types()
