"""Enrollment, sessions, revocation, rotation and rate limits on a real broker.

One test per property or attack, each asserting the reason code the device receives and
the event the coordinator emits.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

import pqc
from common import handshake
from edge_agent import client
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import EnrollClaim, EnrollRequest, SessionAccept, SessionRequest, Signed
from schemas.names import Names
from schemas.reasons import QflareError, Reason
from tests.services import EventLog, coordinator, enrolled

pytestmark = pytest.mark.broker


async def enroll(broker, coord, device_id, token, **kw):
    rpc = await broker.rpc()
    s = coord.settings
    return await client.enroll(rpc, broker.names, device_id, token, coord.identity.sig_fp,
                               sig_alg=kw.pop("sig_alg", s.crypto.signature), kem_alg=s.crypto.kem, **kw)


async def expect_reason(coro, reason: Reason) -> QflareError:
    with pytest.raises(QflareError) as exc:
        await coro
    assert exc.value.reason == reason, exc.value
    return exc.value


async def send_claim(broker, coord, claim: EnrollClaim, signer: Identity, *, sealed: bytes | None = None):
    """Build an enrollment request by hand (for attacks the client would never make)."""
    keys = coord.identity
    body = encode(signing.sign(claim, signer.sig_alg, signer.sig_sk, signer.sig_pk))
    req = EnrollRequest(device_id=claim.device_id, kem_alg=keys.kem_alg, coordinator_kem_fp=keys.kem_fp,
                        sealed=sealed if sealed is not None else pqc.seal(keys.kem_alg, keys.kem_pk, body,
                                                                          handshake.enroll_aad(claim.device_id)))
    rpc = await broker.rpc()
    return await rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, req, Signed, 10)


def claim_for(ident: Identity, device_id: str, token: str, **over) -> EnrollClaim:
    fields = dict(device_id=device_id, token=token, sig_alg=ident.sig_alg, sig_pk=ident.sig_pk,
                  kem_alg=ident.kem_alg, kem_pk=ident.kem_pk, nonce=secrets.token_bytes(32), timestamp=time.time())
    fields.update(over)
    return EnrollClaim(**fields)


async def test_enroll_then_open_session(broker, settings):
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "device.#", "sessions.#")
        dev = await enrolled(broker, coord, "cam-1")
        assert dev.session is not None and len(dev.session.key) == 32
        assert coord.registry.get_device("cam-1").sig_fp == dev.identity.sig_fp
        await events.wait("device.enrolled")
        await events.wait("sessions.opened")


async def test_token_is_single_use(broker, settings):
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "enrollment.rejected.#")
        token = coord.registry.create_token("cam-2", 600)
        await enroll(broker, coord, "cam-2", token)
        await expect_reason(enroll(broker, coord, "cam-2", token), Reason.TOKEN_USED)
        await events.wait("enrollment.rejected.token_used")


async def test_token_is_single_use_under_race(broker, settings):
    """Two coordinators share the registry and the request queue: requests really race."""
    settings = settings.model_copy(update={"rate_limits": settings.rate_limits.model_copy(
        update={"enroll_per_device_burst": 100})})
    async with coordinator(settings) as coord, coordinator(settings):
        token = coord.registry.create_token("cam-3", 600)
        results = await asyncio.gather(*(enroll(broker, coord, "cam-3", token) for _ in range(6)),
                                       return_exceptions=True)
        ok = [r for r in results if isinstance(r, client.Device)]
        refused = [r for r in results if isinstance(r, QflareError)]
        assert len(ok) == 1 and len(refused) == 5
        assert {r.reason for r in refused} == {Reason.TOKEN_USED}


async def test_unknown_expired_and_mismatched_tokens(broker, settings):
    async with coordinator(settings) as coord:
        await expect_reason(enroll(broker, coord, "cam-4", "not-a-token"), Reason.TOKEN_UNKNOWN)
        short = coord.registry.create_token("cam-4", 0.05)
        await asyncio.sleep(0.2)
        await expect_reason(enroll(broker, coord, "cam-4", short), Reason.TOKEN_EXPIRED)
        other = coord.registry.create_token("cam-5", 600)
        await expect_reason(enroll(broker, coord, "cam-4", other), Reason.DEVICE_MISMATCH)
        # the mismatched attempt did not burn the other device's token
        assert isinstance(await enroll(broker, coord, "cam-5", other), client.Device)


async def test_forged_proof_of_possession_is_refused(broker, settings):
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "enrollment.rejected.#")
        token = coord.registry.create_token("cam-6", 600)
        victim, attacker = Identity.generate("ML-DSA-44", "ML-KEM-768"), Identity.generate("ML-DSA-44", "ML-KEM-768")
        # claims the victim's public key but signs with another: no proof of possession
        await expect_reason(send_claim(broker, coord, claim_for(victim, "cam-6", token), attacker),
                            Reason.BAD_SIGNATURE)
        await events.wait("enrollment.rejected.bad_signature")
        # the token was not burnt by the forgery
        assert isinstance(await enroll(broker, coord, "cam-6", token), client.Device)


async def test_algorithm_outside_policy_is_refused(broker, settings):
    settings = settings.model_copy(update={"crypto": settings.crypto.model_copy(
        update={"allowed_signatures": ["ML-DSA-44"]})})
    async with coordinator(settings) as coord:
        token = coord.registry.create_token("cam-7", 600)
        await expect_reason(enroll(broker, coord, "cam-7", token, sig_alg="ML-DSA-65"),
                            Reason.UNSUPPORTED_ALGORITHM)


async def test_garbage_sealed_request_is_malformed(broker, settings):
    async with coordinator(settings) as coord:
        ident = Identity.generate("ML-DSA-44", "ML-KEM-768")
        claim = claim_for(ident, "cam-8", "t")
        await expect_reason(send_claim(broker, coord, claim, ident, sealed=b"\x01" * 2000), Reason.MALFORMED)


async def test_enrollment_is_rate_limited_before_crypto(broker, settings):
    settings = settings.model_copy(update={"rate_limits": settings.rate_limits.model_copy(
        update={"global_per_s": 0.001, "global_burst": 2})})
    async with coordinator(settings) as coord:
        for i in range(2):
            await expect_reason(enroll(broker, coord, f"rl-{i}", "x"), Reason.TOKEN_UNKNOWN)
        await expect_reason(enroll(broker, coord, "rl-3", "x"), Reason.RATE_LIMITED)


async def test_revoked_device_cannot_enroll_or_open_sessions(broker, settings):
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "device.revoked", "session.rejected.#")
        dev = await enrolled(broker, coord, "cam-9")
        await coord.revoke("cam-9")
        await events.wait("device.revoked")
        rpc = await broker.rpc()
        await expect_reason(client.open_session(rpc, broker.names, dev), Reason.REVOKED)
        await events.wait("session.rejected.revoked")
        token = coord.registry.create_token("cam-9", 600)
        await expect_reason(enroll(broker, coord, "cam-9", token), Reason.REVOKED)


async def test_replayed_session_request_is_refused(broker, settings):
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "cam-10", session=False)
        kem = pqc.get_kem("ML-KEM-768")
        eph_pk, _ = kem.generate_keypair()
        req = SessionRequest(device_id="cam-10", eph_kem_alg=kem.name, eph_pk=eph_pk,
                             nonce=secrets.token_bytes(32), timestamp=time.time())
        ident = dev.identity
        signed = signing.sign(req, ident.sig_alg, ident.sig_sk, ident.sig_pk)
        rpc = await broker.rpc()
        call = lambda: rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, signed, SessionAccept, 10)
        await call()
        await expect_reason(call(), Reason.REPLAY)


async def test_stale_and_unenrolled_session_requests(broker, settings):
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "cam-11", session=False)
        kem = pqc.get_kem("ML-KEM-768")
        eph_pk, _ = kem.generate_keypair()
        rpc = await broker.rpc()
        ident = dev.identity
        for device_id, ts, reason in (("cam-11", time.time() - 3600, Reason.STALE),
                                      ("ghost", time.time(), Reason.NOT_ENROLLED)):
            req = SessionRequest(device_id=device_id, eph_kem_alg=kem.name, eph_pk=eph_pk,
                                 nonce=secrets.token_bytes(32), timestamp=ts)
            signed = signing.sign(req, ident.sig_alg, ident.sig_sk, ident.sig_pk)
            await expect_reason(rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, signed, SessionAccept, 10),
                                reason)


async def test_recorded_session_key_is_not_recoverable_from_long_term_keys(broker, settings):
    """Forward secrecy (handshake sig-v1; kem-v2 in tests/test_kem_handshake.py): everything on the wire plus the device's long-term private keys
    does not give the session key, because the KEM went to a discarded ephemeral key."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "cam-12", session=False)
        recorded: list[bytes] = []
        rpc = await broker.rpc()
        original = rpc.call

        async def recording_call(*args, **kw):
            reply = await original(*args, **kw)
            recorded.extend([encode(args[2]), encode(reply)])
            return reply

        rpc.call = recording_call
        session = await client.open_session(rpc, broker.names, dev, suite=handshake.SIG_V1)
        rpc.call = original
        from schemas.codec import decode
        from schemas.messages import SessionAccept
        request = signing.unverified(decode(recorded[-2], Signed), SessionRequest)
        accept = decode(recorded[-1], SessionAccept)
        # The attacker holds the device's long-term KEM secret and tries it on the ciphertext.
        kem = pqc.get_kem(dev.identity.kem_alg)
        guess_ss = kem.decapsulate(dev.identity.kem_sk, accept.ciphertext)
        transcript = handshake.transcript_hash(recorded[-2], accept.ciphertext, accept.nonce, accept.session_id)
        guess = handshake.session_key(guess_ss, request.nonce, accept.nonce, transcript)
        assert guess != session.key
        # and the session key is not derivable from public transcript values alone
        assert session.key not in recorded[-1]


