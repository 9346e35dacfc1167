"""The pure ML-KEM (FIPS 203) against NIST ACVP vectors and the ``cryptography`` backend.

ACVP files merge prompt and expected results; each test group may carry fields shared by
its tests (the decapsulation group holds ek/dk once), so the loader merges group fields
into every case.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem as crypto_mlkem

from pqc import mlkem_pure
from pqc.mlkem_pure import MLKEMPure

VECTORS = Path(__file__).resolve().parent / "vectors"

SIZES = {  # FIPS 203 Table 3: ek, dk, ct
    "ML-KEM-512": (800, 1632, 768),
    "ML-KEM-768": (1184, 2400, 1088),
    "ML-KEM-1024": (1568, 3168, 1568),
}
CRYPTO_PRIVATE = {
    "ML-KEM-768": crypto_mlkem.MLKEM768PrivateKey,
    "ML-KEM-1024": crypto_mlkem.MLKEM1024PrivateKey,
}


def load_acvp(filename: str) -> list[dict]:
    """Every case of an ACVP JSON file, each merged with its group's fields."""
    doc = json.loads((VECTORS / filename).read_text())
    assert doc["algorithm"] == "ML-KEM" and doc["revision"] == "FIPS203"
    return [{**{k: v for k, v in group.items() if k != "tests"}, **case}
            for group in doc["testGroups"] for case in group["tests"]]


def _b(case: dict, field: str) -> bytes:
    return bytes.fromhex(case[field])


def _seed(label: str, n: int) -> bytes:
    """Reproducible test coins."""
    return hashlib.shake_256(label.encode()).digest(n)


KEYGEN = load_acvp("ML-KEM-768-keyGen.json")
ENCAP_DECAP = load_acvp("ML-KEM-768-encapDecap.json")
KNOWN_FUNCTIONS = {"encapsulation", "decapsulation",
                   "encapsulationKeyCheck", "decapsulationKeyCheck"}


@pytest.fixture(scope="module")
def kem768() -> MLKEMPure:
    return MLKEMPure("ML-KEM-768")


# ---- ACVP known answers --------------------------------------------------------------

def test_vector_files_are_what_we_expect() -> None:
    assert KEYGEN and ENCAP_DECAP
    assert {c["parameterSet"] for c in KEYGEN + ENCAP_DECAP} == {"ML-KEM-768"}
    functions = {c["function"] for c in ENCAP_DECAP}
    assert functions <= KNOWN_FUNCTIONS, f"unhandled ACVP functions {functions - KNOWN_FUNCTIONS}"
    assert {"encapsulation", "decapsulation"} <= functions


@pytest.mark.parametrize("case", KEYGEN, ids=lambda c: f"tc{c['tcId']}")
def test_acvp_keygen(kem768: MLKEMPure, case: dict) -> None:
    ek, dk = kem768.keypair_derand(_b(case, "d") + _b(case, "z"))
    assert ek == _b(case, "ek")
    assert dk == _b(case, "dk")


@pytest.mark.parametrize("case", ENCAP_DECAP,
                         ids=lambda c: f"{c['function']}-tc{c['tcId']}")
def test_acvp_encap_decap(kem768: MLKEMPure, case: dict) -> None:
    function = case["function"]
    if function == "encapsulation":
        ct, ss = kem768.encaps_derand(_b(case, "ek"), _b(case, "m"))
        assert ct == _b(case, "c")
        assert ss == _b(case, "k")
        if "dk" in case:  # the merged file also gives the matching dk
            assert kem768.decapsulate(_b(case, "dk"), ct) == ss
    elif function == "decapsulation":
        dk, ct = _b(case, "dk"), _b(case, "c")
        ss = kem768.decapsulate(dk, ct)
        assert ss == _b(case, "k")
        if case.get("reason") == "modify ciphertext":
            # Implicit rejection (FIPS 203 Alg. 18): K̄ = J(z‖c), z being dk's last 32 bytes.
            assert ss == hashlib.shake_256(dk[-32:] + ct).digest(32)
    elif function == "encapsulationKeyCheck":
        if case["testPassed"]:
            kem768.check_encapsulation_key(_b(case, "ek"))
        else:
            with pytest.raises(ValueError):
                kem768.check_encapsulation_key(_b(case, "ek"))
    elif function == "decapsulationKeyCheck":
        if case["testPassed"]:
            kem768.check_decapsulation_key(_b(case, "dk"))
        else:
            with pytest.raises(ValueError):
                kem768.check_decapsulation_key(_b(case, "dk"))
    else:  # pragma: no cover - guarded by test_vector_files_are_what_we_expect
        pytest.fail(f"unknown ACVP function {function!r}")


