"""No single device sets the model; claims, stale keys, fake coordinators and replayed
reports buy nothing (docs/security.md). Each test is named for the attack it stops."""

from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest

import pqc
from common import attestation as rules
from common.data import device_shard
from common.training import train_local
from edge_agent import client, updates
from enclave_worker import aggregate, intake
from enclave_worker import attestation as enclave_attestation
from enclave_worker.service import Enclave
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import (
    AttestAccept,
    AttestChallengeRequest,
    RoundOpen,
    RoundSpec,
    SessionGrant,
    UpdateHeader,
)
from schemas.reasons import QflareError, Reason
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enclave, enrolled
from tests.test_rounds import honest_update, open_round, publish

pytestmark = pytest.mark.broker


def with_fl(settings, **fields):
    return settings.model_copy(update={"fl": settings.fl.model_copy(update=fields)})


# --- sample counts (pure) ----------------------------------------------------------------


def test_one_noisy_update_claiming_a_billion_samples_does_not_become_the_whole_step():
    claims = np.array([100, 120, 90, 110, 10**9])
    weights, clipped = aggregate.capped_weights(claims, 2.0, 1_000_000)
    assert clipped.tolist() == [False, False, False, False, True]
    assert weights[-1] == 2 * 110  # twice the median claim
    assert weights[-1] / weights.sum() < 0.35  # not 100 % of the step as the raw claim gave
    honest = np.ones((4, 8), dtype=np.float32)
    noisy = np.full((1, 8), -50.0, dtype=np.float32)
    step = aggregate.fedavg(np.vstack([honest, noisy]), weights)
    assert np.all(step > -20) and np.all(step < 1), step  # the raw claims give -49.99...


def test_claims_under_the_cap_keep_their_weights_and_the_maximum_caps_everyone():
    w, clipped = aggregate.capped_weights(np.array([10, 20, 30]), 2.0, 1_000_000)
    assert w.tolist() == [10, 20, 30] and not clipped.any()
    w, clipped = aggregate.capped_weights(np.array([5000, 5000, 5000]), 2.0, 1000)
    assert w.tolist() == [1000, 1000, 1000] and clipped.all()
    with pytest.raises(ValueError):
        aggregate.capped_weights(np.array([]), 2.0, 10)


# --- checked header fields (pure) ----------------------------------------------------------


class World:
    """A coordinator key, an enclave key and one device's grant, for intake's pure checks."""

    def __init__(self) -> None:
        self.coord = Identity.generate("ML-DSA-44", "ML-KEM-768")
        self.enclave = Identity.generate("ML-DSA-44", "ML-KEM-768")
        self.device = Identity.generate("ML-DSA-44", "ML-KEM-768")
        self.digest = b"d" * 32

    def grant(self, issued_at: float, signer: Identity | None = None, digest: bytes | None = None) -> bytes:
        signer = signer or self.coord
        g = SessionGrant(device_id="cam-1", session_id="s" * 16, sig_alg=self.device.sig_alg,
                         sig_pk=self.device.sig_pk, sig_fp=self.device.sig_fp, issued_at=issued_at,
                         not_after=issued_at + 600, transcript=b"t", enclave_digest=digest or self.digest)
        return encode(signing.sign(g, signer.sig_alg, signer.sig_sk, signer.sig_pk))

    def header(self, grant: bytes, *, base_version: int = 3, timestamp: float | None = None) -> UpdateHeader:
        return UpdateHeader(device_id="cam-1", grant=grant, round_id=1, update_id="u" * 16,
                            base_version=base_version, num_samples=10,
                            timestamp=time.time() if timestamp is None else timestamp, layout_id="L",
                            kem_alg=self.enclave.kem_alg, enclave_kem_fp=self.enclave.kem_fp)

    def context(self, **change) -> intake.IntakeContext:
        fields = dict(coordinator_keys={self.coord.sig_fp: intake.CoordinatorKey(self.coord.sig_alg, self.coord.sig_pk)},
                      kem_alg=self.enclave.kem_alg, kem_sk=self.enclave.kem_sk, kem_fp=self.enclave.kem_fp,
                      open_round=1, layout_id="L", n_params=4, revoked=frozenset(), policy=pqc.Policy(),
                      now=time.time(), base_version=3, opened_at=time.time() - 10, skew=60.0,
                      report_digests=frozenset({self.digest}))
        return intake.IntakeContext(**{**fields, **change})


