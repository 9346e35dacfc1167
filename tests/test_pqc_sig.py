"""ML-DSA signatures: round trips, streaming through external mu, failing closed."""

from __future__ import annotations

import logging

import pytest

import pqc
import pqc.backends
from pqc.errors import InvalidKey, MalformedInput
from pqc.ids import SigId

PAIRS = [(s.value, b) for s in SigId for b in pqc.sig_backends(s)]
MSG = b"round 7 update digest"


@pytest.mark.parametrize("name,backend", PAIRS)
def test_sign_verify_round_trip_with_declared_sizes(name, backend):
    sig = pqc.get_signature(name, backend=backend)
    pk, sk = sig.generate_keypair()
    s = sig.sign(sk, MSG, context=b"qflare/update")
    assert (len(pk), len(sk), len(s)) == (sig.public_key_size, sig.secret_key_size, sig.signature_size)
    assert sig.verify(pk, MSG, s, context=b"qflare/update") is True


@pytest.mark.parametrize("name,backend", PAIRS)
def test_streamed_message_signs_like_the_joined_message(name, backend):
    sig = pqc.get_signature(name, backend=backend)
    pk, sk = sig.generate_keypair()
    parts = [b"header", bytearray(b"-"), memoryview(b"x" * 100_000)]
    s = sig.sign(sk, parts, context=b"c")
    assert sig.verify(pk, b"header-" + b"x" * 100_000, s, context=b"c")
    assert sig.verify(pk, tuple(parts), s, context=b"c")
    joined = sig.sign(sk, b"header-" + b"x" * 100_000, context=b"c")
    assert sig.verify(pk, parts, joined, context=b"c")


@pytest.mark.parametrize("name,backend", PAIRS)
def test_any_change_makes_verify_false_never_raise(name, backend):
    sig = pqc.get_signature(name, backend=backend)
    pk, sk = sig.generate_keypair()
    s = sig.sign(sk, MSG)
    flipped = bytearray(s)
    flipped[100] ^= 0x04
    other_pk, _ = sig.generate_keypair()
    assert not sig.verify(pk, MSG, bytes(flipped))
    assert not sig.verify(pk, MSG + b"!", s)
    assert not sig.verify(pk, MSG, s, context=b"other")
    assert not sig.verify(other_pk, MSG, s)
    assert not sig.verify(pk, MSG, b"")
    assert not sig.verify(pk, MSG, s[:-1])
    assert not sig.verify(pk, MSG, bytes(len(s)))
    assert not sig.verify(pk, MSG, b"\xff" * len(s))
    assert not sig.verify(pk, MSG, "garbage")  # type: ignore[arg-type]


@pytest.mark.parametrize("name,backend", PAIRS)
def test_malformed_keys_and_contexts_are_caller_errors(name, backend):
    sig = pqc.get_signature(name, backend=backend)
    pk, sk = sig.generate_keypair()
    s = sig.sign(sk, MSG)
    with pytest.raises(InvalidKey):
        sig.verify(pk[:-1], MSG, s)
    with pytest.raises(InvalidKey):
        sig.sign(sk + b"\x00", MSG)
    with pytest.raises(MalformedInput, match="255"):
        sig.sign(sk, MSG, context=bytes(256))
    with pytest.raises(MalformedInput):
        sig.sign(sk, ["text, not bytes"])  # type: ignore[list-item]


def test_dilithium2_maps_to_mldsa44_with_one_note(caplog):
    pqc.registry._noted.discard("Dilithium2")
    with caplog.at_level(logging.INFO, logger="pqc"):
        assert pqc.get_signature("Dilithium2").name == "ML-DSA-44"
        pqc.get_signature("Dilithium2")
    notes = [r.message for r in caplog.records if "Dilithium2" in r.message]
    assert len(notes) == 1 and "FIPS 204" in notes[0]


@pytest.mark.skipif(not pqc.backends.liboqs_available(), reason="liboqs not installed")
@pytest.mark.parametrize("name", [s.value for s in SigId])
def test_liboqs_and_openssl_verify_each_others_signatures(name):
    oqs, ossl = pqc.get_signature(name, backend="liboqs"), pqc.get_signature(name, backend="cryptography")
    pk, sk = ossl.generate_keypair()
    assert oqs.verify(pk, MSG, ossl.sign(sk, MSG, context=b"c"), context=b"c")
    pk, sk = oqs.generate_keypair()
    assert ossl.verify(pk, MSG, oqs.sign(sk, MSG, context=b"c"), context=b"c")
