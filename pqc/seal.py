"""Sealing a payload to a recipient's KEM public key: HPKE (RFC 9180) one-shot, fail closed.

Blob (all integers big-endian)::

    header   = "QFS" ‖ version (1 byte, = 1) ‖ len(alg) (1 byte) ‖ alg (ASCII, e.g. "ML-KEM-768")
    sealed   = header ‖ enc (the KEM ciphertext, fixed length per alg) ‖ AEAD ciphertext ‖ 16-byte tag

ML-KEM-768, ML-KEM-1024 and ML-KEM-768+X25519 use HPKE base mode (RFC 9180 §5.1.1,
``SetupBaseS`` + ``Seal``, §6.1 single-shot) with HKDF-SHA256 and AES-256-GCM through
OpenSSL: ``Suite(KEM, KDF.HKDF_SHA256, AEAD.AES_256_GCM)``. That API takes no associated
data, so the caller's ``aad`` is bound through HPKE's ``info`` (which enters the key
schedule, RFC 9180 §5.1): ``info = "QFLARE seal v1" ‖ 0x00 ‖ header ‖ SHA3-256(aad)``.
A different aad, header or algorithm therefore yields different AEAD keys and the tag fails.

FrodoKEM-640-AES and ML-KEM-512 (no HPKE KEM id in OpenSSL) get the same KEM-then-AEAD
shape on the :class:`pqc.kem.Kem` interface: ``(enc, ss) = Encap(pk)``;
``key = HKDF-SHA256(ikm = ss, salt = "", info = label ‖ header ‖ SHA3-256(enc) ‖ SHA3-256(aad))``;
AES-256-GCM with an all-zero nonce (each key seals exactly one message) and the header as
associated data.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pqc.backends import CRYPTOGRAPHY
from pqc.errors import DecryptionError, InvalidKey, QflareCryptoError
from pqc.ids import KemId, resolve_kem
from pqc.kem import CryptographyHybrid, CryptographyMLKEM, Kem
from pqc.params import KEM_PARAMS
from pqc.policy import Policy, require_length
from pqc.registry import _kem, get_kem, kem_backends

MAGIC = b"QFS"
VERSION = 1
SEAL_LABEL = b"QFLARE seal v1\x00"
TAG_SIZE = 16
_NONCE = bytes(12)

_HPKE_KEM = {
    KemId.ML_KEM_768: hpke.KEM.MLKEM768,
    KemId.ML_KEM_1024: hpke.KEM.MLKEM1024,
    KemId.ML_KEM_768_X25519: hpke.KEM.MLKEM768_X25519,
}
#: The same KEMs' HPKE identifiers (draft-ietf-hpke-pq; X-Wing's from draft-connolly-cfrg-xwing-kem),
#: for :func:`hpke_key_schedule`; with them HKDF-SHA256 (0x0001) and AES-256-GCM (0x0002).
HPKE_KEM_ID = {KemId.ML_KEM_768: 0x0041, KemId.ML_KEM_1024: 0x0042, KemId.ML_KEM_768_X25519: 0x647A}
HPKE_KDF_HKDF_SHA256 = 0x0001
HPKE_AEAD_AES_256_GCM = 0x0002


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA-256 (RFC 5869) extract-then-expand to ``length`` bytes.

    Written out over the one-shot ``hmac.digest`` (OpenSSL's HMAC): a handshake derives keys
    several times, and building cryptography's HKDF object cost ~15 µs each against ~2 µs
    here. An empty salt is HashLen zeros, as the RFC says (HMAC pads any key with zeros).
    tests/test_kem_handshake.py checks it against RFC 5869's test case and cryptography's.
    """
    return _expand(_extract(salt, ikm), info, length)


