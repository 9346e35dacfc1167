"""FrodoKEM-640-AES, the ISO "salted" variant, in numpy.

Follows "FrodoKEM: Learning With Errors Key Encapsulation -- Preliminary Standardization
Proposal" (2023), the variant liboqs >= 0.16 calls FrodoKEM-640-AES: encapsulation draws a
32-byte salt that is hashed into (seedSE, k) and appended to the ciphertext. Byte layouts
match the reference implementation (PQCrypto-LWEKE), so NIST KAT files reproduce exactly.

Matrix products run as float64 BLAS products, which are exact here: every product sums at
most 640 terms of |a| < 2^16 times |s| <= 12, far below 2^53. They are cut into row blocks
small enough that OpenBLAS stays single-threaded (on two cores a woken thread pool made the
full-size product about ten times slower).

Python cannot promise constant time; every step that touches secret data keeps a constant
*structure* instead: the error sampler compares each sample with every entry of the CDF table
and sums the comparisons (as the reference implementation does: no search, no table index and
no branch that depends on a secret), and decapsulation always re-encrypts, compares every
coefficient and selects the secret without branching on it (docs/crypto.md, "Limits of the
pure backend").
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Parameters of FrodoKEM-640 (spec section 5.1, table "FrodoKEM parameters").
N = 640
NBAR = 8
LOGQ = 15
QMASK = (1 << LOGQ) - 1
B_BITS = 2  # extracted bits per coefficient of the encoded key
LEN_SEED_A = 16
LEN_SEED_SE = 32
LEN_S = 16
LEN_Z = 16
LEN_MU = B_BITS * NBAR * NBAR // 8  # 16
LEN_SALT = 32
LEN_PKH = 16
LEN_SS = 16
LEN_K = 16
LEN_B = LOGQ * N * NBAR // 8  # 9600, packed n x nbar matrix
LEN_C2 = LOGQ * NBAR * NBAR // 8  # 120, packed nbar x nbar matrix
PK_BYTES = LEN_SEED_A + LEN_B  # 9616
SK_BYTES = LEN_S + PK_BYTES + 2 * N * NBAR + LEN_PKH  # 19888
CT_BYTES = LEN_B + LEN_C2 + LEN_SALT  # 9752

#: Domain separators for SHAKE when sampling S, E (keygen) and S', E', E'' (encaps).
_DS_KEYGEN = b"\x5f"
_DS_ENCAPS = b"\x96"

#: CDF of the FrodoKEM-640 error distribution chi (spec table "Error distributions").
_CDF = np.array(
    [4643, 13363, 20579, 25843, 29227, 31145, 32103, 32525, 32689, 32745, 32762, 32766],
    dtype=np.int32,
)[:, None]  # a column; the last entry, 32767, never changes the count and is left out, as in the reference

_ROW_BLOCK = 64  # rows of A per BLAS call: keeps each call under OpenBLAS' threading size


def _aes_input_blocks() -> bytes:
    """AES-128 inputs for Gen(A) (spec 2.2.5): block (i, j) is i ‖ j ‖ 0^96, 16-bit little-endian."""
    blocks = np.zeros((N, N // 8, 8), dtype="<u2")
    blocks[:, :, 0] = np.arange(N, dtype="<u2")[:, None]
    blocks[:, :, 1] = np.arange(0, N, 8, dtype="<u2")[None, :]
    return blocks.tobytes()


_A_BLOCKS = _aes_input_blocks()  # independent of seedA, so built once


def _shake(data: bytes, n: int) -> bytes:
    return hashlib.shake_128(data).digest(n)


def _gen_a(seed_a: bytes) -> np.ndarray:
    """Gen(A) with AES-128 (spec 2.2.5): A[i, j..j+7] = AES_seedA(i ‖ j ‖ 0), as uint16 (n x n)."""
    out = np.empty(len(_A_BLOCKS) + 16, dtype=np.uint8)
    encryptor = Cipher(algorithms.AES(seed_a), modes.ECB()).encryptor()
    encryptor.update_into(_A_BLOCKS, out)  # update_into is ~10x faster than update here
    return out[: len(_A_BLOCKS)].view("<u2").reshape(N, N)


def _sample(r: bytes) -> np.ndarray:
    """Frodo.SampleMatrix via the CDF (spec 2.2.4): LSB is the sign, the other 15 bits select chi.

    Data-independent, as the reference ``frodo_sample_n``: every 15-bit value is compared
    with *every* table entry and the comparisons summed (``(CDF[j] - v) >> 31`` is -1
    exactly when ``CDF[j] < v``), so neither the work done nor the memory touched depends on
    the secret; the sign is applied with a mask, not a branch.
    """
    words = np.frombuffer(r, dtype="<u2").astype(np.int32)
    magnitude = -((_CDF - (words >> 1)[None, :]) >> 31).sum(axis=0, dtype=np.int64)
    sign = (words & 1).astype(np.int64)
    return (magnitude ^ -sign) + sign


def _mul_a_s(a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A (n x n) times S (n x nbar), exact, as int64 (not yet reduced mod q)."""
    sf = s.astype(np.float64)
    out = np.empty((N, NBAR), dtype=np.float64)
    for r in range(0, N, _ROW_BLOCK):
        np.matmul(a[r : r + _ROW_BLOCK].astype(np.float64), sf, out=out[r : r + _ROW_BLOCK])
    return out.astype(np.int64)


