"""Chunked updates without a broker: the stream seal, the codecs, and attacks on reassembly.

Real keys and real crypto throughout; only the broker is absent (reassembly's state machine
is driven directly, as the enclave's intake drives it).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import pqc
from common import compression
from common.chunks import chunk_aad, header_digest, max_update_chunks, stream_info
from edge_agent import updates
from edge_agent.client import Device, Session
from enclave_worker import intake, reassembly
from pqc.identity import Identity
from schemas import signing
from schemas.codec import decode, encode
from schemas.messages import AttestationReport, SessionGrant, UpdateChunk
from schemas.reasons import QflareError, Reason

N = 5000
CHUNK = 4096  # bytes: 5000 float32 parameters make 5 chunks
#: The digest of the enclave report the test grants name (the enclave checks it is its own).
REPORT_DIGEST = b"r" * 32


class World:
    """A coordinator key, an enclave's keys, and one enrolled device with a session."""

    def __init__(self, device_id: str = "cam-1") -> None:
        self.coord = Identity.generate("ML-DSA-44", "ML-KEM-768")
        self.enclave = Identity.generate("ML-DSA-44", "ML-KEM-768")
        self.devices = {}
        self.device = self.add(device_id)

    def add(self, device_id: str) -> Device:
        ident = Identity.generate("ML-DSA-44", "ML-KEM-768")
        grant = SessionGrant(device_id=device_id, session_id="s" * 16, sig_alg=ident.sig_alg, sig_pk=ident.sig_pk,
                             sig_fp=pqc.fingerprint(ident.sig_pk, ident.sig_alg), issued_at=time.time(),
                             not_after=time.time() + 600, transcript=b"t", enclave_digest=REPORT_DIGEST)
        signed = encode(signing.sign(grant, self.coord.sig_alg, self.coord.sig_sk, self.coord.sig_pk))
        report = AttestationReport(measurement="m" * 16, kem_alg=self.enclave.kem_alg, kem_pk=self.enclave.kem_pk,
                                   sig_alg=self.enclave.sig_alg, sig_pk=self.enclave.sig_pk, nonce=b"n" * 16,
                                   created_at=time.time())
        dev = Device(device_id, ident, self.coord.sig_alg, self.coord.sig_pk, enclave=report,
                     session=Session("s" * 16, b"k" * 32, signed, time.time() + 600))
        self.devices[device_id] = dev
        return dev

    def context(self) -> intake.IntakeContext:
        return intake.IntakeContext(
            coordinator_keys={self.coord.sig_fp: intake.CoordinatorKey(self.coord.sig_alg, self.coord.sig_pk)},
            kem_alg=self.enclave.kem_alg, kem_sk=self.enclave.kem_sk, kem_fp=self.enclave.kem_fp, open_round=1,
            layout_id="L1", n_params=N, revoked=frozenset(), policy=pqc.Policy(), now=time.time(),
            report_digests=frozenset({REPORT_DIGEST}))

    def build(self, delta: np.ndarray, encoding: str = "f32", device: Device | None = None,
              update_id: str | None = None, fraction: float = 0.3) -> list[UpdateChunk]:
        enc = compression.encode(delta, encoding, CHUNK, fraction)
        _, _, bodies = updates.build_parts(device or self.device, 1, 0, "L1", enc, 10, update_id)
        return [decode(b, UpdateChunk) for b in bodies]

    def reassemble(self, chunks: list[UpdateChunk], routed: str | None = "cam-1") -> intake.Opened | None:
        """Feed chunks in the order given, as the enclave does; the opened update, None if unfinished."""
        asm = reassembly.Assembly(chunks[0].update_id, routed, time.monotonic())
        done = None
        for i, c in enumerate(chunks):
            if i == 0:
                reassembly.begin(asm, c, self.context(), False, max_update_chunks(N, CHUNK))
            done = reassembly.absorb(asm, c)
        return done


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def delta(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=N).astype(np.float32)


def reason(fn) -> Reason:
    with pytest.raises(QflareError) as exc:
        fn()
    return exc.value.reason


