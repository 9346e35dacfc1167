"""Sealed payloads: round trips, failing closed on any change, policy, HPKE interop."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hpke

import pqc
from pqc.errors import DecryptionError, InvalidKey, PolicyError
from pqc.ids import KemId
from pqc.seal import SEAL_LABEL, header, parse_header

AAD = b"round=7;device=dev-1"


@pytest.fixture(scope="module", params=[k.value for k in KemId])
def keypair(request):
    name = request.param
    pk, sk = pqc.get_kem(name).generate_keypair()
    return name, pk, sk


@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20])
def test_seal_open_round_trip(keypair, size):
    name, pk, sk = keypair
    data = os.urandom(size)
    sealed = pqc.seal(name, pk, data, AAD)
    assert parse_header(sealed)[0] == name
    assert pqc.open_sealed(sk, sealed, AAD) == data
    assert pqc.open_sealed(sk, memoryview(bytearray(sealed)), AAD) == data


def test_every_byte_region_is_authenticated(keypair):
    name, pk, sk = keypair
    sealed = pqc.seal(name, pk, b"model weights", AAD)
    hlen = len(header(KemId(name)))
    enc_len = pqc.get_kem(name).ciphertext_size
    for index in (3, hlen + 1, hlen + enc_len - 1, hlen + enc_len, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[index] ^= 0x01
        with pytest.raises(DecryptionError):
            pqc.open_sealed(sk, bytes(bad), AAD)


def test_other_aad_truncation_and_wrong_key_fail_closed(keypair):
    name, pk, sk = keypair
    sealed = pqc.seal(name, pk, b"model weights", AAD)
    _, other_sk = pqc.get_kem(name).generate_keypair()
    for blob, key, aad in ((sealed, sk, AAD + b"x"), (sealed, sk, b""), (sealed[:-1], sk, AAD),
                           (sealed[:20], sk, AAD), (sealed, other_sk, AAD), (b"", sk, AAD),
                           (b"QFS\x09" + sealed[4:], sk, AAD)):
        with pytest.raises(DecryptionError):
            pqc.open_sealed(key, blob, aad)


def test_header_names_algorithm_and_version():
    pk, _ = pqc.get_kem("ML-KEM-768").generate_keypair()
    sealed = pqc.seal("Kyber768", pk, b"x", b"")
    assert sealed.startswith(b"QFS\x01\x0aML-KEM-768")


def test_policy_refuses_the_algorithm_before_decrypting():
    pk, sk = pqc.get_kem("FrodoKEM-640-AES").generate_keypair()
    sealed = pqc.seal("FrodoKEM-640-AES", pk, b"x", AAD)
    policy = pqc.Policy(kems={"ML-KEM-768"}, signatures={"ML-DSA-44"})
    with pytest.raises(PolicyError, match="FrodoKEM-640-AES"):
        pqc.open_sealed(sk, sealed, AAD, policy=policy)
    assert pqc.open_sealed(sk, sealed, AAD, policy=pqc.Policy(kems={"FrodoKEM-640-AES"})) == b"x"


def test_seal_checks_key_lengths():
    pk, sk = pqc.get_kem("ML-KEM-768").generate_keypair()
    with pytest.raises(InvalidKey):
        pqc.seal("ML-KEM-768", pk[:-1], b"x", b"")
    with pytest.raises(InvalidKey):
        pqc.open_sealed(sk[:-1], pqc.seal("ML-KEM-768", pk, b"x", b""), b"")


@pytest.mark.parametrize("name,kem", [("ML-KEM-768", hpke.KEM.MLKEM768), ("ML-KEM-1024", hpke.KEM.MLKEM1024)])
def test_sealed_body_is_plain_rfc9180_hpke(name, kem):
    """After the header, the blob is HPKE enc ‖ ct with info = label ‖ header ‖ SHA3-256(aad)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import mlkem

    pk, sk = pqc.get_kem(name).generate_keypair()
    sealed = pqc.seal(name, pk, b"payload", AAD)
    hdr = header(KemId(name))
    info = SEAL_LABEL + hdr + hashlib.sha3_256(AAD).digest()
    priv = (mlkem.MLKEM768PrivateKey if name == "ML-KEM-768" else mlkem.MLKEM1024PrivateKey).from_seed_bytes(sk)
    suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    assert suite.decrypt(sealed[len(hdr):], priv, info) == b"payload"


