"""Handshake kem-v3 (docs/crypto.md, "kem-v3"): kem-v2 with the device authenticated by a MAC
key from its enrolment instead of a third KEM operation. Known answers for its constructions,
then one test per attack: replay, a forged or altered hello, a device using another's key, a
revoked device, a rotated device's old key, key-confirmation forgery (even by a holder of the
device's MAC key), and forward secrecy; and the fall-back to kem-v2."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time

import pytest

import pqc
from common import handshake
from coordinator import session_keys
from coordinator.registry import Registry
from coordinator.service import META_ENCLAVE_REPORT, rewrap_device_keys
from edge_agent import client
from pqc.identity import Identity
from schemas.codec import decode, encode
from schemas.messages import GrantMac, SessionConfirm, SessionGrant, SessionHello
from schemas.names import Names
from schemas.reasons import Reason
from tests.services import EventLog, coordinator, enrolled
from tests.test_kem_handshake import CN, DN, SS_E, SS_S, _hkdf, _lp, expect_reason


def test_kem_v3_known_answers():
    """An independent reading of docs/crypto.md against the implementation."""
    reply_key, fp = bytes(range(32)), "ab" * 32
    auth = handshake.device_auth_key(reply_key, "dev-1", fp)
    assert auth == _hkdf(reply_key, b"", b"qflare/v3/device-auth" + _lp(b"dev-1", fp.encode()), 32)
    assert auth != handshake.device_auth_key(reply_key, "dev-2", fp)
    assert auth != handshake.device_auth_key(reply_key, "dev-1", "cd" * 32)
    tag = handshake.hello_tag(auth, "kem-v3", "dev-1", "f" * 64, b"ct", "ML-KEM-768", b"ek", DN, 1.5)
    body = _lp(b"kem-v3", b"dev-1", b"f" * 64, b"ct", b"ML-KEM-768", b"ek", DN, struct.pack(">d", 1.5))
    assert tag == hmac.new(auth, b"qflare/v3/device-hello\0" + body, hashlib.sha256).digest()
    tr = handshake.kem_v3_transcript(tag, b"ct-e", CN, "0123456789abcdef")
    assert tr == hashlib.sha3_256(b"qflare/v3/transcript\0" + _lp(tag, b"ct-e", CN, b"0123456789abcdef")).digest()
    t = hashlib.sha3_256(b"final").digest()
    key, confirm_key = handshake.kem_v3_session_keys(SS_E, SS_S, auth, DN, CN, t)
    okm = _hkdf(_lp(SS_E, SS_S, auth), DN + CN, b"qflare/v3/session-keys" + t, 64)
    assert (key, confirm_key) == (okm[:32], okm[32:])
    # never the kem-v2 keys of the same secrets: the suites do not mix
    assert key not in handshake.kem_session_keys(SS_E, SS_S, auth, DN, CN, t)


def v3_hello(dev: client.Device, auth_key: bytes | None = None, **over) -> tuple[SessionHello, bytes, bytes]:
    """A kem-v3 hello of ``dev``, MACed under ``auth_key`` (default: its own) after ``over``."""
    kem = pqc.get_kem("ML-KEM-768")
    eph_pk, eph_sk = kem.generate_keypair()
    ct, ss_static = pqc.get_kem(dev.coordinator_kem_alg).encapsulate(dev.coordinator_kem_pk)
    fields = {"suite": "kem-v3", "device_id": dev.device_id, "coordinator_kem_fp": pqc.fingerprint(
        dev.coordinator_kem_pk, dev.coordinator_kem_alg), "static_ct": ct, "eph_kem_alg": kem.name, "eph_pk": eph_pk,
        "nonce": secrets.token_bytes(32), "timestamp": time.time()}
    fields.update(over)
    fields["auth_tag"] = handshake.hello_tag(auth_key or dev.auth_key, **fields)
    return SessionHello(**fields), eph_sk, ss_static


def caller(broker, rpc):
    return lambda h: rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, h, SessionConfirm, 10)


@pytest.mark.broker
async def test_kem_v3_session_end_to_end_is_the_default(broker, settings):
    """Enrolment gives both ends the MAC key (kept wrapped in the registry, never in the
    clear); the default session is kem-v3, one decapsulation and one encapsulation on the
    coordinator, no ciphertext to the device's KEM key; its key works for calls."""
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "sessions.#")
        dev = await enrolled(broker, coord, "v3-1", session=False)
        assert dev.auth_key is not None and len(dev.auth_key) == 32
        found = coord.registry.get_device_auth("v3-1")
        assert found is not None and found[1] is not None and dev.auth_key not in found[1]
        rpc = await broker.rpc()
        seen = []
        original = rpc.call

        async def recording(*args, **kw):
            reply = await original(*args, **kw)
            seen.append((args[2], reply))
            return reply

        rpc.call = recording
        sess = await client.open_session(rpc, broker.names, dev)
        rpc.call = original
        hello, reply = seen[-1]
        assert hello.suite == "kem-v3" and hello.auth_tag is not None
        assert reply.suite == "kem-v3" and reply.device_ct is None
        assert decode(decode(sess.grant, GrantMac).body, SessionGrant).device_id == "v3-1"
        assert (await client.status(rpc, broker.names, dev)).status == "active"
        await client.open_session(rpc, broker.names, dev, suite=handshake.KEM_V2)  # still negotiable
        await client.open_session(rpc, broker.names, dev, suite=handshake.SIG_V1)
        opened = await events.wait("sessions.opened")
        assert opened[0].detail["kem_v3"] >= 1


