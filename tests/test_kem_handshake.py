"""Handshake kem-v2 (docs/crypto.md, "KEM handshake"): known answers for its constructions,
properties of the key confirmation and the grant MAC, one test per way it could fail, and
the session end to end over the real broker beside the old sig-v1 handshake."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import pqc
from common import handshake
from edge_agent import client
from enclave_worker import intake
from pqc.identity import Identity
from schemas.codec import decode, encode
from schemas.messages import (
    GrantMac,
    SessionCall,
    SessionConfirm,
    SessionGrant,
    SessionHello,
    StatusRequest,
    UpdateHeader,
)
from schemas.names import Names
from schemas.reasons import QflareError, Reason
from tests.services import EventLog, coordinator, enclave, enrolled
from tests.test_rounds import honest_update, open_round, publish

# --- an independent reading of docs/crypto.md, to check the implementation against ----------


def _lp(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:  # RFC 5869 with SHA-256
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm, i = okm + block, i + 1
    return okm[:length]


SS_E, SS_S, SS_D = bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))
DN, CN = b"\x11" * 32, b"\x22" * 32
SID = "0123456789abcdef"


def test_rfc5869_hkdf_reading_matches_pqc():
    """The test's HKDF is RFC 5869's (test case 1), and so is pqc.hkdf_sha256."""
    ikm, salt, info = bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA))
    okm = ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
           "34007208d5b887185865")
    assert _hkdf(ikm, salt, info, 42).hex() == okm
    assert pqc.hkdf_sha256(ikm, salt, info, 42).hex() == okm


@hsettings(max_examples=80, deadline=None)
@given(st.binary(max_size=100), st.binary(max_size=80), st.binary(max_size=100), st.integers(1, 255 * 32))
def test_pqc_hkdf_is_cryptographys_hkdf(ikm, salt, info, length):
    """pqc.hkdf_sha256 (written over hmac.digest for speed) gives exactly what cryptography's
    HKDF gives, for any input, salt (empty included) and length."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    want = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
    assert pqc.hkdf_sha256(ikm, salt, info, length) == want


def test_kem_v2_known_answers():
    t = handshake.kem_transcript(b"hello", b"ct-e", b"ct-d", CN, SID)
    assert t == hashlib.sha3_256(_lp(b"hello", b"ct-e", b"ct-d", CN, SID.encode())).digest()
    assert t.hex() == "f95235134589da5e801c93c9dc77b4e08a734456590ec4c91b0100a88c450e5d"
    f = handshake.kem_final_transcript(t, b"grant", b"\x33" * 32)
    assert f == hashlib.sha3_256(_lp(t, b"grant", b"\x33" * 32)).digest()
    assert f.hex() == "7bac2ad3d2d93b65ab269366b1bf4f806c2e8be8e1691bafaa5bc1eef279befb"

    key, confirm_key = handshake.kem_session_keys(SS_E, SS_S, SS_D, DN, CN, f)
    okm = _hkdf(_lp(SS_E, SS_S, SS_D), DN + CN, b"qflare/v2/session-keys" + f, 64)
    assert (key, confirm_key) == (okm[:32], okm[32:])
    assert key.hex() == "2f5091f6cb4dfe749f6c1695f4ec96b92cab93e7871e8d0d4a784c61e5a35091"
    assert confirm_key.hex() == "3b17d89be95ca3129ad55f39a7635c93caff5eddc2866f71591dfee2d4471871"
    tag = handshake.confirm_tag(confirm_key, f)
    assert tag == hmac.new(confirm_key, b"qflare/v2/coordinator-finished" + f, hashlib.sha256).digest()
    assert tag.hex() == "b14a48cfbf8a41c42485969e7502dbc27406a2ffbf66b9f7f944f023e5e807a1"

    enclave = handshake.enclave_identity("m" * 64, "ML-KEM-768", b"kem-pk", "ML-DSA-44", b"sig-pk")
    assert enclave == hashlib.sha3_256(b"qflare/v2/enclave\0" + _lp(b"m" * 64, b"ML-KEM-768", b"kem-pk",
                                                                      b"ML-DSA-44", b"sig-pk")).digest()
    assert enclave.hex() == "3bcc7db9553b1a4fccf1b11d21a89db58e4fedf1890a327ead71cd6dffa39d38"
    root = handshake.grant_root(b"\x44" * 64)
    assert root == _hkdf(b"\x44" * 64, b"", b"qflare/v2/grant-root", 32)
    gk = handshake.grant_key(root, enclave)
    assert gk == _hkdf(root, enclave, b"qflare/v2/grant-key", 32)
    assert gk.hex() == "efdf866e34a90f73439e345c419ab79cff9b738d2092e17baaf3a3aa2c1cf181"
    assert handshake.grant_key_id(gk) == hashlib.sha3_256(b"qflare/v2/grant-key-id\0" + gk).digest()[:16]
    assert handshake.grant_key_id(gk).hex() == "0c569a97b81c19db5706a1690d4096c7"
    gtag = handshake.grant_tag(gk, b"body")
    assert gtag == hmac.new(gk, b"qflare/v2/grant\0body", hashlib.sha256).digest()
    assert gtag.hex() == "2f746a36fd6ed46ef3f1ae0162d7acaeef0481b3c7dbfd8d86b5222e339cf200"
    assert handshake.kem_session_id(DN) == "acfe0c688afd000b05b106d9bf55616b"


