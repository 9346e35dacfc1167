"""The defence inside the real enclave, on a real broker: root data sealed by the operator,
rejections with their reasons on the events, quarantine, and root data no device can forge."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from common import attacks, metrics, rootdata
from common.data import device_shard
from common.training import train_local
from coordinator.rootdata import seal_root_data, send_root_data
from edge_agent import updates
from schemas import signing
from schemas.messages import RootData, RoundOpen, RoundSpec
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enclave, enrolled

pytestmark = pytest.mark.broker


def _totals() -> tuple[float, float]:
    """qflare_updates_total and qflare_updates_refused_at_close_total, over every label."""
    def total(counter) -> float:
        return sum(x.value for m in counter.collect() for x in m.samples if x.name.endswith("_total"))

    return total(metrics.UPDATES), total(metrics.CLOSE_REFUSED)


async def _open(coord, broker, round_id: int, expected: list[str]) -> None:
    spec = RoundSpec(round_id=round_id, deadline=time.time() + 60, min_updates=1, expected=expected, epochs=1,
                     lr=0.1, batch_size=16)
    await broker.publisher.publish(broker.names.control_exchange, "enclave",
                                   coord._sign(RoundOpen(spec=spec, issued_at=time.time())))


async def test_rejected_updates_carry_their_reason_to_the_events_and_repeat_offenders_are_quarantined(
        broker, settings):
    counted = _totals()
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*", "device.quarantined", "enclave.#")
        await send_root_data(settings, *rootdata.digits_root(), broker=broker, registry=coord.registry,
                             identity=coord.identity)
        await events.wait("enclave.root_data")
        assert enc.root is not None and len(enc.root[2]) == 10 * rootdata.ROOT_PER_CLASS
        ids = [f"d{i}" for i in range(6)]
        devs = [await enrolled(broker, coord, d) for d in ids]
        for rnd in (1, 2, 3, 4):
            await _open(coord, broker, rnd, ids)
            await events.wait("round.opened", rnd)
            for i, dev in enumerate(devs):
                x, y = device_shard(i, 6)
                delta, n = train_local(enc.params, x, y, epochs=1, lr=0.1, batch_size=16, seed=rnd * 10 + i)
                if i == 5:
                    delta = attacks.sign_flip(delta, -1.0)  # unboosted: only the direction gives it away
                _, key, body = updates.build(dev, rnd, enc.version, enc.layout_id, delta, n)
                await broker.publisher.publish(broker.names.updates_exchange, key, body)
            await events.wait("round.completed", rnd)
        rejected = [e for e in events.events if e.type.startswith("update.rejected.")]
        assert rejected and all(e.device_id == "d5" for e in rejected)
        assert all(e.reason == e.type.rsplit(".", 1)[1] for e in rejected)
        assert {e.reason for e in rejected} <= {"low_cosine", "quarantined"}
        quarantined = await events.wait("device.quarantined")
        assert [e.device_id for e in quarantined] == ["d5"]
        assert enc.defence_state.reputations["d5"] < settings.fl.quarantine_below
        assert min(v for k, v in enc.defence_state.reputations.items() if k != "d5") >= 0.99
        # each update's standing rides on its update.accepted (the dashboard's fleet panel shows it)
        standing = [(e.round_id, e.device_id, e.detail["reputation"], e.detail["quarantined"])
                    for e in events.events if e.type == "update.accepted"]
        assert {(r, d, rep) for r, d, rep, _ in standing if r == 1} == {(1, d, 1.0) for d in ids}
        assert all(not q for _, d, _, q in standing if d != "d5")
        assert any(q and rep < settings.fl.quarantine_below for _, d, rep, q in standing if d == "d5")
        # each update counted once by its intake verdict; the close's refusals apart
        now = _totals()
        assert now[0] - counted[0] == 4 * 6
        assert now[1] - counted[1] == len(rejected)


async def test_root_data_signed_by_a_device_is_refused(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        dev = await enrolled(broker, coord, "mallory")
        genuine = signing.unverified(seal_root_data(settings, *rootdata.digits_root(), registry=coord.registry,
                                                    identity=coord.identity), RootData)
        forged = signing.sign(genuine, dev.identity.sig_alg, dev.identity.sig_sk, dev.identity.sig_pk)
        await broker.publisher.publish(broker.names.control_exchange, "enclave", forged)
        # a genuine one sent afterwards lands, so the forged one was judged (and refused) first
        events = await EventLog.bind(broker, "enclave.#")
        await send_root_data(settings, np.zeros((3, 64), np.float32), np.zeros(3, np.int64), broker=broker,
                             registry=coord.registry, identity=coord.identity)
        await events.wait("enclave.root_data")
        await wait_for(lambda: enc.root is not None)
        assert len(enc.root[2]) == 3  # the operator's, not mallory's 200
        await asyncio.sleep(0)


async def test_root_data_survives_an_enclave_restart(broker, settings):
    async with coordinator(settings) as coord:
        async with enclave(settings) as enc:
            events = await EventLog.bind(broker, "enclave.#")
            await send_root_data(settings, *rootdata.digits_root(), broker=broker, registry=coord.registry,
                                 identity=coord.identity)
            await events.wait("enclave.root_data")
            first = enc.root
        async with enclave(settings) as again:
            assert again.root is not None and np.array_equal(again.root[1], first[1])


# --- root data over the operator plane: signed by the operator's own key ------------------


def _submission(settings, identity, x, y, *, issued_at: float | None = None):
    """A ``Signed(RootDataSubmit)`` for the attested enclave, signed by ``identity``."""
    import secrets

    from coordinator.registry import Registry
    from coordinator.service import META_ENCLAVE_REPORT
    from schemas.messages import RootDataSubmit

    registry = Registry(str(settings.registry_file))
    try:
        kem_fp, sealed = rootdata.seal_to(registry.get_meta(META_ENCLAVE_REPORT), x, y)
    finally:
        registry.close()
    req = RootDataSubmit(operator_alg=identity.sig_alg, operator_pk=identity.sig_pk, nonce=secrets.token_bytes(32),
                         issued_at=time.time() if issued_at is None else issued_at, kem_fp=kem_fp, sealed=sealed,
                         n_samples=len(y))
    return signing.sign(req, identity.sig_alg, identity.sig_sk, identity.sig_pk)


async def test_root_data_sent_by_the_operator_from_its_own_host_is_kept(broker, settings):
    from ops.operator_client import OperatorClient
    from tests.services import with_operator

    s = with_operator(settings)  # both the coordinator and the enclave pin the operator key
    async with coordinator(s), enclave(s) as enc:
        events = await EventLog.bind(broker, "enclave.#")
        async with OperatorClient(s) as op:  # no coordinator key, no registry: only the operator's own
            fp = await op.send_root_data(*rootdata.digits_root())
        assert fp == enc.identity.kem_fp
        await events.wait("enclave.root_data")
        await wait_for(lambda: enc.root is not None)
        assert len(enc.root[2]) == 10 * rootdata.ROOT_PER_CLASS


async def test_root_data_from_an_unpinned_operator_key_is_refused(broker, settings):
    from pqc.identity import Identity
    from tests.services import with_operator

    s = with_operator(settings)
    stranger = Identity.generate(s.crypto.signature, s.crypto.kem)
    async with coordinator(s), enclave(s) as enc:
        events = await EventLog.bind(broker, "enclave.#")
        # published straight to the enclave's control queue, as a coordinator that forwards
        # anything would: the enclave checks the operator's key against its own pins
        await broker.publisher.publish(broker.names.control_exchange, "enclave",
                                       _submission(s, stranger, *rootdata.digits_root()))
        refused = await events.wait("enclave.root_data.rejected.not_operator")
        assert refused[0].reason == "not_operator"
        assert enc.root is None


async def test_replayed_root_data_is_refused(broker, settings):
    from ops.operator_client import load_operator
    from tests.services import with_operator

    s = with_operator(settings)
    operator = load_operator(s)
    async with coordinator(s), enclave(s) as enc:
        events = await EventLog.bind(broker, "enclave.#")
        signed = _submission(s, operator, np.zeros((3, 64), np.float32), np.zeros(3, np.int64))
        await broker.publisher.publish(broker.names.control_exchange, "enclave", signed)
        await events.wait("enclave.root_data")
        newer = _submission(s, operator, *rootdata.digits_root())
        await broker.publisher.publish(broker.names.control_exchange, "enclave", newer)
        await events.wait("enclave.root_data", 2)
        await broker.publisher.publish(broker.names.control_exchange, "enclave", signed)  # the old one again
        await events.wait("enclave.root_data.rejected.replay")
        assert len(enc.root[2]) == 10 * rootdata.ROOT_PER_CLASS  # still the newer root data
        # one from outside the freshness window is refused too, however new it claims to be
        stale = _submission(s, operator, *rootdata.digits_root(), issued_at=time.time() - 10 * 3600)
        await broker.publisher.publish(broker.names.control_exchange, "enclave", stale)
        await events.wait("enclave.root_data.rejected.stale")
