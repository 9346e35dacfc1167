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
    EnrollRequest,
    KeyChain,
    KeyRotation,
    KeysRequest,
    RotationAccept,
    RotationRequest,
    SessionAccept,
    SessionCall,
    SessionGrant,
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
    grant: bytes  # encoded Signed(SessionGrant), presented with every update
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
    changed = keys.sig_pk != device.coordinator_sig_pk
    device.coordinator_sig_alg, device.coordinator_sig_pk = keys.sig_alg, keys.sig_pk
    return changed


async def enroll(rpc: RpcClient, names: Names, device_id: str, token: str, coordinator_fp: str, *,
                 sig_alg: str, kem_alg: str, timeout: float = 15.0, identity: Identity | None = None) -> Device:
    """Enroll with a one-time token: new keys, proof of possession, sealed to the coordinator."""
    keys = await coordinator_keys(rpc, names, coordinator_fp, timeout)
    ident = identity or Identity.generate(sig_alg, kem_alg)
    claim = EnrollClaim(device_id=device_id, token=token, sig_alg=ident.sig_alg, sig_pk=ident.sig_pk,
                        kem_alg=ident.kem_alg, kem_pk=ident.kem_pk, nonce=secrets.token_bytes(32),
                        timestamp=time.time())
    signed = signing.sign(claim, ident.sig_alg, ident.sig_sk, ident.sig_pk)
    sealed = pqc.seal(keys.kem_alg, keys.kem_pk, encode(signed), handshake.enroll_aad(device_id))
    req = EnrollRequest(device_id=device_id, kem_alg=keys.kem_alg, coordinator_kem_fp=pqc.fingerprint(keys.kem_pk, keys.kem_alg),
                        sealed=sealed)
    reply = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, req, Signed, timeout)
    accept = signing.verify(reply, EnrollAccept, keys.sig_alg, keys.sig_pk)
    if accept.request_nonce != claim.nonce or accept.device_id != device_id or accept.sig_fp != ident.sig_fp:
        raise QflareError(Reason.BAD_SIGNATURE, "enrollment reply does not answer this request")
    return Device(device_id, ident, keys.sig_alg, keys.sig_pk, _enclave_report(accept.enclave_report))


async def open_session(rpc: RpcClient, names: Names, device: Device, *, kem_alg: str = pqc.ids.DEFAULT_KEM,
                       timeout: float = 15.0) -> Session:
    """Open a forward-secret session; the ephemeral secret key is dropped before returning."""
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
    return device