@pytest.mark.broker
async def test_kem_v3_reply_bytes_are_the_validated_models_encoding(broker, settings):
    """The handler answers with encode_fields (no model): decoded and validated, then encoded
    again, the reply must give the same bytes, or a field is missing, misordered or invalid
    (the device reads what the confirm tag covers from these bytes)."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "v3-bytes", session=False)
        raw = await coord.handle(v3_hello(dev)[0], "bench")
        assert isinstance(raw, bytes)
        confirm = decode(raw, SessionConfirm)
        assert encode(confirm) == raw and confirm.suite == "kem-v3" and confirm.device_ct is None
        assert confirm.enclave_report == coord.registry.get_meta(META_ENCLAVE_REPORT)


@pytest.mark.broker
async def test_kem_v3_replayed_hello_is_refused(broker, settings):
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "v3-2", session=False)
        call = caller(broker, await broker.rpc())
        hello, _, _ = v3_hello(dev)
        await call(hello)
        await expect_reason(call(hello), Reason.REPLAY)
        await expect_reason(call(v3_hello(dev, timestamp=time.time() - 3600)[0]), Reason.STALE)


@pytest.mark.broker
async def test_kem_v3_forged_or_altered_hello_is_refused(broker, settings):
    """Without the device's MAC key no hello passes, and no field of a MACed one can change;
    refused before any KEM operation or registry write."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "v3-3", session=False)
        call = caller(broker, await broker.rpc())
        await expect_reason(call(v3_hello(dev, auth_key=secrets.token_bytes(32))[0]), Reason.BAD_SIGNATURE)
        hello, _, _ = v3_hello(dev)
        for change in ({"auth_tag": None}, {"eph_pk": pqc.get_kem("ML-KEM-768").generate_keypair()[0]},
                       {"nonce": secrets.token_bytes(32)}, {"timestamp": hello.timestamp + 1}):
            await expect_reason(call(hello.model_copy(update=change)), Reason.BAD_SIGNATURE)
        assert coord.registry.get_session(handshake.kem_session_id(hello.nonce)) is None
        await call(hello)  # unaltered, it opens


@pytest.mark.broker
async def test_kem_v3_device_using_another_devices_key_is_refused(broker, settings):
    """Device B's hello MACed with device A's key (A's key in B's name) is refused: each key is
    bound to its device's id and enrolled signature key."""
    async with coordinator(settings) as coord:
        a = await enrolled(broker, coord, "v3-4a", session=False)
        b = await enrolled(broker, coord, "v3-4b", session=False)
        call = caller(broker, await broker.rpc())
        await expect_reason(call(v3_hello(b, auth_key=a.auth_key)[0]), Reason.BAD_SIGNATURE)
        b_as_a = client.Device(**{**b.__dict__, "auth_key": a.auth_key})
        await expect_reason(client.open_session(await broker.rpc(), broker.names, b_as_a), Reason.BAD_SIGNATURE)
        await call(v3_hello(b)[0])  # its own key works