@hsettings(max_examples=60, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 255), st.sampled_from(["eph", "static", "device"]))
def test_key_confirmation_fails_without_any_one_secret(transcript, bit, which):
    """A responder missing any one of the three KEM secrets (a wrong guess) cannot make the
    tag, and a tag for one transcript never confirms another."""
    secrets_ = {"eph": SS_E, "static": SS_S, "device": SS_D}
    _, good = handshake.kem_session_keys(SS_E, SS_S, SS_D, DN, CN, transcript)
    wrong = bytearray(secrets_[which])
    wrong[bit % 32] ^= 1 << (bit % 8)
    guessed = {**secrets_, which: bytes(wrong)}
    _, bad = handshake.kem_session_keys(guessed["eph"], guessed["static"], guessed["device"], DN, CN, transcript)
    assert not handshake.tags_equal(handshake.confirm_tag(bad, transcript), handshake.confirm_tag(good, transcript))
    other = bytearray(transcript)
    other[bit % 32] ^= 1 << (bit % 8)
    assert not handshake.tags_equal(handshake.confirm_tag(good, bytes(other)),
                                    handshake.confirm_tag(good, transcript))


@hsettings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(0, 10_000))
def test_grant_mac_covers_every_bit_of_the_grant(body, bit):
    key = secrets.token_bytes(32)
    flipped = bytearray(body)
    flipped[bit % len(body)] ^= 1 << (bit % 8)
    assert handshake.grant_tag(key, bytes(flipped)) != handshake.grant_tag(key, body)
    assert handshake.grant_tag(secrets.token_bytes(32), body) != handshake.grant_tag(key, body)


def test_enroll_reply_opens_only_under_its_key_and_device():
    key = secrets.token_bytes(32)
    sealed = handshake.seal_enroll_accept(key, "cam-1", b"accept")
    assert handshake.open_enroll_accept(key, "cam-1", sealed) == b"accept"
    assert handshake.open_enroll_accept(secrets.token_bytes(32), "cam-1", sealed) is None
    assert handshake.open_enroll_accept(key, "cam-2", sealed) is None  # bound to the device id
    assert handshake.open_enroll_accept(key, "cam-1", sealed[:-1] + bytes([sealed[-1] ^ 1])) is None


# --- what the enclave verifies (enclave_worker/intake.py), without a broker ---------------------