async def test_device_key_rotation(broker, settings):
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "device.rotated")
        dev = await enrolled(broker, coord, "cam-13", session=False)
        old = dev.identity
        rpc = await broker.rpc()
        await client.rotate_keys(rpc, broker.names, dev)
        await events.wait("device.rotated")
        assert coord.registry.get_device("cam-13").sig_fp == dev.identity.sig_fp != old.sig_fp
        await client.open_session(rpc, broker.names, dev)  # the new key works
        dev.identity = old
        await expect_reason(client.open_session(rpc, broker.names, dev), Reason.BAD_SIGNATURE)


async def test_coordinator_restart_between_token_and_enrollment(broker, settings):
    async with coordinator(settings) as coord:
        token = coord.registry.create_token("cam-14", 600)
        fp = coord.identity.sig_fp
    async with coordinator(settings) as coord:  # a new process: same keys, same registry
        assert coord.identity.sig_fp == fp
        dev = await enroll(broker, coord, "cam-14", token)
        rpc = await broker.rpc()
        await client.open_session(rpc, broker.names, dev)


async def test_coordinator_key_rotation_is_followed_by_devices_and_enclave(broker, settings):
    from coordinator.service import rotate_coordinator_keys
    from enclave_worker.service import Enclave
    from tests.test_rounds import honest_update, open_round, publish

    events = await EventLog.bind(broker, "coordinator.rotated", "update.accepted")
    async with coordinator(settings) as coord:
        old_fp = coord.identity.sig_fp
        enc = Enclave(settings)
        await enc.start(attest_timeout=15)  # admitted under the old key
        dev = await enrolled(broker, coord, "rot-1", session=False)
        old_token = coord.registry.create_token("rot-2", 600)
    try:
        old, new = await rotate_coordinator_keys(settings)
        assert old == old_fp != new
        await events.wait("coordinator.rotated")
        async with coordinator(settings) as coord:
            assert coord.identity.sig_fp == new
            rpc = await broker.rpc()
            # an enrolled device follows the chain from the key it pinned, and keeps kem-v3: its
            # MAC key was re-wrapped under the new coordinator key
            hellos = []
            original = rpc.call

            async def recording(*args, **kw):
                hellos.append(getattr(args[2], "suite", None))
                return await original(*args, **kw)

            rpc.call = recording
            await client.open_session(rpc, broker.names, dev)
            rpc.call = original
            assert hellos[-1] == "kem-v3"
            assert pqc.fingerprint(dev.coordinator_sig_pk, dev.coordinator_sig_alg) == new
            # a device given the old fingerprint before the rotation still enrolls
            await enroll(broker, coord, "rot-2", old_token)
            # the enclave learned the new key from the old one: grants signed by it pass
            await open_round(coord, broker, 1, ["rot-1"])
            await asyncio.sleep(0.3)
            _, key, body = honest_update(dev, enc, 1)
            await publish(broker, key, body)
            await events.wait("update.accepted")
    finally:
        await enc.stop()