# --- the stream seal -------------------------------------------------------------------


@pytest.mark.parametrize("kem", ["ML-KEM-768", "ML-KEM-1024", "ML-KEM-768+X25519", "FrodoKEM-640-AES"])
def test_stream_opens_each_chunk_once_with_one_encapsulation(kem):
    pk, sk = pqc.get_kem(kem).generate_keypair()
    sealer = pqc.stream_sealer(kem, pk, 3, b"info")
    cts = [sealer.seal(i, bytes([i]) * 100, b"aad%d" % i) for i in range(3)]
    opener = pqc.stream_opener(sk, sealer.enc, 3, b"info")
    assert [opener.open(i, c, b"aad%d" % i) for i, c in enumerate(cts)] == [bytes([i]) * 100 for i in range(3)]
    with pytest.raises(pqc.errors.DecryptionError):
        opener.open(1, cts[0], b"aad1")  # moved to another place
    with pytest.raises(pqc.errors.DecryptionError):
        pqc.stream_opener(sk, sealer.enc, 2, b"info").open(0, cts[0], b"aad0")  # declared shorter
    with pytest.raises(pqc.errors.DecryptionError):
        pqc.stream_opener(sk, sealer.enc, 3, b"other").open(0, cts[0], b"aad0")  # other header


# --- codecs ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["f32", "int8", "topk"])
def test_codecs_round_trip_within_their_error(encoding):
    x = delta(1)
    enc = compression.encode(x, encoding, CHUNK, 0.1)
    assert all(len(c) <= CHUNK for c in enc.chunks)
    y = compression.decode(enc, N)
    if encoding == "f32":
        np.testing.assert_array_equal(x, y)
    elif encoding == "int8":
        assert np.max(np.abs(x - y)) <= np.max(np.abs(x)) / 127 / 2 + 1e-6
        assert enc.nbytes < x.nbytes / 3.9
    else:
        kept = np.flatnonzero(y)
        assert kept.size == 500 and np.all(np.abs(x[kept]) >= np.sort(np.abs(x))[-500])
        assert enc.nbytes == 500 * 8


def test_error_feedback_sends_what_an_earlier_update_dropped():
    x = np.zeros(N, dtype=np.float32)
    x[:10] = 1.0
    x[10] = 0.5  # below the top 10 with fraction 10/N: left for the next update
    enc, residual = compression.encode_with_feedback(x, None, "topk", CHUNK, 10 / N)
    assert residual[10] == pytest.approx(0.5)
    enc2, _ = compression.encode_with_feedback(np.zeros(N, dtype=np.float32), residual, "topk", CHUNK, 10 / N)
    assert compression.decode(enc2, N)[10] == pytest.approx(0.5)


# --- reassembly: the honest cases ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["f32", "int8", "topk"])
def test_a_chunked_update_reassembles_to_what_the_device_encoded(world, encoding):
    x = delta(2)
    chunks = world.build(x, encoding)
    assert len(chunks) >= 2
    opened = world.reassemble(chunks)
    np.testing.assert_array_equal(opened.delta, compression.decode(compression.encode(x, encoding, CHUNK, 0.3), N))


def test_one_signature_and_one_encapsulation_per_update(world):
    chunks = world.build(delta())
    assert len(chunks) == 5
    assert [c.enc is not None for c in chunks] == [True, False, False, False, False]
    assert [c.signature is not None for c in chunks] == [False, False, False, False, True]


# --- reassembly: attacks, each named ------------------------------------------------------


def test_reordered_chunks_are_rejected(world):
    c = world.build(delta())
    assert reason(lambda: world.reassemble([c[0], c[2], c[1], c[3], c[4]])) == Reason.CHUNK_SEQUENCE


def test_chunk_relabelled_with_the_expected_index_does_not_open(world):
    c = world.build(delta())
    moved = c[2].model_copy(update={"index": 1})  # chunk 2's bytes presented as chunk 1
    assert reason(lambda: world.reassemble([c[0], moved])) == Reason.DECRYPTION_FAILED