class World:
    """One enclave's intake context and the grants a coordinator would issue it."""

    def __init__(self) -> None:
        self.device = Identity.generate("ML-DSA-44", "ML-KEM-768")
        self.enclave = Identity.generate("ML-DSA-44", "ML-KEM-768")
        self.report = b"report of this enclave"
        self.digest = handshake.enclave_digest(self.report)
        self.root = handshake.grant_root(secrets.token_bytes(64))
        self.key = handshake.grant_key(self.root, self.name(self.enclave))

    @staticmethod
    def name(ident: Identity, code: str = "c" * 64) -> bytes:
        return handshake.enclave_identity(code, ident.kem_alg, ident.kem_pk, ident.sig_alg, ident.sig_pk)

    def context(self, **over) -> intake.IntakeContext:
        fields = {"coordinator_keys": {}, "kem_alg": self.enclave.kem_alg, "kem_sk": self.enclave.kem_sk,
                      "kem_fp": self.enclave.kem_fp, "open_round": 1, "layout_id": "L", "n_params": 4, "revoked": frozenset(),
                      "policy": pqc.Policy(), "now": time.time(), "report_digests": frozenset({self.digest}),
                      "grant_keys": {handshake.grant_key_id(self.key): intake.GrantKeyEntry(self.key)}}
        fields.update(over)
        return intake.IntakeContext(**fields)

    def grant(self, *, key: bytes | None = None, tag: bytes | None = None, **over) -> bytes:
        fields = {"device_id": "cam-1", "session_id": "s" * 32, "sig_alg": self.device.sig_alg, "sig_pk": self.device.sig_pk,
                      "sig_fp": self.device.sig_fp, "issued_at": time.time(), "not_after": time.time() + 600,
                      "transcript": bytes(32), "enclave_digest": self.digest}
        fields.update(over)
        body = encode(SessionGrant(**fields))
        key = key or self.key
        return encode(GrantMac(body=body, key_id=handshake.grant_key_id(key),
                               tag=tag or handshake.grant_tag(key, body)))

    def header(self, grant: bytes, device_id: str = "cam-1") -> UpdateHeader:
        return UpdateHeader(device_id=device_id, grant=grant, round_id=1, update_id=secrets.token_hex(8),
                            base_version=0, num_samples=1, timestamp=time.time(), layout_id="L",
                            kem_alg=self.enclave.kem_alg, enclave_kem_fp=self.enclave.kem_fp)


def refused(world: World, grant: bytes, reason: Reason, **ctx) -> None:
    with pytest.raises(QflareError) as exc:
        intake.admit(world.header(grant), "cam-1", world.context(**ctx), seen=False)
    assert exc.value.reason == reason, exc.value


def test_a_maced_grant_is_admitted():
    w = World()
    assert intake.admit(w.header(w.grant()), "cam-1", w.context(), seen=False).device_id == "cam-1"


def test_a_forged_or_altered_grant_is_refused():
    w = World()
    refused(w, w.grant(tag=bytes(32)), Reason.BAD_GRANT)  # a made-up tag
    genuine = decode(w.grant(), GrantMac)
    longer = encode(SessionGrant(**{**decode(genuine.body, SessionGrant).model_dump(),
                                    "not_after": time.time() + 10 ** 6}))
    refused(w, encode(GrantMac(body=longer, key_id=genuine.key_id, tag=genuine.tag)), Reason.BAD_GRANT)
    refused(w, w.grant(key=secrets.token_bytes(32)), Reason.BAD_GRANT)  # a key nobody gave this enclave


def test_a_grant_for_another_enclave_is_refused():
    """The same coordinator's grants for another enclave (other keys, or other code with these
    keys, or none admitted yet) are MACed under keys this enclave never gets."""
    w = World()
    another_enclave = World.name(Identity.generate("ML-DSA-44", "ML-KEM-768"))
    other_code_same_keys = World.name(w.enclave, code="d" * 64)
    for name in (another_enclave, other_code_same_keys, b""):  # b"": issued before any admission
        refused(w, w.grant(key=handshake.grant_key(w.root, name)), Reason.BAD_GRANT)


def test_a_grant_issued_before_this_enclave_restarted_is_admitted():
    """The key names the enclave (code and kept keys), not one report: a restart (a new report
    of the same enclave, the earlier one still among its admitted reports) keeps its devices'
    grants, as signed grants are kept."""
    w = World()
    before = hashlib.sha3_256(b"the report before the restart").digest()
    earlier = w.grant(enclave_digest=before)
    ctx = w.context(report_digests=frozenset({w.digest, before}))
    assert intake.admit(w.header(earlier), "cam-1", ctx, seen=False).device_id == "cam-1"
    refused(w, w.grant(enclave_digest=hashlib.sha3_256(b"a report never admitted").digest()), Reason.BAD_GRANT)