_ZERO_SALT = bytes(32)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 §2.2) with SHA-256; an empty salt is HashLen zeros."""
    return _hmac.digest(salt or _ZERO_SALT, ikm, "sha256")


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869 §2.3) with SHA-256."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA-256 cannot give {length} bytes")
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = _hmac.digest(prk, block + info + bytes([i]), "sha256")
        okm, i = okm + block, i + 1
    return okm[:length]


def header(alg: KemId) -> bytes:
    name = alg.value.encode("ascii")
    return MAGIC + bytes([VERSION, len(name)]) + name


def parse_header(sealed: bytes | bytearray | memoryview) -> tuple[KemId, int]:
    """The algorithm and header length of a sealed blob; DecryptionError if malformed."""
    view = memoryview(sealed)
    if view.nbytes < len(MAGIC) + 2 or bytes(view[:3]) != MAGIC:
        raise DecryptionError("not a sealed payload (bad magic)")
    if view[3] != VERSION:
        raise DecryptionError(f"sealed payload version {view[3]} is not supported (expected {VERSION})")
    end = 5 + view[4]
    try:
        alg = resolve_kem(bytes(view[5:end]).decode("ascii"))
    except (UnicodeDecodeError, QflareCryptoError):
        raise DecryptionError("sealed payload names an unknown algorithm") from None
    return alg, end


def binding(sealed: bytes | bytearray | memoryview) -> bytes:
    """The parts of a sealed blob a signature must cover to cover all of it: header ‖ enc ‖ tag.

    The AEAD key comes from the KEM secret, which only the sender and the recipient know;
    so nobody else can change the ciphertext and keep the tag (AES-GCM's integrity), and
    signing enc ‖ tag binds the ciphertext without hashing it. (The sender, who knows the key,
    could find another ciphertext with the same tag: the signature proves who sealed, not a
    unique ciphertext to a third party.) A blob too short or malformed is returned whole,
    so its signature simply fails.
    """
    view = memoryview(sealed).cast("B")
    try:
        alg, hlen = parse_header(view)
    except DecryptionError:
        return bytes(view)
    prefix = hlen + KEM_PARAMS[alg].ciphertext
    if view.nbytes < prefix + TAG_SIZE:
        return bytes(view)
    return bytes(view[:prefix]) + bytes(view[view.nbytes - TAG_SIZE:])


def _aad_digest(aad: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha3_256(aad).digest()


def _hpke_keys(alg: KemId, kem: Kem, pk: bytes | None, sk: bytes | None) -> Any:
    if isinstance(kem, CryptographyHybrid):
        if pk is not None:
            return hpke.MLKEM768X25519PublicKey(*kem.split_public(pk))
        assert sk is not None
        return hpke.MLKEM768X25519PrivateKey(*kem.split_private(sk))
    assert isinstance(kem, CryptographyMLKEM)
    return kem.public_key_object(pk) if pk is not None else kem.private_key_object(sk)


def _suite(alg: KemId) -> hpke.Suite:
    return hpke.Suite(_HPKE_KEM[alg], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def hpke_key_schedule(kem_id: int, shared_secret: bytes, info: bytes, *, aead_id: int = HPKE_AEAD_AES_256_GCM,
                      key_size: int = 32) -> tuple[bytes, bytes]:
    """RFC 9180 §5.1 ``KeySchedule`` in base mode (no PSK) with HKDF-SHA256: (key, base_nonce).

    Written out so an update can be opened into memory the caller owns
    (:func:`open_sealed_into`); cryptography's HPKE API returns new bytes only. Checked
    against RFC 9180 A.1.1 and, for every KEM here, against cryptography's HPKE
    (tests/test_pqc_seal.py)."""
    suite = b"HPKE" + kem_id.to_bytes(2, "big") + HPKE_KDF_HKDF_SHA256.to_bytes(2, "big") + aead_id.to_bytes(2, "big")

    def labeled_extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return _extract(salt, b"HPKE-v1" + suite + label + ikm)

    def labeled_expand(prk: bytes, label: bytes, ctx: bytes, length: int) -> bytes:
        return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + ctx, length)

    context = b"\x00" + labeled_extract(b"", b"psk_id_hash", b"") + labeled_extract(b"", b"info_hash", info)
    secret = labeled_extract(shared_secret, b"secret", b"")
    return labeled_expand(secret, b"key", context, key_size), labeled_expand(secret, b"base_nonce", context, 12)


def _kem_key(ss: bytes, hdr: bytes, enc: bytes, aad: bytes | bytearray | memoryview) -> bytes:
    info = SEAL_LABEL + hdr + hashlib.sha3_256(enc).digest() + _aad_digest(aad)
    return hkdf_sha256(ss, b"", info, 32)


def seal(kem_name: str, recipient_pk: bytes, plaintext: bytes | bytearray | memoryview,
         aad: bytes | bytearray | memoryview = b"") -> bytes:
    """Encrypt ``plaintext`` to ``recipient_pk`` with ``aad`` bound; a self-describing blob."""
    alg = resolve_kem(kem_name)
    p = KEM_PARAMS[alg]
    pk = require_length(recipient_pk, p.public_key, f"{alg.value} public key", InvalidKey)
    hdr = header(alg)
    if alg in _HPKE_KEM:
        kem = get_kem(alg, CRYPTOGRAPHY)
        info = SEAL_LABEL + hdr + _aad_digest(aad)
        return hdr + _suite(alg).encrypt(plaintext, _hpke_keys(alg, kem, pk, None), info)
    enc, ss = get_kem(alg).encapsulate(pk)
    size = memoryview(plaintext).nbytes
    out = bytearray(len(hdr) + len(enc) + size + TAG_SIZE)
    out[: len(hdr)] = hdr
    out[len(hdr): len(hdr) + len(enc)] = enc
    aead = AESGCM(_kem_key(ss, hdr, enc, aad))
    aead.encrypt_into(_NONCE, plaintext, hdr, memoryview(out)[len(hdr) + len(enc):])
    return bytes(out)


def _kem_for_secret_key(alg: KemId, sk: bytes) -> Kem:
    """The installed backend whose secret-key encoding has ``len(sk)`` bytes."""
    for backend in kem_backends(alg):
        kem = _kem(alg, backend)
        if kem is not None and kem.secret_key_size == len(sk):
            return kem
    sizes = sorted({k.secret_key_size for b in kem_backends(alg) if (k := _kem(alg, b))})
    raise InvalidKey(f"{alg.value} secret key must be {' or '.join(map(str, sizes))} bytes, got {len(sk)}")


def _opening(recipient_sk: bytes, sealed: bytes | bytearray | memoryview,
             policy: Policy | None) -> tuple[KemId, int, bytes, memoryview, bytes]:
    """What both open paths check first: the header, the policy (before any decryption) and
    the key's type; then (alg, header length, key, view of the blob, header)."""
    alg, hlen = parse_header(sealed)
    (policy or Policy()).check_kem(alg)
    if not isinstance(recipient_sk, (bytes, bytearray, memoryview)):
        raise InvalidKey("secret key must be bytes")
    view = memoryview(sealed)
    return alg, hlen, bytes(recipient_sk), view, bytes(view[:hlen])


def open_sealed(recipient_sk: bytes, sealed: bytes | bytearray | memoryview,
                aad: bytes | bytearray | memoryview = b"", policy: Policy | None = None) -> bytes:
    """The plaintext of ``sealed``; DecryptionError on any tampering, PolicyError if refused."""
    alg, hlen, sk, view, hdr = _opening(recipient_sk, sealed, policy)
    enc_size = KEM_PARAMS[alg].ciphertext
    if view.nbytes < hlen + enc_size + TAG_SIZE:
        raise DecryptionError(f"sealed {alg.value} payload is truncated")
    if alg in _HPKE_KEM:
        kem = get_kem(alg, CRYPTOGRAPHY)
        require_length(sk, kem.secret_key_size, f"{alg.value} secret key", InvalidKey)
        key = _hpke_keys(alg, kem, None, sk)
        try:
            return _suite(alg).decrypt(view[hlen:], key, SEAL_LABEL + hdr + _aad_digest(aad))
        except Exception:  # noqa: BLE001 - fail closed, whatever the cause
            raise DecryptionError(f"sealed {alg.value} payload does not open") from None
    out = bytearray(view.nbytes - hlen - enc_size - TAG_SIZE)
    _open_into(alg, hlen, sk, view, hdr, aad, memoryview(out))
    return bytes(out)


def plaintext_size(sealed: bytes | bytearray | memoryview) -> int:
    """How many bytes ``sealed`` opens to (what :func:`open_sealed_into` needs); DecryptionError
    if it is malformed or too short to hold anything."""
    alg, hlen = parse_header(sealed)
    size = memoryview(sealed).nbytes - hlen - KEM_PARAMS[alg].ciphertext - TAG_SIZE
    if size < 0:
        raise DecryptionError(f"sealed {alg.value} payload is truncated")
    return size


def open_sealed_into(recipient_sk: bytes, sealed: bytes | bytearray | memoryview, out: bytearray | memoryview,
                     aad: bytes | bytearray | memoryview = b"", policy: Policy | None = None) -> int:
    """:func:`open_sealed` into ``out`` (writable, exactly :func:`plaintext_size` bytes), with no
    allocation: the enclave opens each update straight into the aligned buffer its store
    writes from (a 4 MB update: no zero-filled output, no copy into the write's buffer).
    Returns the size. On DecryptionError ``out`` holds unauthenticated bytes: discard it."""
    alg, hlen, sk, view, hdr = _opening(recipient_sk, sealed, policy)
    size = plaintext_size(view)
    target = memoryview(out).cast("B")
    if target.readonly or target.nbytes != size:
        raise ValueError(f"out must be a writable buffer of {size} bytes, not {target.nbytes}")
    _open_into(alg, hlen, sk, view, hdr, aad, target)
    return size


def _open_into(alg: KemId, hlen: int, sk: bytes, view: memoryview, hdr: bytes,
               aad: bytes | bytearray | memoryview, target: memoryview) -> None:
    """Decapsulate and decrypt into ``target`` (its size already checked); DecryptionError if it fails."""
    enc_size = KEM_PARAMS[alg].ciphertext
    enc = bytes(view[hlen: hlen + enc_size])
    if alg in _HPKE_KEM:
        kem = get_kem(alg, CRYPTOGRAPHY)
        require_length(sk, kem.secret_key_size, f"{alg.value} secret key", InvalidKey)
    else:
        kem = _kem_for_secret_key(alg, sk)
    try:
        ss = kem.decapsulate(sk, enc)
        if alg in _HPKE_KEM:  # single-shot Open (RFC 9180 §6.1): sequence 0, so the nonce is base_nonce
            key, nonce = hpke_key_schedule(HPKE_KEM_ID[alg], ss, SEAL_LABEL + hdr + _aad_digest(aad))
            AESGCM(key).decrypt_into(nonce, view[hlen + enc_size:], b"", target)
        else:
            AESGCM(_kem_key(ss, hdr, enc, aad)).decrypt_into(_NONCE, view[hlen + enc_size:], hdr, target)
    except Exception:  # noqa: BLE001 - fail closed, whatever the cause
        raise DecryptionError(f"sealed {alg.value} payload does not open") from None