def test_truncated_update_never_completes(world):
    c = world.build(delta())
    assert world.reassemble(c[:4]) is None  # no last chunk: nothing is accepted (timeout refuses it)


def test_truncation_declared_as_a_shorter_update_is_rejected(world):
    c = world.build(delta())
    shorter = [x.model_copy(update={"count": 4}) for x in c[:4]]
    assert reason(lambda: world.reassemble(shorter)) == Reason.CHUNK_SEQUENCE
    last_as_final = c[3].model_copy(update={"signature": c[4].signature, "sig_alg": c[4].sig_alg})
    assert reason(lambda: world.reassemble([*c[:3], last_as_final])) == Reason.CHUNK_SEQUENCE


def test_spliced_chunk_from_another_update_is_rejected(world):
    a, b = world.build(delta(3)), world.build(delta(4))
    spliced = b[2].model_copy(update={"update_id": a[0].update_id})
    assert reason(lambda: world.reassemble([a[0], a[1], spliced, a[3], a[4]])) == Reason.DECRYPTION_FAILED


def test_spliced_chunk_from_another_devices_update_with_the_same_id_is_rejected(world):
    other = world.add("cam-2")
    a = world.build(delta(3), update_id="u" * 16)
    b = world.build(delta(4), device=other, update_id="u" * 16)
    assert reason(lambda: world.reassemble([a[0], a[1], b[2], a[3], a[4]])) == Reason.DECRYPTION_FAILED


def test_chunk_resealed_by_someone_else_to_the_enclave_fails_the_signature(world):
    """Anyone can seal to the enclave's public key; only the device's signature binds the stream."""
    c = world.build(delta())
    header = c[0].header
    sealer = pqc.stream_sealer("ML-KEM-768", world.enclave.kem_pk, 5, stream_info(header))
    forged = [x.model_copy(update={"sealed": sealer.seal(i, np.zeros(1024, "<f4").tobytes() if i < 4 else
                                                          np.zeros(N - 4096, "<f4").tobytes(),
                                                          chunk_aad(header_digest(header), x.update_id, i, 5))})
              for i, x in enumerate(c)]
    forged[0] = forged[0].model_copy(update={"enc": sealer.enc})
    assert reason(lambda: world.reassemble(forged)) == Reason.BAD_SIGNATURE


