"""The device's half of enrollment, sessions and key rotation (docs/architecture.md steps 2-3).

Real devices (``qflare agent ...``) and the simulator share these functions. Each takes an
RPC client and returns verified results, or raises :class:`QflareError` with the
coordinator's reason code.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import pqc
from broker.messaging import RpcClient
from common import handshake
from pqc.identity import Identity
from schemas import signing
from schemas.codec import decode, encode
from schemas.messages import (
    AttestationReport,
    CoordinatorKeys,
    EnrollAccept,
    EnrollClaim,
    EnrollConfirm,
    EnrollRequest,
    GrantMac,
    KeyChain,
    KeyRotation,
    KeysRequest,
    RotationAccept,
    RotationRequest,
    SessionAccept,
    SessionCall,
    SessionConfirm,
    SessionGrant,
    SessionHello,
    SessionRequest,
    Signed,
    StatusReply,
    StatusRequest,
)
from schemas.names import Names
from schemas.reasons import QflareError, Reason


@dataclass
class Session:
    session_id: str
    key: bytes
    grant: bytes  # encoded Signed(SessionGrant) or GrantMac(SessionGrant), presented with every update
    not_after: float
    seq: int = 0


@dataclass
class Device:
    """An enrolled device: its keys, the pinned coordinator key and the attested enclave."""

    device_id: str
    identity: Identity
    coordinator_sig_alg: str
    coordinator_sig_pk: bytes
    enclave: AttestationReport | None = None
    session: Session | None = field(default=None, repr=False)
    #: The coordinator's static KEM key (handshake kem-v2 encapsulates to it), reached from the
    #: pinned signature key through the key chain; None until first learnt.
    coordinator_kem_alg: str | None = None
    coordinator_kem_pk: bytes | None = None
    #: The kem-v3 MAC key from enrolment (common/handshake.py: device_auth_key); None when the
    #: device enrolled without one (sig-v1, before kem-v3) or rotated its keys since.
    auth_key: bytes | None = field(default=None, repr=False)


def _enclave_report(raw: bytes | None) -> AttestationReport | None:
    # The coordinator admitted this report (platform signature and measurement) and signed
    # the reply carrying it; the device trusts the coordinator's admission.
    return signing.unverified(decode(raw, Signed), AttestationReport) if raw else None


async def coordinator_keys(rpc: RpcClient, names: Names, pinned_sig_fp: str, timeout: float) -> CoordinatorKeys:
    """The coordinator's current keys, reached from the pinned fingerprint through every
    rotation (each signed by the key it replaces)."""
    chain = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, KeysRequest(), KeyChain, timeout)
    return handshake.follow_key_chain(chain.current, chain.rotations, pinned_sig_fp)


async def refresh_coordinator_key(rpc: RpcClient, names: Names, device: Device, timeout: float = 15.0) -> bool:
    """Follow a coordinator key rotation from the device's pinned key; True if it changed."""
    keys = await coordinator_keys(rpc, names, pqc.fingerprint(device.coordinator_sig_pk, device.coordinator_sig_alg),
                                  timeout)
    changed = keys.sig_pk != device.coordinator_sig_pk or keys.kem_pk != device.coordinator_kem_pk
    device.coordinator_sig_alg, device.coordinator_sig_pk = keys.sig_alg, keys.sig_pk
    device.coordinator_kem_alg, device.coordinator_kem_pk = keys.kem_alg, keys.kem_pk
    return changed


async def enroll(rpc: RpcClient, names: Names, device_id: str, token: str, coordinator_fp: str, *,
                 sig_alg: str, kem_alg: str, timeout: float = 15.0, identity: Identity | None = None,
                 suite: str = handshake.DEFAULT_SUITE, keys: CoordinatorKeys | None = None,
                 keys_message: bytes | None = None) -> Device:
    """Enroll with a one-time token: new keys, proof of possession, sealed to the coordinator.

    ``suite`` kem-v2: the sealed claim carries a fresh reply key and the coordinator answers
    sealed under it (key confirmation) instead of signing. The coordinator's keys come from
    ``keys_message`` (the self-signed keys of a token file, ``TokenCreated.coordinator_keys``:
    checked here against ``coordinator_fp`` before anything is sent, so enrolment is one
    round trip), else ``keys`` (already reached from ``coordinator_fp``, e.g. shared by the
    devices of one simulated fleet), else the key chain fetched and walked here. A coordinator
    that rotated since those keys were given refuses (unsupported_algorithm, the token not
    spent): the device then walks the chain and tries once more.
    """
    fetched = False
    if keys_message is not None:
        keys = handshake.check_keys_message(keys_message, coordinator_fp)
    elif keys is None or pqc.fingerprint(keys.sig_pk, keys.sig_alg) != coordinator_fp:
        keys, fetched = await coordinator_keys(rpc, names, coordinator_fp, timeout), True
    ident = identity or Identity.generate(sig_alg, kem_alg)
    try:
        return await _enroll_with(rpc, names, device_id, token, ident, keys, suite, timeout)
    except QflareError as err:
        if err.reason != Reason.UNSUPPORTED_ALGORITHM or fetched:
            raise
        current = await coordinator_keys(rpc, names, coordinator_fp, timeout)
        if current.kem_pk == keys.kem_pk and current.sig_pk == keys.sig_pk:
            raise  # not a rotation: the refusal was about something else (policy, handshake)
        return await _enroll_with(rpc, names, device_id, token, ident, current, suite, timeout)


