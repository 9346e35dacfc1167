"""Signatures: ML-DSA (FIPS 204) under one interface, through OpenSSL or liboqs.

Messages may be one buffer or a list/tuple of buffers. A list is signed without joining
it: its parts are absorbed into the external message representative
mu = SHAKE256(tr ‖ 0x00 ‖ |ctx| ‖ ctx ‖ M, 64) (FIPS 204 §5.2 algorithm 2, §6.2 line 6;
tr = SHAKE256(pk, 64)), and ML-DSA signs mu ("external mu", FIPS 204 §6.2 note). The
signature is the same one ``sign`` of the joined message gives.

:meth:`Signature.verify` answers True or False for any signature bytes, garbage included;
it raises only for a malformed public key or context (caller errors).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa

from pqc.backends import CRYPTOGRAPHY, LIBOQS
from pqc.errors import InvalidKey, MalformedInput, UnsupportedOperation
from pqc.ids import SigId
from pqc.params import MAX_CONTEXT, SIG_PARAMS
from pqc.policy import require_length

Message = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


def _check_message(message: object) -> None:
    parts = message if isinstance(message, (list, tuple)) else (message,)
    for part in parts:
        if not isinstance(part, (bytes, bytearray, memoryview)):
            raise MalformedInput(f"message parts must be bytes-like, got {type(part).__name__}")


def _check_context(context: object) -> bytes:
    if not isinstance(context, (bytes, bytearray, memoryview)):
        raise MalformedInput(f"context must be bytes, got {type(context).__name__}")
    if len(context) > MAX_CONTEXT:
        raise MalformedInput(f"context must be at most {MAX_CONTEXT} bytes (FIPS 204 §5.2), got {len(context)}")
    return bytes(context)


class Signature:
    """A signature scheme under one backend. Keys and signatures are raw bytes."""

    name: str
    backend: str
    public_key_size: int
    secret_key_size: int
    signature_size: int
    #: Length of the seed :meth:`keypair_derand` takes; None if the backend cannot.
    keypair_seed_size: int | None = None

    def __init__(self, alg: SigId, secret_key_size: int) -> None:
        p = SIG_PARAMS[alg]
        self.name = alg.value
        self.public_key_size = p.public_key
        self.secret_key_size = secret_key_size
        self.signature_size = p.signature

    def __repr__(self) -> str:
        return f"<Signature {self.name} backend={self.backend}>"

    def generate_keypair(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, secret_key)`` (FIPS 204 §5.1)."""
        return self._generate()

    def keypair_derand(self, seed: bytes) -> tuple[bytes, bytes]:
        """``(public_key, secret_key)`` from the 32-byte seed ξ (FIPS 204 §6.1, KeyGen_internal)."""
        if self.keypair_seed_size is None:
            raise UnsupportedOperation(f"{self.name} on {self.backend} has no seeded key generation")
        return self._keypair_derand(require_length(seed, self.keypair_seed_size, f"{self.name} seed"))

    def sign(self, secret_key: bytes, message: Message, context: bytes = b"") -> bytes:
        """ML-DSA.Sign (FIPS 204 §5.2, hedged) of ``message`` under ``context``."""
        sk = require_length(secret_key, self.secret_key_size, f"{self.name} secret key", InvalidKey)
        _check_message(message)
        return self._sign(sk, message, _check_context(context))

    def verify(self, public_key: bytes, message: Message, signature: bytes, context: bytes = b"") -> bool:
        """ML-DSA.Verify (FIPS 204 §5.3): True only for a valid signature; never raises on garbage."""
        pk = require_length(public_key, self.public_key_size, f"{self.name} public key", InvalidKey)
        _check_message(message)
        ctx = _check_context(context)
        if not isinstance(signature, (bytes, bytearray, memoryview)) or len(signature) != self.signature_size:
            return False
        try:
            return self._verify(pk, message, bytes(signature), ctx)
        except InvalidKey:
            raise
        except Exception:  # noqa: BLE001 - fail closed on anything a backend raises
            return False

    def _generate(self) -> tuple[bytes, bytes]:
        raise NotImplementedError

    def _keypair_derand(self, seed: bytes) -> tuple[bytes, bytes]:
        raise NotImplementedError

    def _sign(self, sk: bytes, message: Message, context: bytes) -> bytes:
        raise NotImplementedError

    def _verify(self, pk: bytes, message: Message, signature: bytes, context: bytes) -> bool:
        raise NotImplementedError


