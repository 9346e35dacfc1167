"""Federated rounds end to end on a real broker: accuracy, poisoning, attacks on intake,
and an enclave crash mid-round."""

from __future__ import annotations

import time

import numpy as np
import pytest

import pqc
from common.data import device_shard, load_digits_split
from common.training import train_centralised, train_local
from common.updates import signed_parts
from edge_agent import updates
from edge_agent.fleet import verify_model
from enclave_worker.service import Enclave
from ops.demo import run_demo
from schemas import signing
from schemas.codec import decode, encode
from schemas.messages import RoundOpen, RoundSpec, Update
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enclave, enrolled, start_rounds

pytestmark = pytest.mark.broker


async def test_five_devices_three_rounds_reach_85_percent(settings, capsys):
    report = await run_demo(settings, devices=5, rounds=3)
    acc = [r.accuracy for r in report.rounds]
    assert [r.status for r in report.rounds] == ["completed"] * 3
    assert all(r.accepted == 5 for r in report.rounds)
    assert acc[-1] >= 0.85, acc
    x, y, xt, yt = load_digits_split()
    central = train_centralised(x, y, xt, yt, epochs=6)
    with capsys.disabled():
        print(f"\nfederated accuracy by round {acc}; centralised baseline {central:.3f}")


async def test_malicious_updates_are_rejected_and_accuracy_holds(settings):
    clean = await run_demo(settings, devices=10, rounds=3)
    for attack in ("sign-flip", "scale"):
        poisoned = await run_demo(settings, devices=10, rounds=3, malicious=0.2, attack=attack)
        for r in poisoned.rounds:
            assert r.accepted == 8, (attack, r)
            assert sum(r.rejected.values()) == 2, (attack, r)
            assert set(r.rejected) <= {"norm_bound", "low_cosine"}
        assert poisoned.rounds[-1].accuracy >= clean.rounds[-1].accuracy - 0.05


# --- attacks on intake -----------------------------------------------------------------


async def open_round(coord, broker, round_id: int, expected: list[str], deadline: float = 60.0) -> None:
    spec = RoundSpec(round_id=round_id, deadline=time.time() + deadline, min_updates=1, expected=expected,
                     epochs=1, lr=0.1, batch_size=16)
    await broker.publisher.publish(broker.names.control_exchange, "enclave", coord._sign(
        RoundOpen(spec=spec, issued_at=time.time())))


def honest_update(dev, enc: Enclave, round_id: int, index: int = 0, update_id: str | None = None):
    x, y = device_shard(index, 5)
    delta, n = train_local(enc.params, x, y, epochs=1, lr=0.1, batch_size=16, seed=index)
    return updates.build(dev, round_id, enc.version, enc.layout_id, delta, n, update_id=update_id)


async def publish(broker, key: str, body: bytes) -> None:
    await broker.publisher.publish(broker.names.updates_exchange, key, body)


def tamper(body: bytes, **change) -> bytes:
    u = decode(body, Update)
    return encode(u.model_copy(update=change))