@pytest.mark.broker
async def test_kem_v3_revoked_device_is_refused(broker, settings):
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "v3-5", session=False)
        await coord.revoke("v3-5")
        await expect_reason(caller(broker, await broker.rpc())(v3_hello(dev)[0]), Reason.REVOKED)
        await expect_reason(client.open_session(await broker.rpc(), broker.names, dev), Reason.REVOKED)


@pytest.mark.broker
async def test_kem_v3_rotated_devices_old_key_is_refused(broker, settings):
    """After a device key rotation its enrolment MAC key is no longer honoured (a thief of the
    old keys cannot use it); the device goes on with kem-v2, authenticated by its new KEM key."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "v3-6", session=False)
        old_auth, rpc = dev.auth_key, await broker.rpc()
        await client.rotate_keys(rpc, broker.names, dev)
        assert dev.auth_key is None
        stolen = client.Device(**{**dev.__dict__, "auth_key": old_auth})
        err = await expect_reason(caller(broker, rpc)(v3_hello(stolen)[0]), Reason.UNSUPPORTED_ALGORITHM)
        assert "kem-v2" in err.detail
        seen = []
        original = rpc.call

        async def recording(*args, **kw):
            seen.append(args[2])
            return await original(*args, **kw)

        rpc.call = recording
        await client.open_session(rpc, broker.names, dev)  # asks kem-v3, gets kem-v2
        assert [h.suite for h in seen if isinstance(h, SessionHello)] == ["kem-v2"]
        seen.clear()
        await client.open_session(rpc, broker.names, stolen)  # refused kem-v3, falls back, works
        assert [h.suite for h in seen if isinstance(h, SessionHello)] == ["kem-v3", "kem-v2"]
        assert stolen.auth_key is None  # and asks kem-v2 from now on, not kem-v3 first every time


@pytest.mark.broker
async def test_kem_v3_key_confirmation_forgery_is_refused(broker, settings):
    """An impostor coordinator holding even the device's MAC key (the worst case: it leaked)
    but not the pinned coordinator's static secret cannot confirm; nor does any change to a
    real reply pass."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "v3-7", session=False)
        rpc = await broker.rpc()
        original = rpc.call
        for change in ({"confirm": bytes(32)}, {"nonce": secrets.token_bytes(32)},
                       {"device_ct": b"\x01" * 1088}, {"suite": "kem-v2"}):
            async def altered(*args, change=change, **kw):
                reply = await original(*args, **kw)
                return reply.model_copy(update=change) if isinstance(reply, SessionConfirm) else reply

            rpc.call = altered
            await expect_reason(client.open_session(rpc, broker.names, dev), Reason.BAD_SIGNATURE)
        impostor = Identity.generate("ML-DSA-44", "ML-KEM-768")
        kem = pqc.get_kem("ML-KEM-768")

        async def impostor_answers(_exchange, _key, hello, _type, _timeout):
            eph_ct, ss_eph = kem.encapsulate(hello.eph_pk)
            ss_static = kem.decapsulate(impostor.kem_sk, hello.static_ct)  # its best guess
            nonce, sid = secrets.token_bytes(32), handshake.kem_session_id(hello.nonce)
            t = handshake.kem_v3_transcript(hello.auth_tag, eph_ct, nonce, sid)
            body = encode(SessionGrant(device_id=dev.device_id, session_id=sid, sig_alg=dev.identity.sig_alg,
                                       sig_pk=dev.identity.sig_pk, sig_fp=dev.identity.sig_fp, issued_at=time.time(),
                                       not_after=time.time() + 600, transcript=t))
            gkey = secrets.token_bytes(32)
            grant = encode(GrantMac(body=body, key_id=handshake.grant_key_id(gkey), tag=handshake.grant_tag(gkey, body)))
            final = handshake.kem_final_transcript(t, grant, None)
            _, ck = handshake.kem_v3_session_keys(ss_eph, ss_static, dev.auth_key, hello.nonce, nonce, final)
            return SessionConfirm(suite="kem-v3", device_id=dev.device_id, session_id=sid, eph_ct=eph_ct,
                                  nonce=nonce, grant=grant, confirm=handshake.confirm_tag(ck, final))

        rpc.call = impostor_answers
        err = await expect_reason(client.open_session(rpc, broker.names, dev), Reason.BAD_SIGNATURE)
        assert "key confirmation" in err.detail and dev.session is None
        rpc.call = original
        await client.open_session(rpc, broker.names, dev)  # the real coordinator, unaltered, confirms