async def test_forged_key_chain_is_refused():
    from common.handshake import follow_key_chain
    from schemas.messages import CoordinatorKeys

    a, b, mallory = (Identity.generate("ML-DSA-44", "ML-KEM-768") for _ in range(3))

    def keys(i: Identity, prev: Identity | None = None) -> CoordinatorKeys:
        return CoordinatorKeys(sig_alg=i.sig_alg, sig_pk=i.sig_pk, kem_alg=i.kem_alg, kem_pk=i.kem_pk,
                               issued_at=time.time(), previous_sig_alg=prev.sig_alg if prev else None,
                               previous_sig_pk=prev.sig_pk if prev else None)

    current_b = encode(signing.sign(keys(b), b.sig_alg, b.sig_sk, b.sig_pk))
    genuine = encode(signing.sign(keys(b, a), a.sig_alg, a.sig_sk, a.sig_pk))
    assert follow_key_chain(current_b, [genuine], a.sig_fp).sig_pk == b.sig_pk
    # mallory claims to be a's successor but cannot sign with a's key
    forged = encode(signing.sign(keys(mallory, a), mallory.sig_alg, mallory.sig_sk, mallory.sig_pk))
    current_m = encode(signing.sign(keys(mallory), mallory.sig_alg, mallory.sig_sk, mallory.sig_pk))
    with pytest.raises(QflareError) as exc:
        follow_key_chain(current_m, [forged], a.sig_fp)
    assert exc.value.reason == Reason.BAD_SIGNATURE
    # without any rotation, a current key that is not the pinned one is refused
    with pytest.raises(QflareError):
        follow_key_chain(current_b, [], a.sig_fp)


