"""Pure protocol rules shared by the coordinator and the edge agent (docs/architecture.md steps 2-3).

No I/O here: freshness, transcript hashing and the session-key derivation, so both ends
compute exactly the same values and tests can check them without a broker.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
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


def check_keys_message(keys_message: bytes, pinned_fp: str) -> CoordinatorKeys:
    """The coordinator's keys from a token file (``TokenCreated.coordinator_keys``), if they are
    the pinned coordinator's: self-signed by the key whose fingerprint is ``pinned_fp``.

    The bytes are untrusted (they travel in a file beside the token); the pin alone decides,
    exactly as for a key chain without rotations. Raises ``QflareError(bad_signature)`` when
    they are not that (another signer, a rotation announcement, a bad signature), and
    ``QflareError(malformed)`` for bytes that do not decode: nothing here is used unchecked.
    """
    from schemas.codec import CodecError
    from schemas.reasons import QflareError, Reason

    try:
        return follow_key_chain(keys_message, [], pinned_fp)
    except CodecError as exc:
        raise QflareError(Reason.MALFORMED, f"coordinator keys in the token do not decode: {exc.detail}") from None
    except pqc.errors.QflareCryptoError as exc:
        raise QflareError(Reason.BAD_SIGNATURE, f"coordinator keys in the token: {exc}") from None


# --- handshake suites (docs/crypto.md, "KEM handshake") -----------------------------------

SIG_V1 = "sig-v1"  # a device-signed SessionRequest, a coordinator-signed grant
KEM_V2 = "kem-v2"  # KEM authentication both ways, key confirmation, a MACed grant
KEM_V3 = "kem-v3"  # kem-v2 with the device authenticated by its enrolment MAC key, not a third KEM
SUITES = (KEM_V3, KEM_V2, SIG_V1)
#: The suites of SessionHello/SessionConfirm (MACed grants, key confirmation).
KEM_SUITES = (KEM_V3, KEM_V2)
DEFAULT_SUITE = KEM_V3

KEM_V2_KEYS_INFO = b"qflare/v2/session-keys"
CONFIRM_LABEL = b"qflare/v2/coordinator-finished"
GRANT_ROOT_INFO = b"qflare/v2/grant-root"
GRANT_KEY_INFO = b"qflare/v2/grant-key"
GRANT_TAG_LABEL = b"qflare/v2/grant\0"
ENROLL_REPLY_AAD = b"qflare/v2/enroll-accept\0"


def _lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation (8-byte big-endian lengths): no two inputs collide."""
    out: list[bytes] = []
    for p in parts:  # no per-part concatenation: the parts are kilobytes of KEM keys and ciphertexts
        out.append(len(p).to_bytes(8, "big"))
        out.append(p)
    return b"".join(out)


def kem_transcript(hello: bytes, eph_ct: bytes, device_ct: bytes, coordinator_nonce: bytes, session_id: str) -> bytes:
    """SHA3-256 over the ``kem-v2`` exchange before the grant: the encoded hello, both
    ciphertexts, the coordinator's nonce and the session id. The grant carries it."""
    return hashlib.sha3_256(_lp(hello, eph_ct, device_ct, coordinator_nonce, session_id.encode())).digest()


def kem_final_transcript(transcript: bytes, grant: bytes, report_digest: bytes | None) -> bytes:
    """SHA3-256 over the pre-grant transcript, the encoded GrantMac and the enclave report's
    digest: what the session keys and the key confirmation cover."""
    return hashlib.sha3_256(_lp(transcript, grant, report_digest or b"")).digest()


def kem_session_id(device_nonce: bytes) -> str:
    """A kem-v2 session's id, from the device's nonce: the registry keeps each id once, so a
    replayed hello cannot open a second session (sessions rows outlive the freshness window)."""
    return hashlib.sha3_256(b"qflare/v2/session-id\0" + device_nonce).hexdigest()[:32]