@pytest.mark.broker
async def test_kem_v3_session_key_is_forward_secret(broker, settings):
    """Everything on the wire plus every long-term secret (the coordinator's KEM key, the
    device's MAC key and KEM key) still misses the discarded ephemeral key's secret."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "v3-8", session=False)
        rpc = await broker.rpc()
        hello, eph_sk, ss_static = v3_hello(dev)
        reply = await caller(broker, rpc)(hello)
        session = client.finish_kem_session(dev, hello, pqc.get_kem("ML-KEM-768"), eph_sk, ss_static, reply)
        kem = pqc.get_kem("ML-KEM-768")
        assert kem.decapsulate(coord.identity.kem_sk, hello.static_ct) == ss_static
        final = handshake.kem_final_transcript(
            handshake.kem_v3_transcript(hello.auth_tag, reply.eph_ct, reply.nonce, reply.session_id),
            reply.grant, handshake.enclave_digest(reply.enclave_report))
        for guess in (kem.decapsulate(dev.identity.kem_sk, reply.eph_ct),
                      kem.decapsulate(coord.identity.kem_sk, reply.eph_ct)):
            key, _ = handshake.kem_v3_session_keys(guess, ss_static, dev.auth_key, hello.nonce, reply.nonce, final)
            assert key != session.key
        ss_eph = kem.decapsulate(eph_sk, reply.eph_ct)  # with the ephemeral secret it is the key
        assert handshake.kem_v3_session_keys(ss_eph, ss_static, dev.auth_key, hello.nonce, reply.nonce,
                                             final)[0] == session.key


def test_a_coordinator_key_rotation_rewraps_device_keys(tmp_path):
    """The MAC keys stay usable across a coordinator key rotation (re-wrapped under the new
    identity), and the old identity's wrapping no longer opens them."""
    reg = Registry(str(tmp_path / "r.sqlite3"))
    old, new = (Identity.generate("ML-DSA-44", "ML-KEM-768") for _ in range(2))
    dev = reg.enroll_device("d1", old.sig_alg, old.sig_pk, old.kem_alg, old.kem_pk)
    aad, key = handshake.device_auth_aad("d1", dev.sig_fp), secrets.token_bytes(32)
    reg.set_device_auth("d1", dev.sig_fp, session_keys.wrap_device_key(
        session_keys.device_wrapping_key(old.kem_sk), aad, key))
    assert rewrap_device_keys(reg, old, new) == 1
    blob = reg.get_device_auth("d1")[1]
    assert session_keys.unwrap_device_key(session_keys.device_wrapping_key(new.kem_sk), aad, blob) == key
    assert session_keys.unwrap_device_key(session_keys.device_wrapping_key(old.kem_sk), aad, blob) is None
    assert session_keys.unwrap_device_key(session_keys.device_wrapping_key(new.kem_sk),
                                          handshake.device_auth_aad("d2", dev.sig_fp), blob) is None
    reg.close()


@pytest.mark.broker
async def test_kem_v3_refused_where_not_accepted_and_usable_once_it_is(broker, settings):
    """A coordinator that does not accept kem-v3 refuses it (the device falls back to kem-v2),
    yet keeps the device's MAC key from enrolment, so kem-v3 works once it is accepted."""
    only_v2 = settings.model_copy(update={"crypto": settings.crypto.model_copy(
        update={"accepted_handshakes": ["kem-v2", "sig-v1"]})})
    async with coordinator(only_v2) as coord:
        dev = await enrolled(broker, coord, "v3-9", session=False)
        call = caller(broker, await broker.rpc())
        await expect_reason(call(v3_hello(dev)[0]), Reason.UNSUPPORTED_ALGORITHM)
    async with coordinator(settings):
        await call(v3_hello(dev)[0])