def test_a_grant_key_rotated_out_vouches_only_for_earlier_grants():
    w = World()
    retired = {handshake.grant_key_id(w.key): intake.GrantKeyEntry(w.key, rotated_at=time.time() - 60)}
    refused(w, w.grant(), Reason.BAD_GRANT, grant_keys=retired)  # issued after the rotation
    older = w.grant(issued_at=time.time() - 120)
    assert intake.admit(w.header(older), "cam-1", w.context(grant_keys=retired), seen=False)


def test_a_grant_from_before_the_devices_key_change_is_superseded():
    w = World()
    refused(w, w.grant(issued_at=time.time() - 10), Reason.SUPERSEDED, key_epochs={"cam-1": time.time() - 5})


def test_an_expired_grant_or_one_for_another_device_is_refused():
    w = World()
    refused(w, w.grant(not_after=time.time() - 1), Reason.GRANT_EXPIRED)
    with pytest.raises(QflareError) as exc:
        intake.admit(w.header(w.grant(device_id="cam-2")), "cam-1", w.context(), seen=False)
    assert exc.value.reason == Reason.BAD_GRANT


def test_an_enclave_without_grant_keys_refuses_maced_grants():
    w = World()
    refused(w, w.grant(), Reason.BAD_GRANT, grant_keys={})


# --- over the real broker ----------------------------------------------------------------------

async def hello_for(dev: client.Device, **over) -> SessionHello:
    kem = pqc.get_kem("ML-KEM-768")
    eph_pk, _ = kem.generate_keypair()
    ct, _ = pqc.get_kem(dev.coordinator_kem_alg).encapsulate(dev.coordinator_kem_pk)
    fields = {"suite": "kem-v2", "device_id": dev.device_id, "coordinator_kem_fp": pqc.fingerprint(
        dev.coordinator_kem_pk, dev.coordinator_kem_alg), "static_ct": ct, "eph_kem_alg": kem.name, "eph_pk": eph_pk,
        "nonce": secrets.token_bytes(32), "timestamp": time.time()}
    fields.update(over)
    return SessionHello(**fields)


async def expect_reason(coro, reason: Reason) -> QflareError:
    with pytest.raises(QflareError) as exc:
        await coro
    assert exc.value.reason == reason, exc.value
    return exc.value


@pytest.mark.broker
async def test_kem_v2_session_end_to_end_and_sig_v1_still_negotiable(broker, settings):
    """The default handshake over the broker: enrolment answered under the reply key, the
    session confirmed, the grant admitted by the attested enclave; sig-v1 beside it."""
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "sessions.#")
        dev = await enrolled(broker, coord, "kem-1", session=False)
        assert dev.coordinator_kem_pk == coord.identity.kem_pk
        rpc = await broker.rpc()
        sess = await client.open_session(rpc, broker.names, dev, suite=handshake.KEM_V2)
        assert decode(sess.grant, GrantMac)  # a MACed grant, no coordinator signature
        assert (await client.status(rpc, broker.names, dev)).status == "active"  # the session key works
        ev = await EventLog.bind(broker, "update.#", "round.opened")
        await open_round(coord, broker, 1, ["kem-1", "sig-1"])
        await ev.wait("round.opened")
        _, key, body = honest_update(dev, enc, 1, 0)
        await publish(broker, key, body)
        await ev.wait("update.accepted")  # the attested enclave verified the MACed grant
        old = await client.open_session(rpc, broker.names, dev, suite=handshake.SIG_V1)  # the old path
        assert old.session_id != sess.session_id
        assert (await client.status(rpc, broker.names, dev)).status == "active"
        sig_dev = await client.enroll(rpc, broker.names, "sig-1", coord.registry.create_token("sig-1", 600),
                                      coord.identity.sig_fp, sig_alg="ML-DSA-44", kem_alg="ML-KEM-768",
                                      suite=handshake.SIG_V1)
        await client.open_session(rpc, broker.names, sig_dev, suite=handshake.SIG_V1)
        _, key, body = honest_update(sig_dev, enc, 1, 1)
        await publish(broker, key, body)
        await ev.wait("update.accepted", 2)  # a signed grant, as before
        opened = await events.wait("sessions.opened")
        assert opened[0].detail["count"] >= 1 and opened[0].detail["kem_v2"] >= 1