# ---- Cross-checks with the cryptography package (OpenSSL) ------------------------------

@pytest.mark.parametrize("name", sorted(CRYPTO_PRIVATE))
@pytest.mark.parametrize("trial", range(3))
def test_cross_check_with_cryptography(name: str, trial: int) -> None:
    kem = MLKEMPure(name)
    coins = _seed(f"{name}-keypair-{trial}", 64)
    ek, dk = kem.keypair_derand(coins)

    private = CRYPTO_PRIVATE[name].from_seed_bytes(coins)
    public = private.public_key()
    assert public.public_bytes_raw() == ek

    # cryptography encapsulates, pure decapsulates.
    ss, ct = public.encapsulate()
    assert kem.decapsulate(dk, ct) == ss

    # pure encapsulates, cryptography decapsulates.
    ct2, ss2 = kem.encapsulate(ek)
    assert len(ct2) == kem.ciphertext_size
    assert private.decapsulate(ct2) == ss2

    # Both implement the same implicit rejection for a tampered ciphertext.
    bad = bytearray(ct2)
    bad[trial * 97 % len(bad)] ^= 0x01
    rejected = kem.decapsulate(dk, bytes(bad))
    assert rejected != ss2
    assert private.decapsulate(bytes(bad)) == rejected


# ---- Every parameter set ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes(name: str) -> None:
    kem = MLKEMPure(name)
    assert kem.name == name and kem.backend == "pure"
    assert (kem.public_key_size, kem.secret_key_size, kem.ciphertext_size) == SIZES[name]
    assert (kem.shared_secret_size, kem.keypair_coins_size, kem.encaps_coins_size) == (32, 64, 32)
    ek, dk = kem.generate_keypair()
    assert (len(ek), len(dk)) == SIZES[name][:2]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_round_trip_and_determinism(name: str) -> None:
    kem = MLKEMPure(name)
    ek, dk = kem.generate_keypair()
    ct, ss = kem.encapsulate(ek)
    assert len(ss) == 32
    assert kem.decapsulate(dk, ct) == ss

    coins, m = _seed(f"{name}-det", 64), _seed(f"{name}-m", 32)
    assert kem.keypair_derand(coins) == kem.keypair_derand(coins)
    ek2, dk2 = kem.keypair_derand(coins)
    assert dk2[-32:] == coins[32:]  # dk ends with z (FIPS 203 Alg. 16)
    assert kem.encaps_derand(ek2, m) == kem.encaps_derand(ek2, m)
    ct2, ss2 = kem.encaps_derand(ek2, m)
    assert kem.decapsulate(dk2, ct2) == ss2