def _mul_s_a(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """S' (nbar x n) times A (n x n), exact, as int64 (not yet reduced mod q)."""
    sf = s.astype(np.float64)
    out = np.zeros((NBAR, N), dtype=np.float64)
    for r in range(0, N, _ROW_BLOCK):
        out += sf[:, r : r + _ROW_BLOCK] @ a[r : r + _ROW_BLOCK].astype(np.float64)
    return out.astype(np.int64)


def _mul_small(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """An (nbar x n) by (n x nbar) product, exact in float64, as int64."""
    return (x.astype(np.float64) @ y.astype(np.float64)).astype(np.int64)


def _pack(values: np.ndarray) -> bytes:
    """Frodo.Pack with D = 15 (spec 2.2.7): 15-bit values, most significant bit first."""
    g = (values.reshape(-1, 8).astype(np.uint64)) & np.uint64(QMASK)
    hi = (
        (g[:, 0] << np.uint64(45))
        | (g[:, 1] << np.uint64(30))
        | (g[:, 2] << np.uint64(15))
        | g[:, 3]
    )
    lo = (
        (g[:, 4] << np.uint64(45))
        | (g[:, 5] << np.uint64(30))
        | (g[:, 6] << np.uint64(15))
        | g[:, 7]
    )
    first = (hi << np.uint64(4)) | (lo >> np.uint64(56))  # bytes 0..7 of each 15-byte group
    second = lo << np.uint64(8)  # bytes 8..14, plus one zero byte dropped below
    out = np.empty((g.shape[0], 15), dtype=np.uint8)
    out[:, :8] = first.astype(">u8").view(np.uint8).reshape(-1, 8)
    out[:, 8:] = second.astype(">u8").view(np.uint8).reshape(-1, 8)[:, :7]
    return out.tobytes()


def _unpack(data: bytes) -> np.ndarray:
    """Frodo.Unpack with D = 15 (spec 2.2.7): the inverse of :func:`_pack`, as int64."""
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 15)
    padded = np.zeros((raw.shape[0], 16), dtype=np.uint8)
    padded[:, :15] = raw
    words = padded.view(">u8").astype(np.uint64)
    first, second = words[:, 0], words[:, 1]
    hi = first >> np.uint64(4)
    lo = ((first & np.uint64(0xF)) << np.uint64(56)) | (second >> np.uint64(8))
    shifts = np.array([45, 30, 15, 0], dtype=np.uint64)
    m = np.uint64(QMASK)
    g = np.concatenate([(hi[:, None] >> shifts) & m, (lo[:, None] >> shifts) & m], axis=1)
    return g.reshape(-1).astype(np.int64)


def _encode(mu: bytes) -> np.ndarray:
    """Frodo.Encode (spec 2.2.6): each 2-bit chunk of mu (LSB first) times q/4, nbar x nbar."""
    bits = np.unpackbits(np.frombuffer(mu, dtype=np.uint8), bitorder="little").astype(np.int64)
    return ((bits[0::2] | (bits[1::2] << 1)) << (LOGQ - B_BITS)).reshape(NBAR, NBAR)


def _decode(w: np.ndarray) -> bytes:
    """Frodo.Decode (spec 2.2.6): round each coefficient to its top 2 bits, LSB-first bytes."""
    v = (((w.reshape(-1) & QMASK) + (1 << (LOGQ - B_BITS - 1))) >> (LOGQ - B_BITS)) & 3
    bits = np.empty(2 * v.size, dtype=np.uint8)
    bits[0::2] = v & 1
    bits[1::2] = v >> 1
    return np.packbits(bits, bitorder="little").tobytes()


def _check_len(what: str, value: bytes, expected: int) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"FrodoKEM-640-AES {what} must be bytes, got {type(value).__name__}")
    if len(value) != expected:
        raise ValueError(f"FrodoKEM-640-AES {what} must be {expected} bytes, got {len(value)}")