def test_hkdf_sha256_matches_rfc5869_case_1():
    ikm, salt = bytes([0x0B] * 22), bytes(range(13))
    info = bytes(range(0xF0, 0xFA))
    okm = bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    assert pqc.hkdf_sha256(ikm, salt, info, 42) == okm


def _open_into(sk, sealed, aad=AAD, **kw):
    out = bytearray(pqc.plaintext_size(sealed))
    assert pqc.open_sealed_into(sk, sealed, out, aad, **kw) == len(out)
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20])
def test_open_into_equals_open_sealed(keypair, size):
    """Opening into caller memory (our RFC 9180 key schedule for the HPKE KEMs) gives what
    cryptography's HPKE gives, for every KEM, from a memoryview as from bytes."""
    name, pk, sk = keypair
    data = os.urandom(size)
    sealed = pqc.seal(name, pk, data, AAD)
    assert pqc.plaintext_size(sealed) == size
    assert _open_into(sk, sealed) == data == pqc.open_sealed(sk, sealed, AAD)
    assert _open_into(sk, memoryview(bytearray(sealed))) == data


def test_open_into_fails_closed_like_open_sealed(keypair):
    name, pk, sk = keypair
    sealed = pqc.seal(name, pk, b"model weights", AAD)
    hlen = len(header(KemId(name)))
    enc_len = pqc.get_kem(name).ciphertext_size
    _, other_sk = pqc.get_kem(name).generate_keypair()
    for index in (3, hlen + 1, hlen + enc_len - 1, hlen + enc_len, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[index] ^= 0x01
        with pytest.raises(DecryptionError):
            out = bytearray(max(0, len(bad) - hlen - enc_len - 16))
            pqc.open_sealed_into(sk, bytes(bad), out, AAD)
    for key, aad in ((sk, AAD + b"x"), (sk, b""), (other_sk, AAD)):
        with pytest.raises(DecryptionError):
            _open_into(key, sealed, aad)
    for blob in (sealed[:20], b"", b"QFS\x09" + sealed[4:]):
        with pytest.raises(DecryptionError):
            pqc.open_sealed_into(sk, blob, bytearray(13), AAD)


def test_open_into_wants_a_writable_buffer_of_the_exact_size():
    pk, sk = pqc.get_kem("ML-KEM-768").generate_keypair()
    sealed = pqc.seal("ML-KEM-768", pk, b"12345678", AAD)
    for out in (bytearray(7), bytearray(9), b"\0" * 8, memoryview(b"\0" * 8)):
        with pytest.raises(ValueError, match="8 bytes"):
            pqc.open_sealed_into(sk, sealed, out, AAD)
    with pytest.raises(PolicyError):
        pqc.open_sealed_into(sk, sealed, bytearray(8), AAD, policy=pqc.Policy(kems={"FrodoKEM-640-AES"}))


def test_hpke_key_schedule_matches_rfc9180_a_1_1():
    """RFC 9180 Appendix A.1.1 (base mode; DHKEM(X25519, HKDF-SHA256) = 0x0020, HKDF-SHA256,
    AES-128-GCM = 0x0001): the shared secret and info give the RFC's key and base nonce, and
    its first encryption (sequence 0) decrypts under them."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pqc.seal import hpke_key_schedule

    info = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")
    shared = bytes.fromhex("fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc")
    key, nonce = hpke_key_schedule(0x0020, shared, info, aead_id=0x0001, key_size=16)
    assert key.hex() == "4531685d41d65f03dc48f6b8302c05b0"
    assert nonce.hex() == "56d890e5accaaf011cff4b7d"
    ct = bytes.fromhex("f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a")
    pt = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
    assert AESGCM(key).decrypt(nonce, ct, bytes.fromhex("436f756e742d30")) == pt