@pytest.mark.parametrize("name", sorted(SIZES))
def test_tampered_ciphertext_gives_implicit_rejection_secret(name: str) -> None:
    kem = MLKEMPure(name)
    ek, dk = kem.keypair_derand(_seed(f"{name}-reject", 64))
    ct, ss = kem.encaps_derand(ek, _seed(f"{name}-reject-m", 32))
    z = dk[-32:]
    for position in (0, len(ct) // 2, len(ct) - 1):
        bad = bytearray(ct)
        bad[position] ^= 0x80
        bad = bytes(bad)
        rejected = kem.decapsulate(dk, bad)
        assert rejected != ss
        assert rejected == hashlib.shake_256(z + bad).digest(32)  # K̄ = J(z‖c')


# ---- Input checks (FIPS 203 §7.2, §7.3) ------------------------------------------------

def test_unknown_parameter_set() -> None:
    with pytest.raises(ValueError, match="unknown ML-KEM parameter set"):
        MLKEMPure("ML-KEM-2048")


def test_encapsulation_key_checks(kem768: MLKEMPure) -> None:
    ek, _ = kem768.keypair_derand(_seed("ek-check", 64))
    kem768.check_encapsulation_key(ek)
    with pytest.raises(ValueError, match="must be 1184 bytes"):
        kem768.encapsulate(ek[:-1])
    with pytest.raises(ValueError, match="must be 1184 bytes"):
        kem768.encapsulate(ek + b"\0")
    # First coefficient := q = 3329 = 0xD01 (12 bits, little-endian): not reduced mod q.
    bad = bytearray(ek)
    bad[0] = 0x01
    bad[1] = (bad[1] & 0xF0) | 0x0D
    with pytest.raises(ValueError, match="modulus check"):
        kem768.check_encapsulation_key(bytes(bad))
    with pytest.raises(ValueError, match="modulus check"):
        kem768.encaps_derand(bytes(bad), bytes(32))
    with pytest.raises(ValueError, match="32 random bytes"):
        kem768.encaps_derand(ek, bytes(31))


def test_decapsulation_key_and_ciphertext_checks(kem768: MLKEMPure) -> None:
    ek, dk = kem768.keypair_derand(_seed("dk-check", 64))
    ct, _ = kem768.encapsulate(ek)
    kem768.check_decapsulation_key(dk)
    with pytest.raises(ValueError, match="must be 2400 bytes"):
        kem768.decapsulate(dk[:-1], ct)
    with pytest.raises(ValueError, match="must be 2400 bytes"):
        kem768.decapsulate(_seed("dk-check", 64), ct)  # a seed is not an expanded dk
    with pytest.raises(ValueError, match="ciphertext must be 1088 bytes"):
        kem768.decapsulate(dk, ct[:-1])
    bad = bytearray(dk)
    bad[768 * 3 + 32] ^= 0x01  # corrupt the stored H(ek)
    with pytest.raises(ValueError, match="hash check"):
        kem768.decapsulate(bytes(bad), ct)
    bad = bytearray(dk)
    bad[384 * 3 + 5] ^= 0x01  # corrupt the embedded ek
    with pytest.raises(ValueError, match="hash check"):
        kem768.check_decapsulation_key(bytes(bad))
    with pytest.raises(ValueError, match="64 bytes"):
        kem768.keypair_derand(bytes(32))


def test_non_bytes_inputs_are_type_errors(kem768: MLKEMPure) -> None:
    ek, dk = kem768.keypair_derand(_seed("types", 64))
    with pytest.raises(TypeError):
        kem768.keypair_derand(64)  # bytes(64) would silently be 64 zero bytes
    with pytest.raises(TypeError):
        kem768.encaps_derand(ek, 32)
    with pytest.raises(TypeError):
        kem768.encapsulate(ek.hex())
    with pytest.raises(TypeError):
        kem768.decapsulate(dk, 1088)


# ---- Internals: the NTT against schoolbook arithmetic in Z_q[X]/(X^256 + 1) -------------

def _negacyclic_product(f: np.ndarray, g: np.ndarray) -> np.ndarray:
    full = np.convolve(f, g)  # degree <= 510; coefficients < 256·3329² fit in int64
    out = full[:256].copy()
    out[:255] -= full[256:]
    return out % mlkem_pure.Q


def test_ntt_matches_schoolbook_multiplication() -> None:
    rng = np.random.default_rng(203)
    f, g = rng.integers(0, mlkem_pure.Q, size=(2, 256), dtype=np.int64)
    assert np.array_equal(mlkem_pure._ntt_inv(mlkem_pure._ntt(f)), f)
    product = mlkem_pure._ntt_inv(
        mlkem_pure._multiply_ntts(mlkem_pure._ntt(f), mlkem_pure._ntt(g)))
    assert np.array_equal(product, _negacyclic_product(f, g))


def test_compress_and_reduction_divide_no_secret_by_q() -> None:
    """The attack (KyberSlash): Compress_d divided secret coefficients by q, and integer
    division time depends on its operands. The multiply-and-shift forms must give exactly
    the division's results on every input they can get."""
    x = np.arange(mlkem_pure.Q, dtype=np.int64)
    for d in (1, 4, 5, 10, 11):
        exact = (((x << d) + mlkem_pure.Q // 2) // mlkem_pure.Q) & ((1 << d) - 1)
        assert np.array_equal(mlkem_pure._compress(x, d), exact), d
    bound = 2 * (mlkem_pure.Q - 1) ** 2  # the largest magnitude any reduction sees
    rng = np.random.default_rng(7)
    samples = np.concatenate([rng.integers(-bound, bound + 1, 1_000_000),
                              np.arange(-3 * mlkem_pure.Q, 3 * mlkem_pure.Q), [-bound, bound]]).astype(np.int64)
    assert np.array_equal(mlkem_pure._mod_q(samples), samples % mlkem_pure.Q)


def test_implicit_rejection_selects_by_mask_not_branch() -> None:
    a, b = bytes(range(32)), bytes(range(100, 132))
    assert mlkem_pure._select(True, a, b) == a and mlkem_pure._select(False, a, b) == b
