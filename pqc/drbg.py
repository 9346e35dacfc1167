"""NIST SP 800-90A AES-256 CTR_DRBG without a derivation function.

Reproduces ``randombytes_init`` / ``randombytes`` of NIST's ``rng.c`` (the generator behind
every PQC known-answer ``.rsp`` file): 48-byte seed material, no reseeding, and an
``Update`` with no additional input after every request (SP 800-90A, section 10.2.1).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_SEEDLEN = 48  # key (32) + V (16), SP 800-90A table 3 for AES-256
_MASK128 = (1 << 128) - 1


def _aes256_ecb(key: bytes, data: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _counter_blocks(v: int, count: int) -> bytes:
    """The big-endian blocks V+1, ..., V+count (mod 2^128), as ``rng.c`` increments V."""
    return b"".join(((v + i) & _MASK128).to_bytes(16, "big") for i in range(1, count + 1))


class CtrDrbg:
    """AES-256 CTR_DRBG with NIST ``rng.c`` semantics (no derivation function)."""

    def __init__(self, entropy_input: bytes, personalization: bytes | None = None) -> None:
        """Instantiate (SP 800-90A 10.2.1.3.1): seed = entropy_input XOR personalization."""
        if len(entropy_input) != _SEEDLEN:
            raise ValueError(
                f"CTR_DRBG entropy_input must be {_SEEDLEN} bytes, got {len(entropy_input)}"
            )
        seed = bytes(entropy_input)
        if personalization is not None:
            if len(personalization) != _SEEDLEN:
                raise ValueError(
                    f"CTR_DRBG personalization must be {_SEEDLEN} bytes, got {len(personalization)}"
                )
            seed = bytes(a ^ b for a, b in zip(seed, personalization))
        self._key = bytes(32)
        self._v = 0
        self._update(seed)
        self.reseed_counter = 1

    def _update(self, provided_data: bytes | None) -> None:
        """CTR_DRBG_Update (SP 800-90A 10.2.1.2): three blocks become the new key and V."""
        temp = _aes256_ecb(self._key, _counter_blocks(self._v, 3))
        if provided_data is not None:
            temp = bytes(a ^ b for a, b in zip(temp, provided_data))
        self._key = temp[:32]
        self._v = int.from_bytes(temp[32:], "big")

    def random_bytes(self, n: int) -> bytes:
        """Generate n bytes (SP 800-90A 10.2.1.5.1), then Update with no additional input."""
        if n < 0:
            raise ValueError(f"cannot generate a negative number of bytes ({n})")
        blocks = -(-n // 16)
        out = _aes256_ecb(self._key, _counter_blocks(self._v, blocks))[:n] if blocks else b""
        self._v = (self._v + blocks) & _MASK128
        self._update(None)
        self.reseed_counter += 1
        return out
