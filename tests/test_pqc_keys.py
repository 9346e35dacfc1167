"""Keys at rest, fingerprints and policy."""

from __future__ import annotations

import base64
import json
import stat

import pytest

import pqc
from pqc.errors import DecryptionError, InvalidKey, PolicyError, UnsupportedAlgorithm
from pqc.keys import decode_public_key, encode_public_key


@pytest.mark.parametrize("alg", ["ML-KEM-768", "ML-DSA-44", "FrodoKEM-640-AES", "ML-KEM-768+X25519"])
@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_private_key_file_round_trips_with_mode_0600(tmp_path, alg, passphrase):
    scheme = pqc.get_signature(alg) if alg.startswith("ML-DSA") else pqc.get_kem(alg)
    _, sk = scheme.generate_keypair()
    path = pqc.save_private_key(tmp_path / "k.key", alg, sk, passphrase=passphrase)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pqc.load_private_key(path, passphrase=passphrase) == (alg, sk)
    if passphrase is not None:
        assert base64.b64encode(sk).decode() not in path.read_text()


def test_wrong_passphrase_and_tampered_file_fail(tmp_path):
    _, sk = pqc.get_signature("ML-DSA-44").generate_keypair()
    path = pqc.save_private_key(tmp_path / "k.key", "ML-DSA-44", sk, passphrase=b"pw")
    with pytest.raises(DecryptionError):
        pqc.load_private_key(path, passphrase=b"wrong")
    with pytest.raises(InvalidKey, match="passphrase"):
        pqc.load_private_key(path)
    doc = json.loads(path.read_text())
    doc["alg"] = "ML-DSA-65"  # swapping the algorithm breaks the AEAD associated data
    path.write_text(json.dumps(doc))
    with pytest.raises((DecryptionError, InvalidKey)):
        pqc.load_private_key(path, passphrase=b"pw")


def test_save_refuses_wrong_length_key(tmp_path):
    with pytest.raises(InvalidKey):
        pqc.save_private_key(tmp_path / "k.key", "ML-DSA-44", bytes(31))


def test_public_key_encoding_carries_algorithm():
    pk, _ = pqc.get_kem("ML-KEM-1024").generate_keypair()
    assert decode_public_key(encode_public_key("ML-KEM-1024", pk)) == ("ML-KEM-1024", pk)
    with pytest.raises(InvalidKey):
        decode_public_key(encode_public_key("ML-KEM-1024", pk).replace("ML-KEM-1024", "ML-KEM-768"))


def test_fingerprint_binds_algorithm_and_resolves_aliases():
    pk, _ = pqc.get_signature("ML-DSA-44").generate_keypair()
    fp = pqc.fingerprint(pk, "ML-DSA-44")
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert pqc.fingerprint(pk, "Dilithium2") == fp
    flipped = bytes([pk[0] ^ 1]) + pk[1:]
    assert pqc.fingerprint(flipped, "ML-DSA-44") != fp
    with pytest.raises(InvalidKey):
        pqc.fingerprint(pk, "ML-DSA-65")
    with pytest.raises(UnsupportedAlgorithm):
        pqc.fingerprint(pk, "RSA-2048")


def test_policy_refuses_algorithms_outside_it_by_name():
    policy = pqc.Policy(kems={"Kyber768"}, signatures={"Dilithium2"})
    assert policy.check_kem("ML-KEM-768") == "ML-KEM-768"
    assert policy.check_sig("ML-DSA-44") == "ML-DSA-44"
    with pytest.raises(PolicyError, match="ML-KEM-512"):
        policy.check_kem("ML-KEM-512")
    with pytest.raises(PolicyError, match="ML-DSA-87"):
        policy.check_sig("Dilithium5")
    with pytest.raises(UnsupportedAlgorithm):
        pqc.Policy(kems={"ECDH-P256"})
