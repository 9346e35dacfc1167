"""Key encapsulation: one interface, three backends.

Every KEM object returns ``(ct, ss)`` from :meth:`Kem.encapsulate` (OpenSSL's order is
``(ss, ct)``; liboqs's is ``(ct, ss)``) and checks every input length before a backend
sees it. Decapsulation of a well-formed but wrong ciphertext returns the implicit-rejection
secret (FIPS 203 §6.3, algorithm 18 step 9), never an error.
"""

from __future__ import annotations

import functools
import hashlib
import os
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from pqc.backends import CRYPTOGRAPHY, LIBOQS, PURE
from pqc.errors import InvalidKey, MalformedInput, UnsupportedOperation
from pqc.ids import KemId
from pqc.params import KEM_PARAMS, X25519_KEY
from pqc.policy import require_length

#: X-Wing's combiner label (draft-connolly-cfrg-xwing-kem §5.3), the ASCII art "\.//^\".
XWING_LABEL = b"\\.//^\\"


class Kem:
    """A KEM under one backend. Keys, ciphertexts and secrets are raw bytes."""

    name: str
    backend: str
    public_key_size: int
    secret_key_size: int
    ciphertext_size: int
    shared_secret_size: int
    #: Length of the coins :meth:`keypair_derand` takes; None if the backend cannot.
    keypair_coins_size: int | None = None
    #: Length of the coins :meth:`encaps_derand` takes; None if the backend cannot.
    encaps_coins_size: int | None = None

    def __init__(self, alg: KemId, secret_key_size: int) -> None:
        p = KEM_PARAMS[alg]
        self.name = alg.value
        self.public_key_size = p.public_key
        self.secret_key_size = secret_key_size
        self.ciphertext_size = p.ciphertext
        self.shared_secret_size = p.shared_secret

    def __repr__(self) -> str:
        return f"<Kem {self.name} backend={self.backend}>"

    def generate_keypair(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, secret_key)``."""
        return self._generate()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """``(ciphertext, shared_secret)`` for ``public_key`` (FIPS 203 §7.2)."""
        pk = require_length(public_key, self.public_key_size, f"{self.name} public key", InvalidKey)
        return self._encapsulate(pk)

    def decapsulate(self, secret_key: bytes, ciphertext: bytes) -> bytes:
        """The shared secret for ``ciphertext`` (FIPS 203 §7.3); implicit rejection on forgery."""
        sk = require_length(secret_key, self.secret_key_size, f"{self.name} secret key", InvalidKey)
        ct = require_length(ciphertext, self.ciphertext_size, f"{self.name} ciphertext")
        return self._decapsulate(sk, ct)

    def keypair_derand(self, coins: bytes) -> tuple[bytes, bytes]:
        """Deterministic key generation from ``coins`` (FIPS 203 §6.1: d ‖ z)."""
        if self.keypair_coins_size is None:
            raise UnsupportedOperation(f"{self.name} on {self.backend} has no derandomized key generation")
        c = require_length(coins, self.keypair_coins_size, f"{self.name} key generation coins")
        return self._keypair_derand(c)

    def encaps_derand(self, public_key: bytes, coins: bytes) -> tuple[bytes, bytes]:
        """Deterministic encapsulation (FIPS 203 §6.2, ML-KEM.Encaps_internal with m = coins)."""
        if self.encaps_coins_size is None:
            raise UnsupportedOperation(f"{self.name} on {self.backend} has no derandomized encapsulation")
        pk = require_length(public_key, self.public_key_size, f"{self.name} public key", InvalidKey)
        c = require_length(coins, self.encaps_coins_size, f"{self.name} encapsulation coins")
        return self._encaps_derand(pk, c)

    # Backends implement these on length-checked bytes.
    def _generate(self) -> tuple[bytes, bytes]:
        raise NotImplementedError

    def _encapsulate(self, pk: bytes) -> tuple[bytes, bytes]:
        raise NotImplementedError

    def _decapsulate(self, sk: bytes, ct: bytes) -> bytes:
        raise NotImplementedError

    def _keypair_derand(self, coins: bytes) -> tuple[bytes, bytes]:
        raise NotImplementedError

    def _encaps_derand(self, pk: bytes, coins: bytes) -> tuple[bytes, bytes]:
        raise NotImplementedError


_OPENSSL_MLKEM: dict[KemId, type[mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey]] = {
    KemId.ML_KEM_768: mlkem.MLKEM768PrivateKey,
    KemId.ML_KEM_1024: mlkem.MLKEM1024PrivateKey,
}
_OPENSSL_MLKEM_PUB: dict[KemId, type[mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey]] = {
    KemId.ML_KEM_768: mlkem.MLKEM768PublicKey,
    KemId.ML_KEM_1024: mlkem.MLKEM1024PublicKey,
}


@functools.lru_cache(maxsize=64)
def _key_from_seed(cls: Any, seed: bytes) -> Any:
    """Decapsulation keys rebuilt from their seed, cached: a long-lived recipient (the
    enclave, the coordinator) would otherwise expand its key for every message."""
    return cls.from_seed_bytes(seed)


class CryptographyMLKEM(Kem):
    """ML-KEM-768/1024 through OpenSSL. The secret key is the 64-byte seed d ‖ z (FIPS 203 §7.1)."""

    backend = CRYPTOGRAPHY

    def __init__(self, alg: KemId) -> None:
        super().__init__(alg, KEM_PARAMS[alg].keypair_coins)
        self.keypair_coins_size = KEM_PARAMS[alg].keypair_coins
        self._priv = _OPENSSL_MLKEM[alg]
        self._pub = _OPENSSL_MLKEM_PUB[alg]

    def public_key_object(self, pk: bytes) -> Any:
        """The OpenSSL key for ``pk``; FIPS 203 §7.2 modulus check failures become InvalidKey."""
        try:
            return self._pub.from_public_bytes(pk)
        except ValueError as exc:
            raise InvalidKey(f"{self.name} public key refused: {exc}") from None

    def private_key_object(self, sk: bytes) -> Any:
        return _key_from_seed(self._priv, bytes(sk))

    def _generate(self) -> tuple[bytes, bytes]:
        key = self._priv.generate()
        return key.public_key().public_bytes_raw(), key.private_bytes_raw()

    def _keypair_derand(self, coins: bytes) -> tuple[bytes, bytes]:
        key = self._priv.from_seed_bytes(coins)
        return key.public_key().public_bytes_raw(), key.private_bytes_raw()

    def _encapsulate(self, pk: bytes) -> tuple[bytes, bytes]:
        ss, ct = self.public_key_object(pk).encapsulate()
        return ct, ss

    def _decapsulate(self, sk: bytes, ct: bytes) -> bytes:
        return self.private_key_object(sk).decapsulate(ct)


class CryptographyHybrid(Kem):
    """ML-KEM-768 + X25519, X-Wing style, through OpenSSL.

    pk = ek (1184) ‖ X25519 public (32); ct = c (1088) ‖ ephemeral X25519 public (32);
    sk = ML-KEM seed d ‖ z (64) ‖ X25519 private (32). The KEM's shared secret is X-Wing's
    combiner SHA3-256(ss_M ‖ ss_X ‖ ct_X ‖ pk_X ‖ label) (draft-connolly-cfrg-xwing-kem
    §5.3), secure while either component holds. Sealing with this algorithm uses HPKE's
    own MLKEM768-X25519 KEM instead, which takes the same key encoding.
    """

    backend = CRYPTOGRAPHY
    _mlkem = CryptographyMLKEM(KemId.ML_KEM_768)

    def __init__(self) -> None:
        super().__init__(KemId.ML_KEM_768_X25519, KEM_PARAMS[KemId.ML_KEM_768_X25519].keypair_coins)
        self.keypair_coins_size = self.secret_key_size

    def split_public(self, pk: bytes) -> tuple[Any, x25519.X25519PublicKey]:
        m = self._mlkem.public_key_object(pk[:-X25519_KEY])
        return m, x25519.X25519PublicKey.from_public_bytes(pk[-X25519_KEY:])

    def split_private(self, sk: bytes) -> tuple[Any, x25519.X25519PrivateKey]:
        m = self._mlkem.private_key_object(sk[:-X25519_KEY])
        return m, x25519.X25519PrivateKey.from_private_bytes(sk[-X25519_KEY:])

    def _from_parts(self, m_seed: bytes, x_key: x25519.X25519PrivateKey) -> tuple[bytes, bytes]:
        m_pk, m_sk = self._mlkem._keypair_derand(m_seed)
        x_pk = x_key.public_key().public_bytes_raw()
        return m_pk + x_pk, m_sk + x_key.private_bytes_raw()

    def _generate(self) -> tuple[bytes, bytes]:
        return self._from_parts(os.urandom(64), x25519.X25519PrivateKey.generate())

    def _keypair_derand(self, coins: bytes) -> tuple[bytes, bytes]:
        return self._from_parts(coins[:64], x25519.X25519PrivateKey.from_private_bytes(coins[64:]))

    @staticmethod
    def _combine(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes) -> bytes:
        return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()

    def _encapsulate(self, pk: bytes) -> tuple[bytes, bytes]:
        m_pub, x_pub = self.split_public(pk)
        ss_m, ct_m = m_pub.encapsulate()
        eph = x25519.X25519PrivateKey.generate()
        ct_x = eph.public_key().public_bytes_raw()
        try:
            ss_x = eph.exchange(x_pub)
        except ValueError:  # all-zero output: a small-order X25519 public key
            raise InvalidKey(f"{self.name} X25519 public key has small order") from None
        return ct_m + ct_x, self._combine(ss_m, ss_x, ct_x, pk[-X25519_KEY:])

    def _decapsulate(self, sk: bytes, ct: bytes) -> bytes:
        m_priv, x_priv = self.split_private(sk)
        ct_m, ct_x = ct[:-X25519_KEY], ct[-X25519_KEY:]
        ss_m = m_priv.decapsulate(ct_m)
        try:
            ss_x = x_priv.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
        except ValueError:
            raise MalformedInput(f"{self.name} ciphertext carries a small-order X25519 key") from None
        pk_x = x_priv.public_key().public_bytes_raw()
        return self._combine(ss_m, ss_x, ct_x, pk_x)


class DelegatingKem(Kem):
    """A KEM backed by an object with the same method names (``pqc.frodo``, ``pqc.mlkem_pure``)."""

    def __init__(self, alg: KemId, impl: Any, backend: str = PURE) -> None:
        super().__init__(alg, impl.secret_key_size)
        self.backend = backend
        self._impl = impl
        self.keypair_coins_size = getattr(impl, "keypair_coins_size", None)
        self.encaps_coins_size = getattr(impl, "encaps_coins_size", None)

    def _call(self, method: str, *args: bytes) -> Any:
        try:
            return getattr(self._impl, method)(*args)
        except (ValueError, TypeError) as exc:
            raise InvalidKey(f"{self.name} ({self.backend}) refused the input: {exc}") from None

    def _generate(self) -> tuple[bytes, bytes]:
        return self._impl.generate_keypair()

    def _encapsulate(self, pk: bytes) -> tuple[bytes, bytes]:
        return self._call("encapsulate", pk)

    def _decapsulate(self, sk: bytes, ct: bytes) -> bytes:
        return self._call("decapsulate", sk, ct)

    def _keypair_derand(self, coins: bytes) -> tuple[bytes, bytes]:
        return self._impl.keypair_derand(coins)

    def _encaps_derand(self, pk: bytes, coins: bytes) -> tuple[bytes, bytes]:
        return self._call("encaps_derand", pk, coins)


class LiboqsKem(Kem):
    """A KEM through liboqs-python. Secret keys are liboqs's expanded encoding."""

    backend = LIBOQS

    def __init__(self, alg: KemId, oqs: ModuleType) -> None:
        super().__init__(alg, KEM_PARAMS[alg].expanded_secret_key)
        self._oqs = oqs
        with oqs.KeyEncapsulation(alg.value) as k:
            details = k.details
        # Trust but verify: the library's sizes must be the standard's.
        for ours, theirs in ((self.public_key_size, "length_public_key"),
                             (self.secret_key_size, "length_secret_key"),
                             (self.ciphertext_size, "length_ciphertext"),
                             (self.shared_secret_size, "length_shared_secret")):
            if details.get(theirs, ours) != ours:
                raise UnsupportedOperation(f"liboqs {alg.value} {theirs}={details[theirs]}, expected {ours}")

    def _generate(self) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(self.name) as k:
            pk = k.generate_keypair()
            return bytes(pk), bytes(k.export_secret_key())

    def _encapsulate(self, pk: bytes) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(self.name) as k:
            ct, ss = k.encap_secret(pk)
            return bytes(ct), bytes(ss)

    def _decapsulate(self, sk: bytes, ct: bytes) -> bytes:
        with self._oqs.KeyEncapsulation(self.name, secret_key=sk) as k:
            return bytes(k.decap_secret(ct))