def refused(header: UpdateHeader, ctx: intake.IntakeContext) -> Reason:
    with pytest.raises(QflareError) as exc:
        intake.admit(header, "cam-1", ctx, False)
    return exc.value.reason


def test_an_update_built_on_another_model_version_is_refused():
    w = World()
    now = time.time()
    assert intake.admit(w.header(w.grant(now)), "cam-1", w.context(), False).device_id == "cam-1"
    assert refused(w.header(w.grant(now), base_version=2), w.context()) == Reason.STALE_BASE


def test_an_update_stamped_before_its_round_or_in_the_future_is_refused():
    w = World()
    g = w.grant(time.time())
    assert refused(w.header(g, timestamp=time.time() - 3600), w.context()) == Reason.STALE
    assert refused(w.header(g, timestamp=time.time() + 3600), w.context()) == Reason.STALE


def test_a_grant_issued_for_another_enclaves_report_is_refused():
    w = World()
    assert refused(w.header(w.grant(time.time(), digest=b"x" * 32)), w.context()) == Reason.BAD_GRANT


def test_a_grant_issued_before_the_devices_key_change_is_superseded():
    w = World()
    g = w.grant(time.time() - 5)
    assert refused(w.header(g), w.context(key_epochs={"cam-1": time.time() - 1})) == Reason.SUPERSEDED


def test_a_rotated_out_coordinator_key_vouches_only_for_grants_from_before_its_rotation():
    w = World()
    rotated_at = time.time() - 30
    keys = {w.coord.sig_fp: intake.CoordinatorKey(w.coord.sig_alg, w.coord.sig_pk, rotated_at)}
    before = w.header(w.grant(rotated_at - 60))
    assert intake.admit(before, "cam-1", w.context(coordinator_keys=keys), False).issued_at == rotated_at - 60
    after = w.header(w.grant(rotated_at + 1))
    assert refused(after, w.context(coordinator_keys=keys)) == Reason.BAD_GRANT


# --- attestation: the challenge, freshness and the pinned coordinator ---------------------


def test_a_challenge_the_coordinator_did_not_issue_is_not_recognised():
    key = rules.challenge_key(b"k" * 32)
    c = rules.new_challenge(key, 1000.0)
    assert rules.challenge_issued_at(key, c) == 1000.0
    forged = bytearray(c)
    forged[20] ^= 1  # another issue time under the same tag
    assert rules.challenge_issued_at(key, bytes(forged)) is None
    assert rules.challenge_issued_at(rules.challenge_key(b"o" * 32), c) is None
    assert rules.challenge_issued_at(key, b"n" * 32) is None


async def attest_request(coord, enc: Enclave):
    challenge = await coord.attest_challenge(AttestChallengeRequest())
    return enclave_attestation.attest_request(enc.platform, enc.identity, enc.code, challenge.challenge)


async def test_a_replayed_enclave_report_is_refused(broker, settings):
    async with coordinator(settings) as coord:
        enc = Enclave(settings)  # its keys and platform, not started
        req = await attest_request(coord, enc)
        await coord.admit_enclave(req)
        with pytest.raises(QflareError) as exc:
            await coord.admit_enclave(req)  # a device (or anyone) replays the admitted report
        assert exc.value.reason == Reason.REPLAY
        enc.store.close()