async def _enroll_with(rpc: RpcClient, names: Names, device_id: str, token: str, ident: Identity,
                       keys: CoordinatorKeys, suite: str, timeout: float) -> Device:
    """One EnrollRequest, sealed to ``keys`` (checked already), and its checked reply."""
    reply_key = secrets.token_bytes(32) if suite in handshake.KEM_SUITES else None
    claim = EnrollClaim(device_id=device_id, token=token, sig_alg=ident.sig_alg, sig_pk=ident.sig_pk,
                        kem_alg=ident.kem_alg, kem_pk=ident.kem_pk, nonce=secrets.token_bytes(32),
                        timestamp=time.time(), reply_key=reply_key)
    signed = signing.sign(claim, ident.sig_alg, ident.sig_sk, ident.sig_pk)
    sealed = pqc.seal(keys.kem_alg, keys.kem_pk, encode(signed), handshake.enroll_aad(device_id))
    req = EnrollRequest(device_id=device_id, kem_alg=keys.kem_alg, coordinator_kem_fp=pqc.fingerprint(keys.kem_pk, keys.kem_alg),
                        sealed=sealed)
    if reply_key is None:
        reply = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, req, Signed, timeout)
        accept = signing.verify(reply, EnrollAccept, keys.sig_alg, keys.sig_pk)
    else:
        confirm = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, req, EnrollConfirm, timeout)
        plain = handshake.open_enroll_accept(reply_key, device_id, confirm.sealed)
        if plain is None or confirm.device_id != device_id:
            raise QflareError(Reason.BAD_SIGNATURE, "enrollment reply is not sealed under this request's reply key")
        accept = decode(plain, EnrollAccept)
    if accept.request_nonce != claim.nonce or accept.device_id != device_id or accept.sig_fp != ident.sig_fp:
        raise QflareError(Reason.BAD_SIGNATURE, "enrollment reply does not answer this request")
    return Device(device_id, ident, keys.sig_alg, keys.sig_pk, _enclave_report(accept.enclave_report),
                  coordinator_kem_alg=keys.kem_alg, coordinator_kem_pk=keys.kem_pk,
                  auth_key=handshake.device_auth_key(reply_key, device_id, ident.sig_fp) if reply_key else None)


async def open_session(rpc: RpcClient, names: Names, device: Device, *, kem_alg: str = pqc.ids.DEFAULT_KEM,
                       timeout: float = 15.0, suite: str = handshake.DEFAULT_SUITE) -> Session:
    """Open a forward-secret session with handshake ``suite`` (kem-v3, kem-v2 or sig-v1).

    kem-v3 needs the device's MAC key from enrolment; without one (or when the coordinator
    keeps none for the device's current keys) the device uses kem-v2.
    """
    if suite == handshake.SIG_V1:
        return await _open_signed_session(rpc, names, device, kem_alg, timeout)
    if suite not in handshake.KEM_SUITES:
        raise QflareError(Reason.UNSUPPORTED_ALGORITHM, f"unknown handshake {suite!r} (kem-v3, kem-v2 or sig-v1)")
    if suite == handshake.KEM_V3 and device.auth_key is None:
        suite = handshake.KEM_V2
    if device.coordinator_kem_pk is None:  # enrolled before kem-v2: learn the KEM key from the chain
        await refresh_coordinator_key(rpc, names, device, timeout)
    try:
        return await _open_kem_session(rpc, names, device, kem_alg, timeout, suite)
    except QflareError as err:
        if err.reason != Reason.UNSUPPORTED_ALGORITHM:
            raise
        # the coordinator holds another KEM key: it rotated; follow the chain and try once more
        if await refresh_coordinator_key(rpc, names, device, timeout):
            return await _open_kem_session(rpc, names, device, kem_alg, timeout, suite)
        if suite != handshake.KEM_V3:
            raise
        # no kem-v3 here for this device (not accepted, or no key kept for it): kem-v2 from now
        # on, not a refused round trip before every session; it gets a key again at enrolment
        device.auth_key = None
        return await _open_kem_session(rpc, names, device, kem_alg, timeout, handshake.KEM_V2)


