"""Sharded enclaves end to end on the real broker with real crypto (docs/scaling.md,
"Sharded enclaves"): two shards and a root make one enclave's FedAvg model; each update
reaches only its shard's queue; partials from an unadmitted key, replayed partials and updates
a device sends under another shard's key are refused."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import numpy as np
import pytest

from broker.topology import declare_shard_queues, declare_topology
from broker.users import ManagementApi, amqp_url_for, create_device_user, delete_device_user
from common import compression
from common.data import device_shard
from common.shards import shard_of, update_key
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
from tests.test_broker_users import can_publish
from tests.test_chunked_rounds import CHUNK, chunked

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
    _, key, body = updates.build(dev, round_id, enc.version, enc.layout_id, delta, samples, shards=SHARDS)
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


async def test_each_update_reaches_only_its_shards_queue_even_after_declare_topology_again(broker, settings):
    """No copies: shard i's queue holds exactly its devices' updates, and a process declaring the
    topology later (a coordinator, with any ``enclave.shards``) adds no catch-all to it."""
    for shard in range(SHARDS):
        await declare_shard_queues(broker.channel, shard_settings(settings, shard), shard)
    await declare_topology(broker.channel, settings)  # enclave.shards 1, as a coordinator's may be
    ids = device_ids(3)
    for d in ids:
        await broker.publisher.publish(broker.names.updates_exchange, update_key(d, SHARDS), b"x")
    for shard, name in enumerate((broker.names.updates_queue, broker.names.shard_queue(1, "updates"))):
        q = await broker.channel.declare_queue(name, passive=True)
        got: list[str] = []
        end = time.time() + 10
        while time.time() < end and len(got) < 4:  # one more than its share, to see a copy
            m = await q.get(no_ack=True, fail=False, timeout=5)
            if m is None:
                await asyncio.sleep(0.2 if len(got) < 3 else 1.0)
                if len(got) == 3:
                    break
                continue
            got.append(Names.routed_device(m.routing_key))
        assert sorted(got) == sorted(d for d in ids if shard_of(d, SHARDS) == shard), (shard, got)
    assert update_key(ids[0], 1) == Names.update_key(ids[0])  # one enclave: today's key, unchanged


async def test_a_sharded_device_user_may_publish_under_any_shard_but_only_its_own_id(settings, broker):
    api = ManagementApi.from_settings(settings)
    name = f"dev-{secrets.token_hex(4)}"
    password = create_device_user(api, broker.names, name, secrets.token_urlsafe(16), shards=SHARDS)
    try:
        url = amqp_url_for(settings.amqp_url, broker.names.device_user(name), password)
        ex = broker.names.updates_exchange
        assert await can_publish(url, ex, update_key(name, SHARDS))
        assert await can_publish(url, ex, Names.update_key(name, 1 - shard_of(name, SHARDS)))  # the shard refuses
        assert not await can_publish(url, ex, Names.update_key("someone-else", 0))
        assert not await can_publish(url, ex, Names.update_key(name + ".x", 0))
        assert not await can_publish(url, ex, Names.update_key(name))  # the unsharded key is not a sharded device's
    finally:
        delete_device_user(api, broker.names, name)


async def test_a_device_that_names_another_shard_in_its_routing_key_is_refused_by_that_shard(broker, settings):
    settings = chunked(settings)
    async with coordinator(settings) as coord, sharded(settings) as (root, other):
        events = await EventLog.bind(broker, "update.#", "round.*", "shard.#")
        ids = device_ids(1)
        devices = [await enrolled(broker, coord, d) for d in ids]
        await open_round(coord, broker, 1, ids, deadline=8.0)
        await events.wait("round.opened")
        # shard 0's device publishes under shard 1's key (its broker user allows any shard index)
        lie = Names.update_key(ids[0], 1)
        delta, _, body = trained(devices[0], root, 1, 0)
        await broker.publisher.publish(broker.names.updates_exchange, lie, body)
        refused = await events.wait("update.rejected.wrong_shard")
        assert refused[0].device_id == ids[0]
        # the same as a chunked update: shard 1 refuses it on the signed header of its first chunk
        encoded = compression.encode(delta, "f32", CHUNK)
        _, _, bodies = updates.build_parts(devices[0], 1, root.version, root.layout_id, encoded, 60,
                                           shards=SHARDS)
        assert len(bodies) > 1
        for part in bodies:
            await broker.publisher.publish(broker.names.updates_exchange, lie, part)
        refused = await events.wait("update.rejected.wrong_shard", count=2)
        assert [e.device_id for e in refused] == [ids[0]] * 2
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
    busy = out["cases"][0]["host_cores"]  # the ceiling is what the host's idle cores leave
    assert out["host_ceiling_speedup"] == round(out["cases"][0]["cpu_count"] / busy, 2)
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