async def test_an_enclave_report_without_a_fresh_challenge_is_refused(broker, settings):
    async with coordinator(settings) as coord:
        enc = Enclave(settings)
        stale = rules.new_challenge(coord.challenge_key, time.time() - 3600)
        for nonce, reason in ((b"n" * 32, Reason.BAD_SIGNATURE), (stale, Reason.STALE)):
            req = enclave_attestation.attest_request(enc.platform, enc.identity, enc.code, nonce)
            with pytest.raises(QflareError) as exc:
                await coord.admit_enclave(req)
            assert exc.value.reason == reason
        enc.store.close()


async def test_an_older_enclave_report_never_replaces_the_admitted_one(broker, settings):
    async with coordinator(settings) as coord:
        enc = Enclave(settings)
        older = await attest_request(coord, enc)
        await asyncio.sleep(0.01)
        newer = await attest_request(coord, enc)
        await coord.admit_enclave(newer)
        with pytest.raises(QflareError) as exc:
            await coord.admit_enclave(older)  # the fleet is never rolled back to an old report
        assert exc.value.reason == Reason.STALE
        assert coord.registry.get_meta("enclave_report") == newer.report
        enc.store.close()


async def test_an_admission_for_another_report_or_challenge_is_not_believed(broker, settings):
    async with coordinator(settings) as coord:
        enc = Enclave(settings)
        req = await attest_request(coord, enc)
        accept = await coord.admit_enclave(req)
        key = (coord.identity.sig_alg, coord.identity.sig_pk)
        answered = signing.unverified(accept, AttestAccept).challenge
        enclave_attestation.check_accept(accept, req, answered, key)
        with pytest.raises(QflareError):
            enclave_attestation.check_accept(accept, req, b"c" * 40, key)  # not our challenge
        with pytest.raises(QflareError):
            enclave_attestation.check_accept(accept, await attest_request(coord, enc), answered, key)  # not our report
        impostor = Identity.generate("ML-DSA-44", "ML-KEM-768")
        with pytest.raises(QflareError):
            enclave_attestation.check_accept(accept, req, answered, (impostor.sig_alg, impostor.sig_pk))
        enc.store.close()


async def test_a_fake_coordinator_answering_attestation_does_not_become_the_enclaves_master(broker, settings, tmp_path):
    from coordinator.service import load_identity

    real = load_identity(settings)  # the coordinator the enclave pins (not running)
    fake_settings = settings.model_copy(update={"state_dir": tmp_path / "fake"})
    pinned = settings.model_copy(update={"enclave": settings.enclave.model_copy(
        update={"coordinator_fingerprint": real.sig_fp, "platform_key_file": None})})
    async with coordinator(fake_settings) as fake:
        assert fake.identity.sig_fp != real.sig_fp
        enc = Enclave(pinned)
        try:
            with pytest.raises(QflareError) as exc:
                await enc.start(attest_timeout=5)
            assert exc.value.reason == Reason.BAD_SIGNATURE
            assert not enc.coordinator_keys  # it obeys nobody rather than the fake
        finally:
            await enc.stop()


async def test_an_enclave_without_a_pinned_coordinator_refuses_to_start(settings):
    from common.settings import ConfigError

    with pytest.raises(ConfigError, match="coordinator_fingerprint"):
        Enclave(settings)  # no coordinator key under its state directory, none configured


async def test_coordinator_rotate_keys_refuses_while_a_coordinator_runs(broker, settings):
    from coordinator.service import rotate_coordinator_keys

    async with coordinator(settings) as coord:
        with pytest.raises(QflareError) as exc:
            await rotate_coordinator_keys(settings)
        assert exc.value.reason == Reason.BUSY
        assert coord.identity.sig_fp == Identity.load(settings.state_dir / "coordinator").sig_fp


# --- rounds: the floor, claims, rotation, revocation --------------------------------------


async def test_one_device_cannot_set_the_global_model_alone(broker, settings):
    settings = with_fl(settings, min_accepted=3)  # the product's default
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "round.*", "update.accepted")
        solo = await enrolled(broker, coord, "solo")
        await open_round(coord, broker, 1, ["solo"])  # an operator's min_updates=1 round
        await events.wait("round.opened")
        params = enc.params.copy()
        _, key, body = updates.build(solo, 1, enc.version, enc.layout_id, -params, 10**6)  # "zero the model"
        await publish(broker, key, body)
        failed = await events.wait("round.failed", timeout=15)
        assert failed[0].reason == "too_few_accepted" and failed[0].detail["accepted"] <= 1
        assert enc.version == 0
        np.testing.assert_array_equal(enc.params, params)