async def test_attacks_on_intake_are_rejected_with_reasons_and_leave_the_model_unchanged(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        good = await enrolled(broker, coord, "good")
        bad = await enrolled(broker, coord, "bad")
        gone = await enrolled(broker, coord, "gone")
        await open_round(coord, broker, 1, ["good", "bad"])
        await events.wait("round.opened")
        before = enc.params.copy()

        # a tampered ciphertext: the device signature no longer verifies
        _, key, body = honest_update(bad, enc, 1, 1)
        u = decode(body, Update)
        flipped = bytearray(u.sealed)
        flipped[-5] ^= 1
        await publish(broker, key, tamper(body, sealed=bytes(flipped)))
        await events.wait("update.rejected.bad_signature")

        # a tampered ciphertext re-signed by the device itself: the AEAD refuses it
        sig = pqc.get_signature(bad.identity.sig_alg)
        resigned = sig.sign(bad.identity.sig_sk, signed_parts(u.header, bytes(flipped)),
                            context=signing.context_for(Update.TYPE))
        await publish(broker, key, tamper(body, sealed=bytes(flipped), signature=resigned))
        await events.wait("update.rejected.decryption_failed")

        # a forged signature: another key signs the bad device's update
        other = pqc.get_signature("ML-DSA-44")
        _, osk = other.generate_keypair()
        forged = other.sign(osk, signed_parts(u.header, u.sealed), context=signing.context_for(Update.TYPE))
        await publish(broker, key, tamper(body, signature=forged))
        await events.wait("update.rejected.bad_signature", 2)

        # a wrong round
        _, key2, wrong = honest_update(bad, enc, 7, 1)
        await publish(broker, key2, wrong)
        await events.wait("update.rejected.wrong_round")

        # a device publishing under another device's routing key
        await publish(broker, "update.good", body)
        await events.wait("update.rejected.device_mismatch")

        # a revoked device
        await coord.revoke("gone")
        await wait_for(lambda: "gone" in enc._revoked)
        _, gkey, gbody = honest_update(gone, enc, 1, 2)
        await publish(broker, gkey, gbody)
        await events.wait("update.rejected.revoked")

        assert enc.store.round_updates(1) == []
        np.testing.assert_array_equal(enc.params, before)

        # an honest update is accepted, then replayed: counted once
        uid, gk, gb = honest_update(good, enc, 1, 0)
        await publish(broker, gk, gb)
        await events.wait("update.accepted")
        await publish(broker, gk, gb)
        await events.wait("update.rejected.replay")
        assert [s.update_id for s in enc.store.round_updates(1)] == [uid]


async def test_returning_device_rejects_a_model_not_signed_by_the_enclave(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        dev = await enrolled(broker, coord, "verifier")
        from enclave_worker.publisher import build_global_model
        from pqc.identity import Identity

        genuine = build_global_model(enc.identity, 5, enc.layout_id, enc.params)
        assert verify_model(genuine, dev).version == 5
        impostor = Identity.generate("ML-DSA-44", "ML-KEM-768")
        from schemas.reasons import QflareError

        with pytest.raises(QflareError):
            verify_model(build_global_model(impostor, 6, enc.layout_id, enc.params), dev)


async def test_enclave_crash_mid_round_completes_without_double_counting(broker, settings):
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "update.*", "round.*")
        enc = Enclave(settings)
        await enc.start(attest_timeout=15)
        devices = [await enrolled(broker, coord, f"d{i}") for i in range(4)]
        await open_round(coord, broker, 1, [d.device_id for d in devices])
        await events.wait("round.opened")
        built = [honest_update(d, enc, 1, i) for i, d in enumerate(devices)]
        for _, key, body in built[:2]:
            await publish(broker, key, body)
        await events.wait("update.accepted", 2)
        # crash: the connection drops without a clean shutdown of the round
        await enc.broker.connection.close()
        enc.store.close()
        # the devices did not see confirms for everything: they resend with the same ids
        for _, key, body in built:
            await publish(broker, key, body)
        restarted = Enclave(settings)
        await restarted.start(attest_timeout=15)
        try:
            done = await events.wait("round.completed", 1, timeout=30)
            assert done[0].detail["accepted"] == 4
            assert sorted(u.update_id for u in restarted.store.round_updates(1)) == sorted(b[0] for b in built)
            assert restarted.version == 1
        finally:
            await restarted.stop()


async def test_round_short_of_its_minimum_fails_and_is_reported(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "round.*", "update.accepted")
        dev = await enrolled(broker, coord, "lonely")
        spec = RoundSpec(round_id=1, deadline=time.time() + 4, min_updates=2, expected=["lonely", "absent"],
                         epochs=1, lr=0.1, batch_size=16)
        await broker.publisher.publish(broker.names.control_exchange, "enclave",
                                       coord._sign(RoundOpen(spec=spec, issued_at=time.time())))
        await events.wait("round.opened")
        _, key, body = honest_update(dev, enc, 1)
        await publish(broker, key, body)
        await events.wait("update.accepted")
        failed = await events.wait("round.failed", timeout=10)
        assert failed[0].round_id == 1 and failed[0].detail["received"] == 1
        assert enc.store.round_status(1) == "failed" and enc.version == 0


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "multi_krum"])
async def test_robust_aggregators_run_end_to_end(settings, aggregator):
    settings = settings.model_copy(update={"fl": settings.fl.model_copy(update={"aggregator": aggregator})})
    report = await run_demo(settings, devices=6, rounds=2, malicious=0.2, attack="sign-flip")
    assert [r.status for r in report.rounds] == ["completed", "completed"]
    assert report.rounds[-1].accuracy > 0.7