async def test_control_traffic_is_protected_by_the_session_key(broker, settings):
    from common.handshake import TO_COORDINATOR, seal_call
    from schemas.messages import SessionCall, StatusRequest

    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "ctl-1")
        rpc = await broker.rpc()
        st = await client.status(rpc, broker.names, dev)
        assert st.device_id == "ctl-1" and st.status == "active"
        sess = dev.session
        call = lambda seq, key: rpc.call(
            broker.names.rpc_exchange, Names.COORDINATOR_KEY,
            SessionCall(session_id=sess.session_id, seq=seq, ciphertext=seal_call(
                key, sess.session_id, seq, TO_COORDINATOR, encode(StatusRequest()))), SessionCall, 10)
        await expect_reason(call(sess.seq, sess.key), Reason.REPLAY)  # a recorded call, sent again
        await expect_reason(call(sess.seq + 5, b"\0" * 32), Reason.BAD_SIGNATURE)  # without the key
        await coord.revoke("ctl-1")
        await expect_reason(client.status(rpc, broker.names, dev), Reason.REVOKED)
    async with coordinator(settings) as coord:  # the session outlives a restart, and so does the revocation
        await expect_reason(client.status(rpc, broker.names, dev), Reason.REVOKED)


async def test_a_session_outlives_a_coordinator_restart_and_a_replay_stays_refused(broker, settings):
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "ctl-2")
        rpc = await broker.rpc()
        assert (await client.status(rpc, broker.names, dev)).status == "active"
    async with coordinator(settings):  # keys and sequence numbers are in the registry
        assert (await client.status(rpc, broker.names, dev)).status == "active"
        dev.session.seq -= 1  # the last call's sequence number again
        await expect_reason(client.status(rpc, broker.names, dev), Reason.REPLAY)


async def test_session_requests_are_rate_limited_per_device(broker, settings):
    settings = settings.model_copy(update={"rate_limits": settings.rate_limits.model_copy(
        update={"session_per_device_burst": 2, "session_per_device_per_s": 0.001})})
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "chatty", session=False)
        rpc = await broker.rpc()
        for _ in range(2):
            await client.open_session(rpc, broker.names, dev)
        await expect_reason(client.open_session(rpc, broker.names, dev), Reason.RATE_LIMITED)
        # another device is not affected
        other = await enrolled(broker, coord, "quiet", session=False)
        await client.open_session(rpc, broker.names, other)