class FrodoKEM640AES:
    """FrodoKEM-640-AES (ISO, salted): pk 9616 B, sk 19888 B, ct 9752 B, shared secret 16 B."""

    name = "FrodoKEM-640-AES"
    public_key_size = PK_BYTES
    secret_key_size = SK_BYTES
    ciphertext_size = CT_BYTES
    shared_secret_size = LEN_SS
    keypair_coins_size = LEN_S + LEN_SEED_SE + LEN_Z  # 64
    encaps_coins_size = LEN_MU + LEN_SALT  # 48

    def keypair_derand(self, coins: bytes) -> tuple[bytes, bytes]:
        """FrodoKEM.KeyGen (spec 8.1) from coins = s (16) ‖ seedSE (32) ‖ z (16).

        sk = s ‖ pk ‖ S^T (int16 little-endian, nbar x n) ‖ pkh.
        """
        _check_len("keypair coins", coins, self.keypair_coins_size)
        coins = bytes(coins)
        s = coins[:LEN_S]
        seed_se = coins[LEN_S : LEN_S + LEN_SEED_SE]
        z = coins[LEN_S + LEN_SEED_SE :]
        seed_a = _shake(z, LEN_SEED_A)
        r = _sample(_shake(_DS_KEYGEN + seed_se, 2 * 2 * N * NBAR))
        s_t = r[: N * NBAR].reshape(NBAR, N)  # S stored transposed, as in the reference
        e = r[N * NBAR :].reshape(N, NBAR)
        b = _mul_a_s(_gen_a(seed_a), s_t.T) + e
        pk = seed_a + _pack(b)
        pkh = _shake(pk, LEN_PKH)
        sk = s + pk + s_t.astype("<i2").tobytes() + pkh
        return pk, sk

    def _encrypt(self, pk: bytes, seed_se: bytes, mu: bytes) -> tuple[np.ndarray, np.ndarray]:
        """The PKE part of encapsulation (spec 8.2): B' = S'A + E', C = S'B + E'' + Encode(mu)."""
        r = _sample(_shake(_DS_ENCAPS + seed_se, 2 * (2 * N + NBAR) * NBAR))
        sp = r[: N * NBAR].reshape(NBAR, N)
        ep = r[N * NBAR : 2 * N * NBAR].reshape(NBAR, N)
        epp = r[2 * N * NBAR :].reshape(NBAR, NBAR)
        bp = (_mul_s_a(sp, _gen_a(pk[:LEN_SEED_A])) + ep) & QMASK
        b = _unpack(pk[LEN_SEED_A:]).reshape(N, NBAR)
        c = (_mul_small(sp, b) + epp + _encode(mu)) & QMASK
        return bp, c

    def encaps_derand(self, pk: bytes, coins: bytes) -> tuple[bytes, bytes]:
        """FrodoKEM.Encaps (spec 8.2) from coins = mu (16) ‖ salt (32); returns (ct, ss).

        (seedSE ‖ k) = SHAKE(pkh ‖ mu ‖ salt), ct = c1 ‖ c2 ‖ salt, ss = SHAKE(ct ‖ k).
        """
        _check_len("public key", pk, PK_BYTES)
        _check_len("encapsulation coins", coins, self.encaps_coins_size)
        pk, coins = bytes(pk), bytes(coins)
        mu, salt = coins[:LEN_MU], coins[LEN_MU:]
        pkh = _shake(pk, LEN_PKH)
        g2 = _shake(pkh + mu + salt, LEN_SEED_SE + LEN_K)
        seed_se, k = g2[:LEN_SEED_SE], g2[LEN_SEED_SE:]
        bp, c = self._encrypt(pk, seed_se, mu)
        ct = _pack(bp) + _pack(c) + salt
        return ct, _shake(ct + k, LEN_SS)

    def generate_keypair(self) -> tuple[bytes, bytes]:
        """Key generation with coins from the OS CSPRNG; returns (pk, sk)."""
        return self.keypair_derand(os.urandom(self.keypair_coins_size))

    def encapsulate(self, pk: bytes) -> tuple[bytes, bytes]:
        """Encapsulation with coins from the OS CSPRNG; returns (ct, ss)."""
        _check_len("public key", pk, PK_BYTES)
        return self.encaps_derand(pk, os.urandom(self.encaps_coins_size))

    def decapsulate(self, sk: bytes, ct: bytes) -> bytes:
        """FrodoKEM.Decaps (spec 8.3) with implicit rejection.

        mu' = Decode(C - B'S); re-encrypt with (seedSE' ‖ k') = SHAKE(pkh ‖ mu' ‖ salt);
        ss = SHAKE(ct ‖ k') if (B', C) match, else SHAKE(ct ‖ s).
        """
        _check_len("secret key", sk, SK_BYTES)
        _check_len("ciphertext", ct, CT_BYTES)
        sk, ct = bytes(sk), bytes(ct)
        s = sk[:LEN_S]
        pk = sk[LEN_S : LEN_S + PK_BYTES]
        off = LEN_S + PK_BYTES
        s_t = np.frombuffer(sk[off : off + 2 * N * NBAR], dtype="<i2").reshape(NBAR, N)
        pkh = sk[off + 2 * N * NBAR :]
        salt = ct[LEN_B + LEN_C2 :]

        bp = _unpack(ct[:LEN_B]).reshape(NBAR, N)
        c = _unpack(ct[LEN_B : LEN_B + LEN_C2]).reshape(NBAR, NBAR)
        mu = _decode(c - _mul_small(bp, s_t.T))

        g2 = _shake(pkh + mu + salt, LEN_SEED_SE + LEN_K)
        seed_se, k = g2[:LEN_SEED_SE], g2[LEN_SEED_SE:]
        bpp, cc = self._encrypt(pk, seed_se, mu)

        # Compare every coefficient, then select k' or s with a mask, never a branch.
        diff = np.bitwise_or.reduce(bp ^ bpp, axis=None) | np.bitwise_or.reduce(c ^ cc, axis=None)
        keep = int((int(diff) | -int(diff)) >> 63) + 1  # 1 if equal, 0 otherwise
        full = (1 << (8 * LEN_K)) - 1
        mask = -keep & full  # all ones if equal, zero otherwise
        k_bar = (int.from_bytes(k, "big") & mask) | (int.from_bytes(s, "big") & (mask ^ full))
        return _shake(ct + k_bar.to_bytes(LEN_K, "big"), LEN_SS)