def kem_hello(device: Device, suite: str, kem: pqc.Kem) -> tuple[SessionHello, bytes, bytes]:
    """(hello, ephemeral secret key, static shared secret) of a kem-v2/kem-v3 handshake; a
    kem-v3 hello carries the device's MAC over its other fields."""
    assert device.coordinator_kem_alg is not None and device.coordinator_kem_pk is not None
    eph_pk, eph_sk = kem.generate_keypair()
    static_ct, ss_static = pqc.get_kem(device.coordinator_kem_alg).encapsulate(device.coordinator_kem_pk)
    fields = {"suite": suite, "device_id": device.device_id,
                  "coordinator_kem_fp": pqc.fingerprint(device.coordinator_kem_pk, device.coordinator_kem_alg),
                  "static_ct": static_ct, "eph_kem_alg": kem.name, "eph_pk": eph_pk, "nonce": secrets.token_bytes(32),
                  "timestamp": time.time()}
    if suite == handshake.KEM_V3:
        assert device.auth_key is not None
        fields["auth_tag"] = handshake.hello_tag(device.auth_key, **fields)
    return SessionHello(**fields), eph_sk, ss_static


async def _open_kem_session(rpc: RpcClient, names: Names, device: Device, kem_alg: str, timeout: float,
                            suite: str = handshake.KEM_V2) -> Session:
    """Handshake kem-v2 or kem-v3 (docs/crypto.md): encapsulate to the pinned coordinator KEM
    key, check its key confirmation; the ephemeral secret key is dropped before returning."""
    kem = pqc.get_kem(kem_alg)
    hello, eph_sk, ss_static = kem_hello(device, suite, kem)
    reply = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, hello, SessionConfirm, timeout)
    return finish_kem_session(device, hello, kem, eph_sk, ss_static, reply)


def finish_kem_session(device: Device, hello: SessionHello, kem: pqc.Kem, eph_sk: bytes, ss_static: bytes,
                       reply: SessionConfirm) -> Session:
    """Check a SessionConfirm against its hello (key confirmation, then the grant); the
    device's new session, or QflareError(bad_signature)."""
    ident = device.identity
    v3 = hello.suite == handshake.KEM_V3
    if reply.suite != hello.suite or (reply.device_ct is None) != v3:
        raise QflareError(Reason.BAD_SIGNATURE, "session reply is not of the handshake asked for")
    try:
        ss_eph = kem.decapsulate(eph_sk, reply.eph_ct)
        ss_device = device.auth_key if v3 else pqc.get_kem(ident.kem_alg).decapsulate(ident.kem_sk, reply.device_ct)
    except (ValueError, pqc.errors.QflareCryptoError):
        raise QflareError(Reason.BAD_SIGNATURE, "session reply carries malformed ciphertexts") from None
    del eph_sk  # forward secrecy: nothing kept can recompute ss_eph
    assert ss_device is not None
    if v3:
        assert hello.auth_tag is not None
        transcript = handshake.kem_v3_transcript(hello.auth_tag, reply.eph_ct, reply.nonce, reply.session_id)
    else:
        transcript = handshake.kem_transcript(encode(hello), reply.eph_ct, reply.device_ct, reply.nonce,
                                              reply.session_id)
    digest = handshake.enclave_digest(reply.enclave_report)
    final = handshake.kem_final_transcript(transcript, reply.grant, digest)
    derive = handshake.kem_v3_session_keys if v3 else handshake.kem_session_keys
    key, confirm_key = derive(ss_eph, ss_static, ss_device, hello.nonce, reply.nonce, final)
    if not handshake.tags_equal(handshake.confirm_tag(confirm_key, final), reply.confirm):
        raise QflareError(Reason.BAD_SIGNATURE, "session reply fails key confirmation (not the pinned coordinator)")
    grant = decode(decode(reply.grant, GrantMac).body, SessionGrant)
    if (grant.transcript != transcript or grant.device_id != device.device_id or reply.device_id != device.device_id
            or grant.session_id != reply.session_id or grant.sig_fp != ident.sig_fp or grant.enclave_digest != digest):
        raise QflareError(Reason.BAD_SIGNATURE, "session reply does not match its grant")
    if reply.enclave_report:
        device.enclave = _enclave_report(reply.enclave_report)
    device.session = Session(reply.session_id, key, reply.grant, grant.not_after)
    return device.session