async def test_enclave_with_a_measurement_outside_the_allow_list_is_refused(broker, settings):
    from schemas.reasons import QflareError, Reason

    strict = settings.model_copy(update={"enclave": settings.enclave.model_copy(
        update={"allowed_measurements": ["0" * 64]})})
    async with coordinator(strict):
        events = await EventLog.bind(broker, "attestation.rejected.#")
        enc = Enclave(settings)
        try:
            with pytest.raises(QflareError) as exc:
                await enc.start(attest_timeout=5)
            assert exc.value.reason == Reason.MEASUREMENT_NOT_ALLOWED
            await events.wait("attestation.rejected.measurement_not_allowed")
        finally:
            await enc.stop()


async def test_enclave_report_from_an_untrusted_platform_is_refused(broker, settings, tmp_path):
    from schemas.reasons import QflareError, Reason

    async with coordinator(settings) as coord:
        rogue = settings.model_copy(update={"state_dir": tmp_path / "rogue",  # its own "platform" key
                                            "enclave": settings.enclave.model_copy(
                                                update={"coordinator_fingerprint": coord.identity.sig_fp})})
        enc = Enclave(rogue)
        try:
            with pytest.raises(QflareError) as exc:
                await enc.start(attest_timeout=5)
            assert exc.value.reason == Reason.BAD_SIGNATURE
        finally:
            await enc.stop()


async def test_a_round_no_enclave_closes_is_reported_stalled_then_cancelled_at_the_operators_bound(broker, settings):

    settings = settings.model_copy(update={"recovery": settings.recovery.model_copy(
        update={"stall_report_seconds": 0.5, "stall_limit_seconds": 2.0})})
    async with coordinator(settings):
        events = await EventLog.bind(broker, "round.*")
        await start_rounds(settings, rounds=3, min_updates=settings.fl.min_updates, deadline_seconds=0.5)
        await wait_for(lambda: any(e.type == "round.stalled" and e.detail.get("action") == "cancelled"
                                   for e in events.events), 15)
        stalled = [e for e in events.events if e.type == "round.stalled"]
        # warnings while it waits, then one cancellation; never a second round
        assert stalled[0].detail["action"] == "waiting" and stalled[-1].detail["action"] == "cancelled"
        assert all(e.round_id == 1 and e.reason == "no_enclave" for e in stalled)
        assert stalled[-1].detail["remaining"] == 2


async def test_rounds_carry_on_after_a_coordinator_restart(broker, settings, tmp_path):
    from common.data import device_shard as shard
    from edge_agent.fleet import Fleet, Member
    from edge_agent.outbox import Outbox

    settings = settings.model_copy(update={"fl": settings.fl.model_copy(update={"min_updates": 1})})
    async with enclave_after_coordinator(settings) as enc_holder:
        events = await EventLog.bind(broker, "round.completed")
        async with coordinator(settings) as coord:
            enc = await enc_holder()
            dev = await enrolled(broker, coord, "steady")
            fleet = Fleet(broker, Outbox(tmp_path / "o.sqlite3"))
            fleet.add(Member(dev, *shard(0, 2)))
            await fleet.listen()
            await start_rounds(settings, rounds=3, min_updates=1, deadline_seconds=30, expected=["steady"])
            await events.wait("round.completed", 1, timeout=30)
        # the coordinator is down between rounds; a new one resumes the plan
        async with coordinator(settings):
            await wait_for(lambda: any(e.type == "round.completed" and e.round_id == 3 for e in events.events), 60)
        # a round that closed while no coordinator listened is announced again, not run twice
        assert {e.round_id for e in events.events} == {1, 2, 3}
        assert enc.version == 3
        await fleet.drain()


def enclave_after_coordinator(settings):
    """An enclave that outlives the coordinator contexts (it attests to the first one)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def cm():
        holder: dict = {}

        async def get():
            if "e" not in holder:
                holder["e"] = Enclave(settings)
                await holder["e"].start(attest_timeout=15)
            return holder["e"]

        try:
            yield get
        finally:
            if "e" in holder:
                await holder["e"].stop()

    return cm()