_OPENSSL_MLDSA: dict[SigId, Any] = {
    SigId.ML_DSA_44: (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
    SigId.ML_DSA_65: (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
    SigId.ML_DSA_87: (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
}


@functools.lru_cache(maxsize=256)
def _private_key(cls: Any, seed: bytes) -> Any:
    """Key objects rebuilt from a seed, cached: expanding ξ costs as much as a verify."""
    return cls.from_seed_bytes(seed)


@functools.lru_cache(maxsize=4096)
def _public_key(cls: Any, pk: bytes) -> Any:
    return cls.from_public_bytes(pk)


class CryptographyMLDSA(Signature):
    """ML-DSA through OpenSSL. The secret key is the 32-byte seed ξ (FIPS 204 §6.1)."""

    backend = CRYPTOGRAPHY

    def __init__(self, alg: SigId) -> None:
        seed = SIG_PARAMS[alg].seed
        super().__init__(alg, seed)
        self.keypair_seed_size = seed
        self._priv, self._pub = _OPENSSL_MLDSA[alg]

    def public_key_object(self, pk: bytes) -> Any:
        try:
            return _public_key(self._pub, bytes(pk))
        except ValueError as exc:
            raise InvalidKey(f"{self.name} public key refused: {exc}") from None

    def _generate(self) -> tuple[bytes, bytes]:
        key = self._priv.generate()
        return key.public_key().public_bytes_raw(), key.private_bytes_raw()

    def _keypair_derand(self, seed: bytes) -> tuple[bytes, bytes]:
        key = self._priv.from_seed_bytes(seed)
        return key.public_key().public_bytes_raw(), key.private_bytes_raw()

    def _sign(self, sk: bytes, message: Message, context: bytes) -> bytes:
        key = _private_key(self._priv, bytes(sk))
        if isinstance(message, (list, tuple)):
            hasher = mldsa.MLDSAMuHasher(key.public_key(), context or None)
            for part in message:
                hasher.update(part)
            return key.sign_mu(hasher.finalize())
        return key.sign(message, context or None)

    def _verify(self, pk: bytes, message: Message, signature: bytes, context: bytes) -> bool:
        key = self.public_key_object(pk)
        try:
            if isinstance(message, (list, tuple)):
                hasher = mldsa.MLDSAMuHasher(key, context or None)
                for part in message:
                    hasher.update(part)
                key.verify_mu(signature, hasher.finalize())
            else:
                key.verify(signature, message, context or None)
        except InvalidSignature:
            return False
        return True


class LiboqsMLDSA(Signature):
    """ML-DSA through liboqs-python. Secret keys are the expanded FIPS 204 encoding.

    liboqs has no external-mu interface, so a list message is joined before signing.
    """

    backend = LIBOQS

    def __init__(self, alg: SigId, oqs: ModuleType) -> None:
        super().__init__(alg, SIG_PARAMS[alg].expanded_secret_key)
        self._oqs = oqs

    def _generate(self) -> tuple[bytes, bytes]:
        with self._oqs.Signature(self.name) as s:
            pk = s.generate_keypair()
            return bytes(pk), bytes(s.export_secret_key())

    @staticmethod
    def _joined(message: Message) -> bytes:
        return b"".join(message) if isinstance(message, (list, tuple)) else bytes(message)

    def _sign(self, sk: bytes, message: Message, context: bytes) -> bytes:
        with self._oqs.Signature(self.name, secret_key=sk) as s:
            return bytes(s.sign_with_ctx_str(self._joined(message), context))

    def _verify(self, pk: bytes, message: Message, signature: bytes, context: bytes) -> bool:
        with self._oqs.Signature(self.name) as s:
            return bool(s.verify_with_ctx_str(self._joined(message), signature, context, pk))
