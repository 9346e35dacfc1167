"""ML-KEM (FIPS 203, August 2024) in pure Python with numpy.

Why this exists: the ``cryptography`` backend offers ML-KEM-768/1024 only through its
randomized, seed-keyed API. It cannot run ML-KEM.Encaps_internal with a given ``m``
(Algorithm 17), nor load an expanded 768k+96-byte decapsulation key, so the NIST ACVP
encapsulation and decapsulation vectors cannot be checked with it; and it has no
ML-KEM-512. This module implements the standard directly so they can.

Conventions follow FIPS 203: polynomials are arrays of 256 coefficients mod q = 3329
(numpy ``int64``, reduced after every operation), vectors of k polynomials are arrays of
shape ``(k, 256)`` and the matrix Â has shape ``(k, k, 256)`` with ``Â[i, j]`` sampled
from ρ‖j‖i. Hash functions (FIPS 203 §4.1) come from ``hashlib``:
H = SHA3-256, G = SHA3-512, J = SHAKE256 (32 bytes), PRF_η = SHAKE256 (64η bytes),
XOF = SHAKE128.

This code is *not* constant time (Python integers and numpy are not); it is meant for
known-answer testing, interoperability checks and ML-KEM-512 where no native backend
exists, not for handling long-term secrets on hostile shared hardware. What it does do is
keep every step on secret data free of secret-dependent branches, indexing and division:
reductions mod q and the divisions of Compress are multiply-and-shift (Barrett; the
KyberSlash timing leak came from dividing secrets by q), and decapsulation selects K' or
K̄ with a mask (docs/crypto.md, "Limits of the pure backend").
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["PARAMS", "MLKEMParams", "MLKEMPure"]

Q = 3329
N = 256
_N_INV = 3303  # 128^{-1} mod q, the final scaling of Algorithm 10

# Division-free arithmetic mod q. floor(y / q) = (y * _M) >> _S exactly for 0 <= y < 2^28
# (_S = 40 >= 28 + log2 q, _M = ceil(2^_S / q)); products stay below 2^57 in int64. Every
# value reduced here lies in (-2^25, 2^25) (at most 2·q² in the base-case product), so adding
# _OFFSET = q·2^14 makes it non-negative and below 2^28.
_S = 40
_M = -(-(1 << _S) // Q)
_OFFSET = Q << 14


def _div_q(y: np.ndarray) -> np.ndarray:
    """floor(y / q) for 0 <= y < 2^28 by multiply and shift: no division on secret data."""
    return (y * _M) >> _S


def _mod_q(x: np.ndarray) -> np.ndarray:
    """x mod q in [0, q) for |x| < 2^25, without a division (the timing of integer division
    depends on its operands on many CPUs)."""
    y = x + _OFFSET
    return y - Q * _div_q(y)


@dataclass(frozen=True)
class MLKEMParams:
    """One row of FIPS 203 Table 2."""

    k: int
    eta1: int
    eta2: int
    du: int
    dv: int


#: FIPS 203 §8, Table 2.
PARAMS: dict[str, MLKEMParams] = {
    "ML-KEM-512": MLKEMParams(k=2, eta1=3, eta2=2, du=10, dv=4),
    "ML-KEM-768": MLKEMParams(k=3, eta1=2, eta2=2, du=10, dv=4),
    "ML-KEM-1024": MLKEMParams(k=4, eta1=2, eta2=2, du=11, dv=5),
}


# --------------------------------------------------------------------------------------
# Constants: ζ^BitRev7(i) for the NTT and γ_i = ζ^(2·BitRev7(i)+1) for base-case products
# (FIPS 203 Appendix A), with ζ = 17.
# --------------------------------------------------------------------------------------

def _bitrev7(i: int) -> int:
    return int(f"{i:07b}"[::-1], 2)


_ZETAS = np.array([pow(17, _bitrev7(i), Q) for i in range(128)], dtype=np.int64)
_GAMMAS = np.array([pow(17, 2 * _bitrev7(i) + 1, Q) for i in range(128)], dtype=np.int64)


# --------------------------------------------------------------------------------------
# Hash functions, FIPS 203 §4.1
# --------------------------------------------------------------------------------------

def _H(s: bytes) -> bytes:
    """H(s) = SHA3-256(s)  (FIPS 203 eq. 4.4)."""
    return hashlib.sha3_256(s).digest()


def _G(c: bytes) -> tuple[bytes, bytes]:
    """G(c) = SHA3-512(c), split into two 32-byte halves  (FIPS 203 eq. 4.5)."""
    out = hashlib.sha3_512(c).digest()
    return out[:32], out[32:]


def _J(s: bytes) -> bytes:
    """J(s) = SHAKE256(s, 8·32)  (FIPS 203 eq. 4.4)."""
    return hashlib.shake_256(s).digest(32)


def _PRF(eta: int, s: bytes, b: int) -> bytes:
    """PRF_η(s, b) = SHAKE256(s‖b, 8·64·η)  (FIPS 203 eq. 4.3)."""
    return hashlib.shake_256(s + bytes([b])).digest(64 * eta)


# --------------------------------------------------------------------------------------
# Encoding, FIPS 203 §4.2.1 (Algorithms 3-6) and compression (eqs. 4.7, 4.8)
# --------------------------------------------------------------------------------------

def _byte_encode(f: np.ndarray, d: int) -> bytes:
    """ByteEncode_d (Algorithm 5), applied to the last axis (256 coefficients) of ``f``.

    Bits are laid out least significant first (BitsToBytes, Algorithm 3); several
    polynomials are encoded one after another.
    """
    f = np.asarray(f, dtype=np.int64).reshape(-1, N)
    bits = (f[:, :, None] >> np.arange(d, dtype=np.int64)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _byte_decode(b: bytes, d: int) -> np.ndarray:
    """ByteDecode_d (Algorithm 6): 32·d bytes per polynomial, shape ``(len(b)//(32d), 256)``.

    For d = 12 the coefficients are reduced mod q, as the standard specifies.
    """
    bits = np.unpackbits(np.frombuffer(b, dtype=np.uint8), bitorder="little")
    vals = bits.reshape(-1, N, d).astype(np.int64) @ (1 << np.arange(d, dtype=np.int64))
    if d == 12:
        vals = _mod_q(vals)
    return vals


def _compress(x: np.ndarray, d: int) -> np.ndarray:
    """Compress_d(x) = ⌈(2^d/q)·x⌋ mod 2^d  (FIPS 203 eq. 4.7), in integers."""
    return _div_q((x << d) + Q // 2) & ((1 << d) - 1)


def _decompress(y: np.ndarray, d: int) -> np.ndarray:
    """Decompress_d(y) = ⌈(q/2^d)·y⌋  (FIPS 203 eq. 4.8), in integers."""
    return (y * Q + (1 << (d - 1))) >> d


# --------------------------------------------------------------------------------------
# Sampling, FIPS 203 §4.2.2 (Algorithms 7, 8)
# --------------------------------------------------------------------------------------

def _sample_ntt(seed34: bytes) -> np.ndarray:
    """SampleNTT (Algorithm 7): rejection-sample one NTT-domain polynomial from SHAKE128.

    Every 3 XOF bytes give two 12-bit candidates d1, d2 (in that order), kept when < q.
    The XOF output is a prefix-stable stream, so asking for more bytes when too few
    candidates survived yields exactly the byte sequence the algorithm would read.
    """
    nbytes = 3 * 168  # three SHAKE128 blocks: 336 candidates, ~273 expected to survive
    while True:
        buf = np.frombuffer(hashlib.shake_128(seed34).digest(nbytes), dtype=np.uint8)
        c = buf.reshape(-1, 3).astype(np.int64)
        d1 = c[:, 0] + 256 * (c[:, 1] & 0x0F)
        d2 = (c[:, 1] >> 4) + 16 * c[:, 2]
        cand = np.stack((d1, d2), axis=1).reshape(-1)
        acc = cand[cand < Q]
        if acc.size >= N:
            return acc[:N].copy()
        nbytes += 168


def _sample_poly_cbd(b: bytes, eta: int) -> np.ndarray:
    """SamplePolyCBD_η (Algorithm 8): centred binomial coefficients from 64η bytes."""
    bits = np.unpackbits(np.frombuffer(b, dtype=np.uint8), bitorder="little")
    s = bits.reshape(N, 2, eta).sum(axis=2, dtype=np.int64)
    return _mod_q(s[:, 0] - s[:, 1])


# --------------------------------------------------------------------------------------
# NTT, FIPS 203 §4.3 (Algorithms 9-12), vectorised over leading axes
# --------------------------------------------------------------------------------------

def _ntt(f: np.ndarray) -> np.ndarray:
    """NTT (Algorithm 9) of every polynomial in ``f`` (shape ``(..., 256)``).

    Layer ``len`` has 128/len butterfly blocks using ζ^BitRev7(i) for
    i = 128/len, ..., 256/len - 1, exactly the order in which Algorithm 9 increments i.
    """
    f = np.array(f, dtype=np.int64, copy=True)
    lead = f.shape[:-1]
    length = 128
    while length >= 2:
        blocks = 128 // length
        z = _ZETAS[blocks:2 * blocks][:, None]
        v = f.reshape(*lead, blocks, 2, length)
        t = _mod_q(z * v[..., 1, :])
        a = v[..., 0, :]
        v = np.stack((_mod_q(a + t), _mod_q(a - t)), axis=-2)
        f = v.reshape(*lead, N)
        length //= 2
    return f


def _ntt_inv(f: np.ndarray) -> np.ndarray:
    """NTT⁻¹ (Algorithm 10) of every polynomial in ``f`` (shape ``(..., 256)``).

    Algorithm 10 walks i downwards from 127, so layer ``len`` uses ζ^BitRev7(i) for
    i = 256/len - 1 down to 128/len; the result is scaled by 128⁻¹ = 3303 mod q.
    """
    f = np.array(f, dtype=np.int64, copy=True)
    lead = f.shape[:-1]
    length = 2
    while length <= 128:
        blocks = 128 // length
        z = _ZETAS[blocks:2 * blocks][::-1][:, None]
        v = f.reshape(*lead, blocks, 2, length)
        a, b = v[..., 0, :], v[..., 1, :]
        v = np.stack((_mod_q(a + b), _mod_q(z * (b - a))), axis=-2)
        f = v.reshape(*lead, N)
        length *= 2
    return _mod_q(f * _N_INV)


def _multiply_ntts(f: np.ndarray, g: np.ndarray) -> np.ndarray:
    """MultiplyNTTs (Algorithm 11) via BaseCaseMultiply (Algorithm 12), broadcasting.

    Pair i holds a degree-1 polynomial mod X² − γ_i: (a0 + a1X)(b0 + b1X) =
    (a0b0 + a1b1γ_i) + (a0b1 + a1b0)X.
    """
    f = np.asarray(f, dtype=np.int64)
    g = np.asarray(g, dtype=np.int64)
    shape = np.broadcast_shapes(f.shape, g.shape)
    a = np.broadcast_to(f, shape).reshape(*shape[:-1], 128, 2)
    b = np.broadcast_to(g, shape).reshape(*shape[:-1], 128, 2)
    a0, a1 = a[..., 0], a[..., 1]
    b0, b1 = b[..., 0], b[..., 1]
    c0 = _mod_q(a0 * b0 + _mod_q(a1 * b1) * _GAMMAS)
    c1 = _mod_q(a0 * b1 + a1 * b0)
    return np.stack((c0, c1), axis=-1).reshape(shape)


def _matvec(a_hat: np.ndarray, v_hat: np.ndarray) -> np.ndarray:
    """Â ∘ v̂ in the NTT domain: result[i] = Σ_j Â[i, j] × v̂[j]  (FIPS 203 §2.4.7)."""
    return _mod_q(_multiply_ntts(a_hat, v_hat[None, :, :]).sum(axis=1))


def _dot(u_hat: np.ndarray, v_hat: np.ndarray) -> np.ndarray:
    """û^T ∘ v̂ in the NTT domain: Σ_j û[j] × v̂[j]."""
    return _mod_q(_multiply_ntts(u_hat, v_hat).sum(axis=0))


def _select(equal: bool, when_equal: bytes, otherwise: bytes) -> bytes:
    """``when_equal`` if ``equal`` else ``otherwise``, by a byte mask rather than a branch
    (Algorithm 18's implicit rejection must not show which key was returned)."""
    mask = np.uint8(-int(equal) & 0xFF)
    a = np.frombuffer(when_equal, dtype=np.uint8)
    b = np.frombuffer(otherwise, dtype=np.uint8)
    return ((a & mask) | (b & ~mask)).tobytes()


# --------------------------------------------------------------------------------------
# The parameterised scheme
# --------------------------------------------------------------------------------------

class MLKEMPure:
    """ML-KEM-512 / -768 / -1024 per FIPS 203, in pure Python + numpy.

    Keys and ciphertexts are the FIPS 203 byte strings: ``ek`` is 384k+32 bytes and
    ``dk`` the *expanded* 768k+96-byte decapsulation key dk_PKE‖ek‖H(ek)‖z
    (Algorithm 16), not the 64-byte seed.
    """

    backend = "pure"
    shared_secret_size = 32
    keypair_coins_size = 64
    encaps_coins_size = 32

    def __init__(self, name: str) -> None:
        name = str(name)
        if name not in PARAMS:
            raise ValueError(f"unknown ML-KEM parameter set {name!r}; "
                             f"expected one of {', '.join(PARAMS)}")
        self.name = name
        self.params = p = PARAMS[name]
        self.k = p.k
        self.public_key_size = 384 * p.k + 32
        self.secret_key_size = 768 * p.k + 96
        self.ciphertext_size = 32 * (p.du * p.k + p.dv)

    def __repr__(self) -> str:
        return f"MLKEMPure({self.name!r})"

    # ---- K-PKE, FIPS 203 §5 ----------------------------------------------------------

    def _expand_a(self, rho: bytes) -> np.ndarray:
        """Â[i, j] = SampleNTT(ρ‖j‖i)  (Algorithm 13 lines 3-7, Algorithm 14 lines 4-8)."""
        k = self.k
        a = np.empty((k, k, N), dtype=np.int64)
        for i in range(k):
            for j in range(k):
                a[i, j] = _sample_ntt(rho + bytes([j, i]))
        return a

    def _sample_vec(self, seed: bytes, eta: int, start: int) -> np.ndarray:
        """k polynomials SamplePolyCBD_η(PRF_η(seed, N)) for N = start, ..., start+k-1."""
        return np.stack([_sample_poly_cbd(_PRF(eta, seed, start + i), eta)
                         for i in range(self.k)])

    def _pke_keygen(self, d: bytes) -> tuple[bytes, bytes]:
        """K-PKE.KeyGen (Algorithm 13): (ek_PKE, dk_PKE) from the 32-byte seed d."""
        p = self.params
        rho, sigma = _G(d + bytes([p.k]))
        a_hat = self._expand_a(rho)
        s = self._sample_vec(sigma, p.eta1, 0)
        e = self._sample_vec(sigma, p.eta1, p.k)
        s_hat = _ntt(s)
        e_hat = _ntt(e)
        t_hat = _mod_q(_matvec(a_hat, s_hat) + e_hat)
        return _byte_encode(t_hat, 12) + rho, _byte_encode(s_hat, 12)

    def _pke_encrypt(self, ek_pke: bytes, m: bytes, r: bytes) -> bytes:
        """K-PKE.Encrypt (Algorithm 14): encrypt the 32-byte m under ek with randomness r."""
        p = self.params
        k = p.k
        t_hat = _byte_decode(ek_pke[:384 * k], 12)
        rho = ek_pke[384 * k:384 * k + 32]
        a_hat = self._expand_a(rho)
        y = self._sample_vec(r, p.eta1, 0)
        e1 = self._sample_vec(r, p.eta2, k)
        e2 = _sample_poly_cbd(_PRF(p.eta2, r, 2 * k), p.eta2)
        y_hat = _ntt(y)
        # u = NTT⁻¹(Â^T ∘ ŷ) + e1: transpose the two matrix axes.
        u = _mod_q(_ntt_inv(_matvec(a_hat.transpose(1, 0, 2), y_hat)) + e1)
        mu = _decompress(_byte_decode(m, 1)[0], 1)
        v = _mod_q(_ntt_inv(_dot(t_hat, y_hat)) + e2 + mu)
        c1 = _byte_encode(_compress(u, p.du), p.du)
        c2 = _byte_encode(_compress(v, p.dv), p.dv)
        return c1 + c2

    def _pke_decrypt(self, dk_pke: bytes, c: bytes) -> bytes:
        """K-PKE.Decrypt (Algorithm 15): recover the 32-byte message from c."""
        p = self.params
        k = p.k
        split = 32 * p.du * k
        u = _decompress(_byte_decode(c[:split], p.du), p.du)
        v = _decompress(_byte_decode(c[split:], p.dv)[0], p.dv)
        s_hat = _byte_decode(dk_pke, 12)
        w = _mod_q(v - _ntt_inv(_dot(s_hat, _ntt(u))))
        return _byte_encode(_compress(w, 1), 1)

    # ---- Input checks, FIPS 203 §7.2 and §7.3 -----------------------------------------

    def _as_bytes(self, value: object, what: str) -> bytes:
        """``value`` as bytes; TypeError (not a silent ``bytes(int)``) for anything else."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{self.name} {what} must be bytes, got {type(value).__name__}")
        return bytes(value)

    def check_encapsulation_key(self, ek: bytes) -> None:
        """Encapsulation key check (FIPS 203 §7.2): type (length) and modulus check.

        Raises ValueError with the reason when ``ek`` fails (TypeError if not bytes).
        """
        ek = self._as_bytes(ek, "encapsulation key")
        if len(ek) != self.public_key_size:
            raise ValueError(f"{self.name} encapsulation key must be {self.public_key_size} "
                             f"bytes, got {len(ek)}")
        t_bytes = ek[:384 * self.k]
        if _byte_encode(_byte_decode(t_bytes, 12), 12) != t_bytes:
            raise ValueError(f"{self.name} encapsulation key fails the modulus check "
                             "(a coefficient is not reduced mod q)")

    def check_decapsulation_key(self, dk: bytes) -> None:
        """Decapsulation key check (FIPS 203 §7.3 items 2-3): type (length) and hash check.

        Raises ValueError with the reason when ``dk`` fails (TypeError if not bytes).
        """
        dk = self._as_bytes(dk, "decapsulation key")
        if len(dk) != self.secret_key_size:
            raise ValueError(f"{self.name} decapsulation key must be {self.secret_key_size} "
                             f"bytes (expanded form), got {len(dk)}")
        k = self.k
        if not hmac.compare_digest(_H(dk[384 * k:768 * k + 32]), dk[768 * k + 32:768 * k + 64]):
            raise ValueError(f"{self.name} decapsulation key fails the hash check "
                             "(H(ek) stored in dk does not match its ek)")

    def _check_ciphertext(self, ct: bytes) -> None:
        """Ciphertext type check (FIPS 203 §7.3 item 1)."""
        ct = self._as_bytes(ct, "ciphertext")
        if len(ct) != self.ciphertext_size:
            raise ValueError(f"{self.name} ciphertext must be {self.ciphertext_size} bytes, "
                             f"got {len(ct)}")

    # ---- ML-KEM, FIPS 203 §6 and §7 --------------------------------------------------

    def keypair_derand(self, coins: bytes) -> tuple[bytes, bytes]:
        """ML-KEM.KeyGen_internal (Algorithm 16) from the 64 coins d‖z.

        Returns (ek, dk) with dk = dk_PKE‖ek‖H(ek)‖z. The same 64 bytes are the "seed"
        other libraries (e.g. ``cryptography``'s ``from_seed_bytes``) accept.
        """
        coins = self._as_bytes(coins, "key generation coins")
        if len(coins) != self.keypair_coins_size:
            raise ValueError(f"{self.name} key generation needs {self.keypair_coins_size} "
                             f"bytes d‖z, got {len(coins)}")
        d, z = coins[:32], coins[32:]
        ek, dk_pke = self._pke_keygen(d)
        return ek, dk_pke + ek + _H(ek) + z

    def generate_keypair(self) -> tuple[bytes, bytes]:
        """ML-KEM.KeyGen (Algorithm 19): fresh d and z from ``os.urandom``."""
        return self.keypair_derand(os.urandom(self.keypair_coins_size))

    def encaps_derand(self, ek: bytes, m: bytes) -> tuple[bytes, bytes]:
        """ML-KEM.Encaps_internal (Algorithm 17) with the given 32-byte m.

        Performs the §7.2 encapsulation key check first. Returns (ct, ss); note the
        order is ciphertext first (``cryptography`` returns (ss, ct)).
        """
        self.check_encapsulation_key(ek)
        m = self._as_bytes(m, "encapsulation coins")
        if len(m) != self.encaps_coins_size:
            raise ValueError(f"{self.name} encapsulation needs {self.encaps_coins_size} "
                             f"random bytes m, got {len(m)}")
        ek = bytes(ek)
        key, r = _G(m + _H(ek))
        return self._pke_encrypt(ek, m, r), key

    def encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        """ML-KEM.Encaps (Algorithm 20): m from ``os.urandom``. Returns (ct, ss)."""
        return self.encaps_derand(ek, os.urandom(self.encaps_coins_size))

    def decapsulate(self, dk: bytes, ct: bytes) -> bytes:
        """ML-KEM.Decaps (Algorithm 21 → Decaps_internal, Algorithm 18).

        Runs the §7.3 input checks (ciphertext and key lengths, dk hash check), then
        decrypts, re-encrypts and compares. On mismatch it returns the implicit-rejection
        key K̄ = J(z‖c) rather than failing, as Algorithm 18 requires.
        """
        self._check_ciphertext(ct)
        self.check_decapsulation_key(dk)
        dk, ct = bytes(dk), bytes(ct)
        k = self.k
        dk_pke = dk[:384 * k]
        ek_pke = dk[384 * k:768 * k + 32]
        h = dk[768 * k + 32:768 * k + 64]
        z = dk[768 * k + 64:768 * k + 96]
        m_prime = self._pke_decrypt(dk_pke, ct)
        k_prime, r_prime = _G(m_prime + h)
        k_bar = _J(z + ct)
        c_prime = self._pke_encrypt(ek_pke, m_prime, r_prime)
        return _select(hmac.compare_digest(ct, c_prime), k_prime, k_bar)
