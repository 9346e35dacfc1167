"""Pure protocol rules shared by the coordinator and the edge agent (docs/architecture.md steps 2-3).

No I/O here: freshness, transcript hashing and the session-key derivation, so both ends
compute exactly the same values and tests can check them without a broker.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pqc

if TYPE_CHECKING:
    from schemas.messages import CoordinatorKeys

SESSION_KEY_BYTES = 32
SESSION_INFO = b"qflare/v1/session-key"
ENROLL_AAD = b"qflare/v1/enroll/"


def enroll_aad(device_id: str) -> bytes:
    """Associated data binding a sealed enrollment to the device id it claims."""
    return ENROLL_AAD + device_id.encode()


def is_fresh(timestamp: float, now: float, window: float) -> bool:
    """A request is fresh when its clock is within ``window`` seconds of ours."""
    return abs(now - timestamp) <= window


def transcript_hash(signed_request: bytes, ciphertext: bytes, coordinator_nonce: bytes, session_id: str) -> bytes:
    """SHA3-256 over the whole handshake: the signed request and the coordinator's answer."""
    h = hashlib.sha3_256()
    for part in (signed_request, ciphertext, coordinator_nonce, session_id.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def enclave_digest(report: bytes | None) -> bytes | None:
    """SHA3-256 of the enclave report sent beside a grant (None when no enclave is known)."""
    return hashlib.sha3_256(report).digest() if report else None


def session_key(shared_secret: bytes, device_nonce: bytes, coordinator_nonce: bytes, transcript: bytes) -> bytes:
    """HKDF-SHA-256(ss, salt = both nonces, info = label ‖ transcript) → 32-byte key.

    The shared secret comes from a KEM to an ephemeral key the device discards, so the
    key cannot be recomputed later from the device's long-term keys (forward secrecy).
    """
    return pqc.hkdf_sha256(shared_secret, device_nonce + coordinator_nonce, SESSION_INFO + transcript,
                           SESSION_KEY_BYTES)


TO_COORDINATOR, TO_DEVICE = b"d2c", b"c2d"


def _call_nonce(direction: bytes, seq: int) -> bytes:
    return direction + seq.to_bytes(9, "big")  # 12 bytes, unique per key and direction


def seal_call(key: bytes, session_id: str, seq: int, direction: bytes, payload: bytes) -> bytes:
    """AES-256-GCM under the session key; the nonce is the direction and sequence number."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).encrypt(_call_nonce(direction, seq), payload, b"qflare/v1/call\0" + session_id.encode())


def open_call(key: bytes, session_id: str, seq: int, direction: bytes, ciphertext: bytes) -> bytes | None:
    """The payload, or None when the tag does not verify (wrong key, tampering, reordering)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(_call_nonce(direction, seq), ciphertext,
                                   b"qflare/v1/call\0" + session_id.encode())
    except InvalidTag:
        return None


def follow_key_chain(chain_current: bytes, rotations: list[bytes], pinned_fp: str) -> CoordinatorKeys:
    """Walk from the pinned coordinator key to the current one, checking every signature.

    Each rotation is signed by the key it replaces, so trust flows only forward from what
    the operator gave the device. Raises ``QflareError(bad_signature)`` when the chain does
    not lead from ``pinned_fp`` to the self-signed current keys.
    """
    return walk_key_chain(chain_current, rotations, pinned_fp)[0]


def walk_key_chain(chain_current: bytes, rotations: list[bytes],
                   pinned_fp: str) -> tuple[CoordinatorKeys, list[tuple[str, bytes, float]]]:
    """:func:`follow_key_chain`, and every key it passed: ``(alg, public key, rotated_at)``
    from the pinned key on, each replaced at ``rotated_at`` (the enclave still honours grants
    such a key issued before then, until they expire)."""
    from schemas import signing
    from schemas.codec import decode
    from schemas.messages import CoordinatorKeys, Signed
    from schemas.reasons import QflareError, Reason

    fp = pinned_fp
    retired: list[tuple[str, bytes, float]] = []
    for raw in rotations:
        signed = decode(raw, Signed)
        step = signing.unverified(signed, CoordinatorKeys)
        if step.previous_sig_pk is None or step.previous_sig_alg is None:
            raise QflareError(Reason.BAD_SIGNATURE, "rotation without its previous key")
        if pqc.fingerprint(step.previous_sig_pk, step.previous_sig_alg) != fp:
            continue  # a rotation before the pinned key: not needed
        signing.verify(signed, CoordinatorKeys, step.previous_sig_alg, step.previous_sig_pk)
        retired.append((step.previous_sig_alg, step.previous_sig_pk, step.issued_at))
        fp = pqc.fingerprint(step.sig_pk, step.sig_alg)
    current = decode(chain_current, Signed)
    keys = signing.unverified(current, CoordinatorKeys)
    if pqc.fingerprint(keys.sig_pk, keys.sig_alg) != fp:
        raise QflareError(Reason.BAD_SIGNATURE, "coordinator key does not match the pinned fingerprint")
    return signing.verify(current, CoordinatorKeys, keys.sig_alg, keys.sig_pk), retired