@pytest.mark.broker
async def test_a_wrong_key_confirmation_is_refused_by_the_device(broker, settings):
    """Whoever cannot decapsulate the device's static ciphertext (not the pinned coordinator)
    cannot make the tag; so is any change to the reply the tag covers."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "kem-2", session=False)
        rpc = await broker.rpc()
        original = rpc.call
        for change in ({"confirm": bytes(32)}, {"nonce": secrets.token_bytes(32)},
                       {"enclave_report": b"another report"}):
            async def altered(*args, change=change, **kw):
                reply = await original(*args, **kw)
                return reply.model_copy(update=change) if isinstance(reply, SessionConfirm) else reply

            rpc.call = altered
            await expect_reason(client.open_session(rpc, broker.names, dev, suite=handshake.KEM_V2), Reason.BAD_SIGNATURE)
        rpc.call = original
        await client.open_session(rpc, broker.names, dev, suite=handshake.KEM_V2)  # unaltered, it works


@pytest.mark.broker
async def test_an_impostor_coordinator_cannot_confirm(broker, settings):
    """An impostor answering the hello itself (it sees the hello, knows every public key,
    holds its own keys but not the pinned coordinator's static secret) makes a reply the
    device refuses: without ss_static its key-confirmation tag is wrong."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "kem-3", session=False)
        impostor = Identity.generate("ML-DSA-44", "ML-KEM-768")
        kem = pqc.get_kem("ML-KEM-768")
        rpc = await broker.rpc()

        async def impostor_answers(_exchange, _key, hello, _type, _timeout):
            eph_ct, ss_eph = kem.encapsulate(hello.eph_pk)
            device_ct, ss_device = kem.encapsulate(dev.identity.kem_pk)
            ss_static = kem.decapsulate(impostor.kem_sk, hello.static_ct)  # its best guess
            nonce, sid = secrets.token_bytes(32), handshake.kem_session_id(hello.nonce)
            t = handshake.kem_transcript(encode(hello), eph_ct, device_ct, nonce, sid)
            body = encode(SessionGrant(device_id=dev.device_id, session_id=sid, sig_alg=dev.identity.sig_alg,
                                       sig_pk=dev.identity.sig_pk, sig_fp=dev.identity.sig_fp, issued_at=time.time(),
                                       not_after=time.time() + 600, transcript=t))
            gkey = secrets.token_bytes(32)
            grant = encode(GrantMac(body=body, key_id=handshake.grant_key_id(gkey), tag=handshake.grant_tag(gkey, body)))
            final = handshake.kem_final_transcript(t, grant, None)
            _, ck = handshake.kem_session_keys(ss_eph, ss_static, ss_device, hello.nonce, nonce, final)
            return SessionConfirm(suite="kem-v2", device_id=dev.device_id, session_id=sid, eph_ct=eph_ct,
                                  device_ct=device_ct, nonce=nonce, grant=grant, confirm=handshake.confirm_tag(ck, final))

        rpc.call = impostor_answers
        err = await expect_reason(client.open_session(rpc, broker.names, dev, suite=handshake.KEM_V2), Reason.BAD_SIGNATURE)
        assert "key confirmation" in err.detail
        assert dev.session is None


@pytest.mark.broker
async def test_replayed_stale_misaddressed_and_unaccepted_hellos_are_refused(broker, settings):
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "kem-4", session=False)
        rpc = await broker.rpc()
        call = lambda h: rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, h, SessionConfirm, 10)
        hello = await hello_for(dev)
        await call(hello)
        await expect_reason(call(hello), Reason.REPLAY)  # the same hello again
        await expect_reason(call(await hello_for(dev, timestamp=time.time() - 3600)), Reason.STALE)
        await expect_reason(call(await hello_for(dev, coordinator_kem_fp="f" * 64)), Reason.UNSUPPORTED_ALGORITHM)
        await expect_reason(call(await hello_for(dev, device_id="ghost")), Reason.NOT_ENROLLED)
        await expect_reason(call(await hello_for(dev, static_ct=b"short")), Reason.MALFORMED)
    only_sig = settings.model_copy(update={"crypto": settings.crypto.model_copy(
        update={"accepted_handshakes": ["sig-v1"]})})
    async with coordinator(only_sig):
        await expect_reason(call(await hello_for(dev)), Reason.UNSUPPORTED_ALGORITHM)
        await client.open_session(rpc, broker.names, dev, suite=handshake.SIG_V1)
    only_kem = settings.model_copy(update={"crypto": settings.crypto.model_copy(
        update={"accepted_handshakes": ["kem-v2"]})})
    async with coordinator(only_kem):
        await expect_reason(client.open_session(rpc, broker.names, dev, suite=handshake.SIG_V1),
                            Reason.UNSUPPORTED_ALGORITHM)


