"""Session keys at rest in the registry, so any coordinator sharing it can serve a session.

A session key is stored only wrapped: AES-256-GCM under a key derived (HKDF-SHA-256) from the
coordinator's KEM secret key, with the session id as associated data. A registry dump alone
(a database backup, a read-only replica) therefore opens no session; the coordinators, which
hold the identity's key material, all derive the same wrapping key.
"""

from __future__ import annotations

import functools
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import pqc

WRAP_INFO = b"qflare/v1/session-key-wrap"
_AAD = b"qflare/v1/session\0"


def wrapping_key(kem_sk: bytes) -> bytes:
    return pqc.hkdf_sha256(kem_sk, b"", WRAP_INFO, 32)


@functools.lru_cache(maxsize=8)
def _aead(wrapping: bytes) -> AESGCM:
    return AESGCM(wrapping)


def wrap(wrapping: bytes, session_id: str, key: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + _aead(wrapping).encrypt(nonce, key, _AAD + session_id.encode())


def unwrap(wrapping: bytes, session_id: str, blob: bytes) -> bytes | None:
    """The session key, or None if ``blob`` was not wrapped by this identity for this session."""
    try:
        return AESGCM(wrapping).decrypt(blob[:12], blob[12:], _AAD + session_id.encode())
    except (InvalidTag, ValueError):
        return None


# --- device MAC keys (handshake kem-v3), wrapped the same way under their own key -------------

DEVICE_WRAP_INFO = b"qflare/v3/device-auth-wrap"


def device_wrapping_key(kem_sk: bytes) -> bytes:
    return pqc.hkdf_sha256(kem_sk, b"", DEVICE_WRAP_INFO, 32)


def wrap_device_key(wrapping: bytes, aad: bytes, key: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + _aead(wrapping).encrypt(nonce, key, aad)


def unwrap_device_key(wrapping: bytes, aad: bytes, blob: bytes) -> bytes | None:
    """The device's MAC key, or None if ``blob`` was not wrapped by this identity for ``aad``."""
    try:
        return _aead(wrapping).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        return None