async def test_a_claimed_sample_count_over_the_cap_is_clipped_and_announced(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        devs = [await enrolled(broker, coord, f"c{i}") for i in range(4)]
        await open_round(coord, broker, 1, [d.device_id for d in devs])
        await events.wait("round.opened")
        for i, d in enumerate(devs):
            x, y = device_shard(i, 5)
            delta, n = train_local(enc.params, x, y, epochs=1, lr=0.1, batch_size=16, seed=i)
            _, key, body = updates.build(d, 1, enc.version, enc.layout_id, delta, 10**9 if i == 3 else n)
            await publish(broker, key, body)
        await events.wait("round.completed", timeout=30)
        clipped = await events.wait("update.clipped")
        median = float(np.median([u.num_samples for u in enc.store.round_updates(1)] or [0]))
        assert clipped[0].device_id == "c3" and clipped[0].detail["claimed"] == 10**9
        assert clipped[0].detail["weight"] == int(2 * median) or median == 0
        assert clipped[0].detail["weight"] < 1000


async def test_an_update_signed_under_a_rotated_out_device_key_is_refused(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        dev = await enrolled(broker, coord, "rot")
        before = copy.copy(dev)  # the old key and its session grant, as a thief would keep them
        rpc = await broker.rpc()
        await client.rotate_keys(rpc, broker.names, dev)
        await wait_for(lambda: "rot" in enc.key_epochs)
        assert coord.registry.get_session(before.session.session_id).not_after <= time.time()  # sessions ended
        await open_round(coord, broker, 1, ["rot"])
        await events.wait("round.opened")
        _, key, body = honest_update(before, enc, 1)
        await publish(broker, key, body)
        await events.wait("update.rejected.superseded")
        # the device with its new key opens a new session and is heard
        await client.open_session(rpc, broker.names, dev)
        _, key, body = honest_update(dev, enc, 1)
        await publish(broker, key, body)
        await events.wait("update.accepted")


async def test_a_devices_update_accepted_before_its_revocation_does_not_count_at_close(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.#", "round.*")
        devs = [await enrolled(broker, coord, f"r{i}") for i in range(3)]
        await open_round(coord, broker, 1, [d.device_id for d in devs])
        await events.wait("round.opened")
        for i, d in enumerate(devs[:2]):
            _, key, body = honest_update(d, enc, 1, i)
            await publish(broker, key, body)
        await events.wait("update.accepted", 2)
        await coord.revoke("r1")  # stored already; revoked before the round closes
        await wait_for(lambda: "r1" in enc._revoked)
        _, key, body = honest_update(devs[2], enc, 1, 2)
        await publish(broker, key, body)
        done = await events.wait("round.completed", timeout=30)
        assert done[0].detail["accepted"] == 2
        assert "revoked=1" in done[0].detail["rejected"]
        assert any(e.type == "update.rejected.revoked" and e.device_id == "r1" for e in events.events)


async def test_an_old_round_open_replayed_after_a_newer_one_is_not_obeyed(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "round.*")
        old = coord._sign(RoundOpen(spec=RoundSpec(round_id=5, deadline=time.time() + 60, min_updates=1, epochs=1,
                                                   lr=0.1, batch_size=16), issued_at=time.time() - 5))
        await open_round(coord, broker, 6, [])
        await events.wait("round.opened")
        await broker.publisher.publish(broker.names.control_exchange, "enclave", old)
        await open_round(coord, broker, 7, [])  # control messages are handled in order
        await wait_for(lambda: enc.round is not None and enc.round.round_id == 7, 10)
        assert enc.store.round_status(5) is None  # never opened: round 6 was not forced closed by it
