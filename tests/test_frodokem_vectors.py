"""FrodoKEM-640-AES (ISO, salted) against the NIST known-answer file, plus behaviour checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pqc.drbg import CtrDrbg
from pqc.frodo import FrodoKEM640AES

VECTORS = Path(__file__).resolve().parent / "vectors"
KAT_FILE = VECTORS / "FrodoKEM-640-AES.kat-first5.rsp"

KEM = FrodoKEM640AES()


def load_rsp(path: Path) -> list[dict[str, bytes | int]]:
    """Parse a NIST .rsp file: blank-line-separated 'name = value' entries, '#' comments."""
    entries: list[dict[str, bytes | int]] = []
    current: dict[str, bytes | int] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            if current:
                entries.append(current)
                current = {}
            continue
        name, _, value = line.partition(" = ")
        current[name] = int(value) if name == "count" else bytes.fromhex(value)
    if current:
        entries.append(current)
    return entries


KATS = load_rsp(KAT_FILE)


def test_kat_file_has_five_entries() -> None:
    assert [e["count"] for e in KATS] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("entry", KATS, ids=[f"count={e['count']}" for e in KATS])
def test_known_answers(entry: dict[str, bytes]) -> None:
    drbg = CtrDrbg(entry["seed"])
    pk, sk = KEM.keypair_derand(drbg.random_bytes(KEM.keypair_coins_size))
    assert pk == entry["pk"]
    assert sk == entry["sk"]
    ct, ss = KEM.encaps_derand(pk, drbg.random_bytes(KEM.encaps_coins_size))
    assert ct == entry["ct"]
    assert ss == entry["ss"]
    assert KEM.decapsulate(sk, ct) == entry["ss"]


def test_sizes() -> None:
    pk, sk = KEM.generate_keypair()
    ct, ss = KEM.encapsulate(pk)
    assert (len(pk), len(sk), len(ct), len(ss)) == (9616, 19888, 9752, 16)
    assert (KEM.public_key_size, KEM.secret_key_size) == (9616, 19888)
    assert (KEM.ciphertext_size, KEM.shared_secret_size) == (9752, 16)


def test_random_round_trips() -> None:
    for _ in range(5):
        pk, sk = KEM.generate_keypair()
        for _ in range(2):
            ct, ss = KEM.encapsulate(pk)
            assert KEM.decapsulate(sk, ct) == ss


@pytest.mark.parametrize("position", [0, 5000, 9600, 9700, 9751])  # c1, c1, c2, salt, salt
def test_tampered_ciphertext_gives_rejection_secret(position: int) -> None:
    entry = KATS[0]
    sk, ct, ss = entry["sk"], entry["ct"], entry["ss"]
    bad = bytearray(ct)
    bad[position] ^= 0x01
    bad = bytes(bad)
    rejected = KEM.decapsulate(sk, bad)
    assert rejected != ss
    assert rejected == KEM.decapsulate(sk, bad)  # deterministic
    # Implicit rejection (spec 8.3): ss = SHAKE128(ct || s, 16) with s the first 16 bytes of sk.
    assert rejected == hashlib.shake_128(bad + sk[:16]).digest(16)


def test_wrong_lengths_raise() -> None:
    pk, sk = KATS[0]["pk"], KATS[0]["sk"]
    ct = KATS[0]["ct"]
    with pytest.raises(ValueError, match="public key"):
        KEM.encapsulate(pk[:-1])
    with pytest.raises(ValueError, match="public key"):
        KEM.encaps_derand(pk + b"\x00", bytes(48))
    with pytest.raises(ValueError, match="coins"):
        KEM.encaps_derand(pk, bytes(47))
    with pytest.raises(ValueError, match="coins"):
        KEM.keypair_derand(bytes(63))
    with pytest.raises(ValueError, match="secret key"):
        KEM.decapsulate(sk[:-1], ct)
    with pytest.raises(ValueError, match="ciphertext"):
        KEM.decapsulate(sk, ct[:-1])
    with pytest.raises(ValueError, match="ciphertext"):
        KEM.decapsulate(sk, ct + b"\x00")


def test_drbg_matches_nist_kat_seed_chain() -> None:
    """The KAT seeds come from one DRBG seeded with 00..2F, 48 bytes per entry (PQCgenKAT_kem.c)."""
    master = CtrDrbg(bytes(range(48)))
    for entry in KATS:
        assert master.random_bytes(48) == entry["seed"]


def test_drbg_behaviour() -> None:
    seed = os.urandom(48)
    a, b = CtrDrbg(seed), CtrDrbg(seed)
    assert a.random_bytes(64) == b.random_bytes(64)
    # Each request ends with an Update, so one 32-byte call differs from two 16-byte calls.
    one = CtrDrbg(seed).random_bytes(32)
    split = CtrDrbg(seed)
    assert split.random_bytes(16) == one[:16]
    assert split.random_bytes(16) != one[16:]
    assert len(CtrDrbg(seed).random_bytes(0)) == 0
    assert len(CtrDrbg(seed).random_bytes(17)) == 17
    assert CtrDrbg(seed, bytes(48)).random_bytes(32) == one  # all-zero personalization is a no-op
    assert CtrDrbg(seed, b"\x01" * 48).random_bytes(32) != one
    with pytest.raises(ValueError):
        CtrDrbg(seed[:47])


def test_sampler_never_searches_the_cdf_table_by_secret(monkeypatch) -> None:
    """The attack: the old sampler ran ``np.searchsorted`` on the secret 15-bit values, whose
    memory accesses and work depend on them. The sampler must compare against the whole
    table (as the reference does) and still give exactly the same samples."""
    import numpy as np

    from pqc import frodo

    every_word = np.arange(1 << 16, dtype="<u2").tobytes()
    table = np.array([4643, 13363, 20579, 25843, 29227, 31145, 32103, 32525, 32689, 32745, 32762, 32766])
    words = np.arange(1 << 16)
    magnitude = np.searchsorted(table, words >> 1, side="left")
    expected = np.where(words & 1, -magnitude, magnitude)

    def searched(*_a, **_k):
        raise AssertionError("the sampler searched the CDF table with secret values")

    monkeypatch.setattr(np, "searchsorted", searched)
    assert np.array_equal(frodo._sample(every_word), expected)  # all 2^16 inputs, exactly
    pk, sk = KEM.keypair_derand(bytes(range(64)))  # and the KAT path never searches either
    ct, ss = KEM.encaps_derand(pk, bytes(48))
    assert KEM.decapsulate(sk, ct) == ss