async def _open_signed_session(rpc: RpcClient, names: Names, device: Device, kem_alg: str,
                               timeout: float) -> Session:
    """Handshake sig-v1: a signed request, a coordinator-signed grant; the ephemeral secret
    key is dropped before returning."""
    kem = pqc.get_kem(kem_alg)
    eph_pk, eph_sk = kem.generate_keypair()
    req = SessionRequest(device_id=device.device_id, eph_kem_alg=kem.name, eph_pk=eph_pk,
                         nonce=secrets.token_bytes(32), timestamp=time.time())
    ident = device.identity
    signed_req = signing.sign(req, ident.sig_alg, ident.sig_sk, ident.sig_pk)
    accept = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, signed_req, SessionAccept, timeout)
    signed_grant = decode(accept.grant, Signed)
    if signed_grant.signer != pqc.fingerprint(device.coordinator_sig_pk, device.coordinator_sig_alg):
        await refresh_coordinator_key(rpc, names, device, timeout)  # the coordinator rotated its key
    grant = signing.verify(signed_grant, SessionGrant, device.coordinator_sig_alg, device.coordinator_sig_pk)
    transcript = handshake.transcript_hash(encode(signed_req), accept.ciphertext, accept.nonce, accept.session_id)
    if (grant.transcript != transcript or grant.device_id != device.device_id
            or grant.session_id != accept.session_id or grant.sig_fp != ident.sig_fp
            or grant.enclave_digest != handshake.enclave_digest(accept.enclave_report)):
        raise QflareError(Reason.BAD_SIGNATURE, "session reply does not match its signed grant")
    ss = kem.decapsulate(eph_sk, accept.ciphertext)
    del eph_sk  # forward secrecy: nothing kept can recompute ss
    key = handshake.session_key(ss, req.nonce, accept.nonce, transcript)
    if accept.enclave_report:
        device.enclave = _enclave_report(accept.enclave_report)
    device.session = Session(accept.session_id, key, accept.grant, grant.not_after)
    return device.session


async def status(rpc: RpcClient, names: Names, device: Device, *, timeout: float = 15.0) -> StatusReply:
    """Ask the coordinator for this device's standing, under the session key."""
    sess = device.session
    if sess is None:
        raise QflareError(Reason.SESSION_UNKNOWN, "open a session first")
    sess.seq += 1
    call = SessionCall(session_id=sess.session_id, seq=sess.seq, ciphertext=handshake.seal_call(
        sess.key, sess.session_id, sess.seq, handshake.TO_COORDINATOR, encode(StatusRequest())))
    answer = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, call, SessionCall, timeout)
    payload = handshake.open_call(sess.key, sess.session_id, answer.seq, handshake.TO_DEVICE, answer.ciphertext)
    if payload is None or answer.seq != sess.seq or answer.session_id != sess.session_id:
        raise QflareError(Reason.BAD_SIGNATURE, "reply not protected by this session's key")
    return decode(payload, StatusReply)


async def rotate_keys(rpc: RpcClient, names: Names, device: Device, *, timeout: float = 15.0) -> Device:
    """Replace the device's keys: the request is signed by the old key and by the new one."""
    new = Identity.generate(device.identity.sig_alg, device.identity.kem_alg)
    claim = KeyRotation(device_id=device.device_id, sig_alg=new.sig_alg, sig_pk=new.sig_pk, kem_alg=new.kem_alg,
                        kem_pk=new.kem_pk, nonce=secrets.token_bytes(32), timestamp=time.time())
    old = device.identity
    req = RotationRequest(claim=encode(signing.sign(claim, old.sig_alg, old.sig_sk, old.sig_pk)),
                          new_key_proof=encode(signing.sign(claim, new.sig_alg, new.sig_sk, new.sig_pk)))
    reply = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, req, Signed, timeout)
    accept = signing.verify(reply, RotationAccept, device.coordinator_sig_alg, device.coordinator_sig_pk)
    if accept.sig_fp != new.sig_fp:
        raise QflareError(Reason.BAD_SIGNATURE, "rotation reply names another key")
    device.identity = new
    device.session = None
    device.auth_key = None  # bound to the old key: the coordinator keeps it no longer (kem-v2 from now)
    return device
