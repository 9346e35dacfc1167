"""Sizes of every algorithm, in bytes: the one place they are written down.

ML-KEM from FIPS 203 §8 table 3; ML-DSA from FIPS 204 §4 table 2; FrodoKEM-640-AES from
the FrodoKEM specification (ISO variant, table A.1); X25519 from RFC 7748 §5.

Secret keys have two encodings. OpenSSL (the ``cryptography`` backend) exports only the
*seed*: 64 bytes d ‖ z for ML-KEM (FIPS 203 §7.1, ``ML-KEM.KeyGen_internal(d, z)``) and
32 bytes ξ for ML-DSA (FIPS 204 §6.1). liboqs exports the *expanded* key (dk of FIPS 203
§7.1, sk of FIPS 204 §6.1). Public keys, ciphertexts and signatures are the same bytes
under every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from pqc.ids import KemId, SigId

X25519_KEY = 32


@dataclass(frozen=True)
class KemParams:
    public_key: int
    ciphertext: int
    shared_secret: int
    #: Standard (expanded) secret key, as liboqs and the KAT files encode it.
    expanded_secret_key: int
    #: Randomness of key generation (the seed OpenSSL stores as the secret key).
    keypair_coins: int
    #: Randomness of encapsulation (m of FIPS 203 §6.2; mu ‖ salt for FrodoKEM).
    encaps_coins: int | None


@dataclass(frozen=True)
class SigParams:
    public_key: int
    expanded_secret_key: int
    signature: int
    #: ξ of FIPS 204 §6.1, the seed OpenSSL stores as the secret key.
    seed: int = 32


KEM_PARAMS: dict[KemId, KemParams] = {
    KemId.ML_KEM_512: KemParams(800, 768, 32, 1632, 64, 32),
    KemId.ML_KEM_768: KemParams(1184, 1088, 32, 2400, 64, 32),
    KemId.ML_KEM_1024: KemParams(1568, 1568, 32, 3168, 64, 32),
    KemId.FRODOKEM_640_AES: KemParams(9616, 9752, 16, 19888, 64, 48),
    # ML-KEM-768 then X25519 in every field (X-Wing order); the secret key is the two seeds.
    KemId.ML_KEM_768_X25519: KemParams(1184 + X25519_KEY, 1088 + X25519_KEY, 32,
                                       64 + X25519_KEY, 64 + X25519_KEY, None),
}

SIG_PARAMS: dict[SigId, SigParams] = {
    SigId.ML_DSA_44: SigParams(1312, 2560, 2420),
    SigId.ML_DSA_65: SigParams(1952, 4032, 3309),
    SigId.ML_DSA_87: SigParams(2592, 4896, 4627),
}

#: ML-DSA context strings are at most 255 bytes (FIPS 204 §5.2, algorithm 2).
MAX_CONTEXT = 255