def test_ciphertext_changed_under_a_kept_tag_does_not_open(world):
    """The device signs enc ‖ tag, not a hash of the ciphertext: the AEAD must catch the rest."""
    from schemas.messages import Update

    enc = compression.encode(delta()[:1000], "f32", 1 << 20)
    ctx = intake.IntakeContext(**{**world.context().__dict__, "n_params": 1000})
    _, _, bodies = updates.build_parts(world.device, 1, 0, "L1", enc, 10)
    u = decode(bodies[0], Update)
    assert intake.check_and_open(u, intake.read_header(u), "cam-1", ctx, False).delta.shape == (1000,)
    mid = bytearray(u.sealed)
    mid[len(mid) // 2] ^= 1
    bad = u.model_copy(update={"sealed": bytes(mid)})
    assert reason(lambda: intake.check_and_open(bad, intake.read_header(bad), "cam-1", ctx, False)) \
        == Reason.DECRYPTION_FAILED
    c = world.build(delta())
    body2 = bytearray(c[2].sealed)
    body2[100] ^= 1
    assert reason(lambda: world.reassemble([c[0], c[1], c[2].model_copy(update={"sealed": bytes(body2)}), *c[3:]])) \
        == Reason.DECRYPTION_FAILED


def test_an_update_opened_in_place_equals_one_opened_into_new_memory(world):
    """The enclave opens a float32 update into a pool buffer (written to disk uncopied): the
    same delta and norm as the copying path; a tampered, NaN or wrong-sized one is refused
    for the same reason and its buffer goes back to the pool."""
    from enclave_worker.segments import AlignedPool
    from schemas.messages import Update

    pool = AlignedPool()
    plain = intake.IntakeContext(**{**world.context().__dict__, "n_params": 1000})
    pooled = intake.IntakeContext(**{**plain.__dict__, "buffers": pool})

    def built(vec: np.ndarray) -> Update:
        _, _, bodies = updates.build_parts(world.device, 1, 0, "L1", compression.encode(vec, "f32", 1 << 20), 10)
        return decode(bodies[0], Update)

    u = built(delta()[:1000])
    a = intake.check_and_open(u, intake.read_header(u), "cam-1", plain, False)
    b = intake.check_and_open(u, intake.read_header(u), "cam-1", pooled, False)
    assert a.buffer is None and b.buffer is not None and not pool._free
    assert np.array_equal(a.delta, b.delta) and a.norm == b.norm
    b.release()
    assert len(pool._free) == 1
    mid = bytearray(u.sealed)
    mid[len(mid) // 2] ^= 1
    nan = delta()[:1000].copy()
    nan[7] = np.nan
    for bad, why in ((u.model_copy(update={"sealed": bytes(mid)}), Reason.DECRYPTION_FAILED),
                     (built(nan), Reason.NON_FINITE), (built(delta()[:999]), Reason.LAYOUT_MISMATCH)):
        assert reason(lambda: intake.check_and_open(bad, intake.read_header(bad), "cam-1", pooled, False)) == why
        assert reason(lambda: intake.check_and_open(bad, intake.read_header(bad), "cam-1", plain, False)) == why
        assert len(pool._free) == 1  # taken and given back (none is taken for the wrong size)


def test_chunked_update_under_another_devices_routing_key_is_rejected(world):
    c = world.build(delta())
    assert reason(lambda: world.reassemble(c, routed="cam-9")) == Reason.DEVICE_MISMATCH


def test_update_declaring_more_chunks_than_the_model_needs_is_refused(world):
    c = world.build(delta())
    asm = reassembly.Assembly(c[0].update_id, "cam-1", time.monotonic())
    assert reason(lambda: reassembly.begin(asm, c[0], world.context(), False, 4)) == Reason.CHUNK_SEQUENCE


def test_topk_indices_outside_the_model_are_refused():
    out = np.zeros(10, dtype=np.float32)
    bad = np.array([3, 12], "<u4").tobytes() + np.ones(2, "<f4").tobytes()
    with pytest.raises(ValueError, match="outside"):
        compression.decode_chunk_into(out, "topk", 0, 0, 1, bad)


# --- chunked global models ----------------------------------------------------------------


def test_model_chunk_not_matching_its_signed_digest_is_ignored(world):
    from edge_agent.fleet import verify_model
    from edge_agent.models import ModelAssembly
    from enclave_worker.publisher import build_model_messages
    from schemas.messages import ModelChunk

    params = delta(5)
    messages = build_model_messages(world.enclave, 3, "L1", params, CHUNK)
    assert len(messages) == 6
    assembly = ModelAssembly(verify_model(messages[0], world.device))
    chunks = [decode(m, ModelChunk) for m in messages[1:]]
    forged = chunks[1].model_copy(update={"data": bytes(len(chunks[1].data))})
    assert assembly.add(chunks[0]) is None
    assert assembly.add(forged) is None  # ignored: the genuine chunk 1 is still due
    assert assembly.add(chunks[2]) is None  # out of place: ignored
    for c in chunks[1:-1]:
        assert assembly.add(c) is None
    whole = assembly.add(chunks[-1])
    np.testing.assert_array_equal(np.frombuffer(whole.params, dtype="<f4"), params)


def test_the_median_reference_by_blocks_equals_the_whole_one():
    from enclave_worker import filters
    from enclave_worker.service import reference_by_blocks

    updates_ = np.random.default_rng(7).normal(size=(5, 1003)).astype(np.float32)
    got = reference_by_blocks(lambda i, a, b: updates_[i, a:b], [0, 1, 2, 3, 4], 1003, block=100)
    np.testing.assert_array_equal(got, filters.robust_reference(updates_))