@pytest.mark.broker
async def test_a_hello_sent_for_another_device_gives_no_usable_session(broker, settings):
    """Device authentication: the coordinator also encapsulates to the enrolled device's KEM
    key, so a sender without that key (here: a guess) cannot derive the session key."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "kem-5", session=False)
        rpc = await broker.rpc()
        kem = pqc.get_kem("ML-KEM-768")
        eph_pk, eph_sk = kem.generate_keypair()
        static_ct, ss_static = kem.encapsulate(coord.identity.kem_pk)
        hello = await hello_for(dev, eph_pk=eph_pk, static_ct=static_ct)
        reply = await rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, hello, SessionConfirm, 10)
        ss_eph = kem.decapsulate(eph_sk, reply.eph_ct)
        attacker = Identity.generate("ML-DSA-44", "ML-KEM-768")
        guess = kem.decapsulate(attacker.kem_sk, reply.device_ct)  # not the enrolled key
        final = handshake.kem_final_transcript(
            handshake.kem_transcript(encode(hello), reply.eph_ct, reply.device_ct, reply.nonce, reply.session_id),
            reply.grant, handshake.enclave_digest(reply.enclave_report))
        key, confirm_key = handshake.kem_session_keys(ss_eph, ss_static, guess, hello.nonce, reply.nonce, final)
        assert handshake.confirm_tag(confirm_key, final) != reply.confirm
        call = SessionCall(session_id=reply.session_id, seq=1, ciphertext=handshake.seal_call(
            key, reply.session_id, 1, handshake.TO_COORDINATOR, encode(StatusRequest())))
        await expect_reason(rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, call, SessionCall, 10),
                            Reason.BAD_SIGNATURE)


@pytest.mark.broker
async def test_kem_v2_session_key_is_forward_secret(broker, settings):
    """Everything on the wire plus both long-term KEM secrets (the device's and the
    coordinator's) still misses the secret of the discarded ephemeral key."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "kem-6", session=False)
        rpc = await broker.rpc()
        recorded = []
        original = rpc.call

        async def recording_call(*args, **kw):
            reply = await original(*args, **kw)
            recorded.append((args[2], reply))
            return reply

        rpc.call = recording_call
        session = await client.open_session(rpc, broker.names, dev, suite=handshake.KEM_V2)
        rpc.call = original
        hello, reply = recorded[-1]
        kem = pqc.get_kem("ML-KEM-768")
        ss_static = kem.decapsulate(coord.identity.kem_sk, hello.static_ct)
        ss_device = kem.decapsulate(dev.identity.kem_sk, reply.device_ct)
        final = handshake.kem_final_transcript(
            handshake.kem_transcript(encode(hello), reply.eph_ct, reply.device_ct, reply.nonce, reply.session_id),
            reply.grant, handshake.enclave_digest(reply.enclave_report))
        for guess in (kem.decapsulate(dev.identity.kem_sk, reply.eph_ct),
                      kem.decapsulate(coord.identity.kem_sk, reply.eph_ct)):
            key, _ = handshake.kem_session_keys(guess, ss_static, ss_device, hello.nonce, reply.nonce, final)
            assert key != session.key
