"""Sealing a long payload as a stream of chunks to one KEM key: one encapsulation per payload.

A STREAM-style construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015) on the KEM-then-AEAD
shape of :mod:`pqc.seal`, so a 100 MB model update costs one ML-KEM encapsulation, not one
per chunk, and each chunk opens on its own (the receiver never holds the ciphertext whole)::

    enc      = header(alg) ‖ KEM ciphertext           (one per payload; header as in pqc.seal)
    prk      = HKDF-Extract(salt = "", ikm = shared secret)
    key_i    = HKDF-Expand(prk, "QFLARE stream v1" ‖ 0x00 ‖ SHA3-256(enc) ‖ SHA3-256(info)
                                ‖ u32 i ‖ u32 count, 32)
    chunk_i  = AES-256-GCM(key_i, nonce = 0^96, aad_i).seal(plaintext_i)      (ciphertext ‖ tag)

Every key seals exactly one chunk, so the all-zero nonce never repeats under a key. The
index and the count enter the key, and the caller's ``aad_i`` is bound by the tag: a chunk
moved to another position (reordering), a stream cut short and declared shorter
(truncation), or a chunk taken from another payload (splicing: another ``enc``, hence other
keys) does not open.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from pqc.errors import DecryptionError, InvalidKey, MalformedInput
from pqc.ids import resolve_kem
from pqc.params import KEM_PARAMS
from pqc.policy import Policy, require_length
from pqc.registry import get_kem
from pqc.seal import TAG_SIZE, _kem_for_secret_key, header, parse_header

STREAM_LABEL = b"QFLARE stream v1\x00"
_NONCE = bytes(12)
#: Most chunks one stream may have (u32 in the key derivation; far beyond any real model).
MAX_CHUNKS = 1 << 20


def _prk(ss: bytes) -> bytes:
    return hmac.new(bytes(32), ss, hashlib.sha256).digest()  # RFC 5869 extract, empty salt


class _Stream:
    def __init__(self, enc: bytes, ss: bytes, count: int, info: bytes) -> None:
        if not 1 <= count <= MAX_CHUNKS:
            raise MalformedInput(f"a stream has 1..{MAX_CHUNKS} chunks, not {count}")
        self.enc = enc
        self.count = count
        self._prk = _prk(ss)
        self._base = STREAM_LABEL + hashlib.sha3_256(enc).digest() + hashlib.sha3_256(info).digest()

    def _aead(self, index: int) -> AESGCM:
        if not 0 <= index < self.count:
            raise MalformedInput(f"chunk index {index} outside 0..{self.count - 1}")
        info = self._base + struct.pack(">II", index, self.count)
        return AESGCM(HKDFExpand(hashes.SHA256(), 32, info).derive(self._prk))


class StreamSealer(_Stream):
    """Seals the chunks of one payload; send :attr:`enc` once, beside the first chunk."""

    def seal(self, index: int, plaintext: bytes | bytearray | memoryview,
             aad: bytes | bytearray | memoryview = b"") -> bytes:
        return self._aead(index).encrypt(_NONCE, bytes(plaintext), bytes(aad))


class StreamOpener(_Stream):
    """Opens the chunks of one payload, in any order the caller likes (each is independent)."""

    def open(self, index: int, ciphertext: bytes | bytearray | memoryview,
             aad: bytes | bytearray | memoryview = b"") -> bytes:
        if memoryview(ciphertext).nbytes < TAG_SIZE:
            raise DecryptionError("stream chunk is truncated")
        try:
            return self._aead(index).decrypt(_NONCE, bytes(ciphertext), bytes(aad))
        except MalformedInput:
            raise
        except Exception:  # noqa: BLE001 - fail closed, whatever the cause
            raise DecryptionError(f"stream chunk {index} of {self.count} does not open") from None


def stream_sealer(kem_name: str, recipient_pk: bytes, count: int, info: bytes = b"") -> StreamSealer:
    """Encapsulate once to ``recipient_pk`` and return a sealer for ``count`` chunks."""
    alg = resolve_kem(kem_name)
    pk = require_length(recipient_pk, KEM_PARAMS[alg].public_key, f"{alg.value} public key", InvalidKey)
    ct, ss = get_kem(alg).encapsulate(pk)
    return StreamSealer(header(alg) + ct, ss, count, info)


def stream_opener(recipient_sk: bytes, enc: bytes, count: int, info: bytes = b"",
                  policy: Policy | None = None) -> StreamOpener:
    """Decapsulate ``enc`` (from :func:`stream_sealer`); DecryptionError if it is malformed.

    A forged ``enc`` decapsulates to an unrelated secret (implicit rejection), so the
    failure shows at the first chunk's tag, never here.
    """
    alg, hlen = parse_header(enc)
    (policy or Policy()).check_kem(alg)
    if not isinstance(recipient_sk, (bytes, bytearray, memoryview)):
        raise InvalidKey("secret key must be bytes")
    sk = bytes(recipient_sk)
    ct = bytes(memoryview(enc)[hlen:])
    if len(ct) != KEM_PARAMS[alg].ciphertext:
        raise DecryptionError(f"{alg.value} stream encapsulation must be {KEM_PARAMS[alg].ciphertext} bytes")
    try:
        ss = _kem_for_secret_key(alg, sk).decapsulate(sk, ct)
    except InvalidKey:
        raise
    except Exception:  # noqa: BLE001
        raise DecryptionError(f"{alg.value} stream encapsulation does not open") from None
    return StreamOpener(bytes(enc), ss, count, info)