def kem_session_keys(ss_eph: bytes, ss_static: bytes, ss_device: bytes, device_nonce: bytes,
                     coordinator_nonce: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(session key, confirmation key): HKDF-SHA-256 over all three KEM secrets.

    ``ss_eph`` (to the device's discarded ephemeral key) gives forward secrecy, ``ss_static``
    (to the coordinator's static key) authenticates the coordinator, ``ss_device`` (to the
    device's enrolled key) the device: a party missing any one cannot compute either key.
    """
    okm = pqc.hkdf_sha256(_lp(ss_eph, ss_static, ss_device), device_nonce + coordinator_nonce,
                          KEM_V2_KEYS_INFO + transcript, 2 * SESSION_KEY_BYTES)
    return okm[:SESSION_KEY_BYTES], okm[SESSION_KEY_BYTES:]


def confirm_tag(confirm_key: bytes, transcript: bytes) -> bytes:
    """The coordinator's key confirmation: HMAC-SHA-256(confirm key, label ‖ transcript)."""
    return hmac.digest(confirm_key, CONFIRM_LABEL + transcript, "sha256")


def grant_root(kem_sk: bytes) -> bytes:
    """The secret every coordinator of one identity derives grant keys from (no storage needed)."""
    return pqc.hkdf_sha256(kem_sk, b"", GRANT_ROOT_INFO, 32)


def enclave_identity(measurement: str, kem_alg: str, kem_pk: bytes, sig_alg: str, sig_pk: bytes) -> bytes:
    """SHA3-256 naming one enclave across restarts: its code and its (sealed, kept) keys, not
    the report's nonce and time, so a restarted enclave keeps honouring its grants."""
    return hashlib.sha3_256(b"qflare/v2/enclave\0" + _lp(measurement.encode(), kem_alg.encode(), kem_pk,
                                                          sig_alg.encode(), sig_pk)).digest()


def grant_key(root: bytes, enclave: bytes) -> bytes:
    """The MAC key of grants for the enclave named ``enclave`` (:func:`enclave_identity`)."""
    return pqc.hkdf_sha256(root, enclave, GRANT_KEY_INFO, 32)


def grant_key_id(key: bytes) -> bytes:
    """The 16-byte name of a grant key (a grant says which key MACed it, never the key)."""
    return hashlib.sha3_256(b"qflare/v2/grant-key-id\0" + key).digest()[:16]


def grant_key_aad(enclave: bytes) -> bytes:
    """Associated data of the sealed grant key: it opens only as the key for this enclave."""
    return GRANT_KEY_INFO + b"\0" + enclave


def grant_tag(key: bytes, body: bytes) -> bytes:
    """HMAC-SHA-256 of an encoded SessionGrant under the enclave's grant key."""
    return hmac.digest(key, GRANT_TAG_LABEL + body, "sha256")


def tags_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def seal_enroll_accept(reply_key: bytes, device_id: str, accept: bytes) -> bytes:
    """AES-256-GCM of an encoded EnrollAccept under the claim's reply key (random nonce first)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(reply_key).encrypt(nonce, accept, ENROLL_REPLY_AAD + device_id.encode())


def open_enroll_accept(reply_key: bytes, device_id: str, sealed: bytes) -> bytes | None:
    """The encoded EnrollAccept, or None when it was not sealed under ``reply_key`` for ``device_id``."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(reply_key).decrypt(sealed[:12], sealed[12:], ENROLL_REPLY_AAD + device_id.encode())
    except (InvalidTag, ValueError):
        return None


# --- kem-v3: the device authenticated by a MAC key from its enrolment ------------------

DEVICE_AUTH_INFO = b"qflare/v3/device-auth"
HELLO_TAG_LABEL = b"qflare/v3/device-hello\0"
KEM_V3_KEYS_INFO = b"qflare/v3/session-keys"
KEM_V3_TRANSCRIPT_LABEL = b"qflare/v3/transcript\0"


def device_auth_key(reply_key: bytes, device_id: str, sig_fp: str) -> bytes:
    """The device's kem-v3 MAC key: HKDF of the enrolment claim's reply key (chosen by the
    device, sealed to the coordinator's KEM key, so known to those two only), bound to the
    device and the signature key it enrolled."""
    return pqc.hkdf_sha256(reply_key, b"", DEVICE_AUTH_INFO + _lp(device_id.encode(), sig_fp.encode()), 32)


def device_auth_aad(device_id: str, sig_fp: str) -> bytes:
    """Associated data of a wrapped device key: it opens only for this device and key."""
    return DEVICE_AUTH_INFO + b"\0" + _lp(device_id.encode(), sig_fp.encode())


def hello_tag(auth_key: bytes, suite: str, device_id: str, coordinator_kem_fp: str, static_ct: bytes,
              eph_kem_alg: str, eph_pk: bytes, nonce: bytes, timestamp: float) -> bytes:
    """The device's MAC over every other field of a kem-v3 SessionHello."""
    body = _lp(suite.encode(), device_id.encode(), coordinator_kem_fp.encode(), static_ct, eph_kem_alg.encode(),
               eph_pk, nonce, struct.pack(">d", timestamp))
    return hmac.digest(auth_key, HELLO_TAG_LABEL + body, "sha256")


def kem_v3_transcript(auth_tag: bytes, eph_ct: bytes, coordinator_nonce: bytes, session_id: str) -> bytes:
    """SHA3-256 over the kem-v3 exchange before the grant. The hello enters through its tag:
    an HMAC-SHA-256 of every hello field, so for the two holders of the key equal tags mean
    equal hellos (SHA-256 collision resistance), and nobody else can tag a changed hello;
    the kilobytes of KEM key and ciphertext in the hello are hashed once, by the tag."""
    return hashlib.sha3_256(KEM_V3_TRANSCRIPT_LABEL + _lp(auth_tag, eph_ct, coordinator_nonce,
                                                         session_id.encode())).digest()


def kem_v3_session_keys(ss_eph: bytes, ss_static: bytes, auth_key: bytes, device_nonce: bytes,
                        coordinator_nonce: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(session key, confirmation key) of kem-v3: HKDF-SHA-256 over both KEM secrets and the
    device's MAC key. ``ss_eph`` gives forward secrecy, ``ss_static`` authenticates the
    coordinator, ``auth_key`` the device (as its third KEM secret did in kem-v2)."""
    okm = pqc.hkdf_sha256(_lp(ss_eph, ss_static, auth_key), device_nonce + coordinator_nonce,
                          KEM_V3_KEYS_INFO + transcript, 2 * SESSION_KEY_BYTES)
    return okm[:SESSION_KEY_BYTES], okm[SESSION_KEY_BYTES:]
