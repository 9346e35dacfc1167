"""Algorithm identifiers: the one place their names and aliases live.

Every key, ciphertext and signature on the wire carries one of these strings, so a peer
can refuse an algorithm its policy does not allow instead of guessing (no silent downgrade).
"""

from __future__ import annotations

from enum import StrEnum


class KemId(StrEnum):
    ML_KEM_512 = "ML-KEM-512"
    ML_KEM_768 = "ML-KEM-768"
    ML_KEM_1024 = "ML-KEM-1024"
    FRODOKEM_640_AES = "FrodoKEM-640-AES"
    #: Hybrid of ML-KEM-768 and X25519 (HPKE KEM 0x647A): secure while either part holds.
    ML_KEM_768_X25519 = "ML-KEM-768+X25519"


class SigId(StrEnum):
    ML_DSA_44 = "ML-DSA-44"
    ML_DSA_65 = "ML-DSA-65"
    ML_DSA_87 = "ML-DSA-87"


#: Pre-standard names users still write in configurations, mapped to their FIPS form.
#: Dilithium2 was standardised, with changes, as ML-DSA-44 (FIPS 204, August 2024).
ALIASES: dict[str, str] = {
    "Dilithium2": SigId.ML_DSA_44,
    "Dilithium3": SigId.ML_DSA_65,
    "Dilithium5": SigId.ML_DSA_87,
    "Kyber512": KemId.ML_KEM_512,
    "Kyber768": KemId.ML_KEM_768,
    "Kyber1024": KemId.ML_KEM_1024,
    "X25519MLKEM768": KemId.ML_KEM_768_X25519,
}

DEFAULT_KEM = KemId.ML_KEM_768
DEFAULT_SIG = SigId.ML_DSA_44

#: AEAD and KDF for every sealed payload and session key (docs/architecture.md, Cryptography).
AEAD = "AES-256-GCM"
KDF = "HKDF-SHA-256"
DIGEST = "SHA3-256"


def resolve_kem(name: str) -> KemId:
    """The canonical KEM id for ``name`` or an alias; :class:`UnsupportedAlgorithm` if unknown."""
    from pqc.errors import UnsupportedAlgorithm

    canon = ALIASES.get(name, name)
    try:
        return KemId(canon)
    except ValueError:
        raise UnsupportedAlgorithm(
            f"unknown KEM {name!r}; known: {', '.join(k.value for k in KemId)}") from None


def resolve_sig(name: str) -> SigId:
    """The canonical signature id for ``name`` or an alias; :class:`UnsupportedAlgorithm` if unknown."""
    from pqc.errors import UnsupportedAlgorithm

    canon = ALIASES.get(name, name)
    try:
        return SigId(canon)
    except ValueError:
        raise UnsupportedAlgorithm(
            f"unknown signature {name!r}; known: {', '.join(s.value for s in SigId)}") from None
