"""Checking and opening one sealed update (docs/architecture.md step 5), without I/O.

Checks run cheapest first: header, routing, round, base version, timestamp, replay,
revocation, grant (trusted coordinator key, not rotated out, device, key epoch, expiry, this
enclave's report), device signature, then decryption and the payload's shape. Any failure raises
:class:`QflareError` with the reason that goes into the rejection event.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import pqc
from common import compression, handshake
from common.stages import Stages, timed
from common.updates import signed_parts, update_aad
from enclave_worker import staleness
from enclave_worker.segments import AlignedBuffer, AlignedPool
from enclave_worker.shards import check_shard
from schemas import signing
from schemas.codec import CodecError, decode
from schemas.messages import GrantMac, SessionGrant, Signed, Update, UpdateHeader
from schemas.reasons import QflareError, Reason


class GrantKeyEntry(NamedTuple):
    """A grant key (kem-v2) the enclave was given; ``rotated_at`` as for :class:`CoordinatorKey`."""

    key: bytes
    rotated_at: float | None = None


class CoordinatorKey(NamedTuple):
    """A coordinator signature key the enclave trusts; one replaced at ``rotated_at`` still
    vouches for grants it issued before then (until they expire), and for nothing else."""

    alg: str
    pk: bytes
    rotated_at: float | None = None


@dataclass(frozen=True)
class IntakeContext:
    """What the enclave knows when an update arrives."""

    coordinator_keys: Mapping[str, CoordinatorKey]  # by fingerprint
    kem_alg: str
    kem_sk: bytes
    kem_fp: str
    open_round: int | None
    layout_id: str
    n_params: int
    revoked: frozenset[str]
    policy: pqc.Policy
    now: float
    #: The current model version, and an async round's staleness bound (None: a sync round,
    #: checked against ``base_version`` instead).
    version: int = 0
    max_staleness: int | None = None
    #: The model version the open round trains on (a delta built on another is refused).
    base_version: int | None = None
    #: When the open round opened; an update stamped before it (or in the future) is refused.
    opened_at: float | None = None
    #: Clock skew tolerated on the header timestamp (crypto.freshness_seconds).
    skew: float = 120.0
    #: Device -> time of its last key change: grants issued before it are superseded.
    key_epochs: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: SHA3-256 digests of this enclave's admitted reports: a grant must name one of them.
    report_digests: frozenset[bytes] = frozenset()
    #: Grant keys (handshake kem-v2) by key id, each given by the coordinator for this enclave
    #: alone; one replaced at ``rotated_at`` vouches only for grants issued before then.
    grant_keys: Mapping[bytes, GrantKeyEntry] = dataclasses.field(default_factory=dict)
    #: Sharded enclaves (docs/scaling.md): this shard's index of ``shards``; only its devices pass.
    shard: int = 0
    shards: int = 1
    #: Where a one-message float32 delta is opened into (the store's aligned buffers, written
    #: to disk from with no copy); None: into new memory.
    buffers: AlignedPool | None = None


@dataclass(frozen=True)
class Opened:
    header: UpdateHeader
    delta: np.ndarray
    norm: float  # L2 norm, computed here (in the worker thread) so the close need not reread
    #: The pool buffer ``delta`` lives in: the store writes from it and releases it; a caller that
    #: refuses the update releases it instead (forgetting it only costs a reuse).
    buffer: AlignedBuffer | None = None

    def release(self) -> None:
        if self.buffer is not None:
            self.buffer.release()


@functools.lru_cache(maxsize=65536)
def verified_grant(grant: bytes, alg: str, pk: bytes) -> SessionGrant:
    """A grant whose coordinator signature verified, cached by its exact bytes and key.

    A device presents the same grant with every update of its session, so the enclave
    verifies it once; expiry and the device id are still checked on every update.
    Failures raise and are never cached.
    """
    return signing.verify(decode(grant, Signed), SessionGrant, alg, pk)


@functools.lru_cache(maxsize=65536)
def maced_grant(grant: bytes, key_id: bytes, key: bytes) -> SessionGrant:
    """A grant whose HMAC under the grant key ``key`` (named ``key_id``) verified, cached
    like :func:`verified_grant`; a forged or altered grant raises and is never cached."""
    mac = decode(grant, GrantMac)
    if mac.key_id != key_id or not handshake.tags_equal(handshake.grant_tag(key, mac.body), mac.tag):
        raise QflareError(Reason.BAD_GRANT, "grant MAC does not verify")
    return decode(mac.body, SessionGrant)


def grant_of(raw: bytes, ctx: IntakeContext) -> tuple[SessionGrant, float | None]:
    """The grant an update presents, authenticated by signature (sig-v1) or MAC (kem-v2),
    and when the key that vouches for it was rotated out (None: it was not)."""
    outer = decode(raw, (Signed, GrantMac))
    if isinstance(outer, GrantMac):
        entry = ctx.grant_keys.get(outer.key_id)
        if entry is None:
            raise QflareError(Reason.BAD_GRANT, "grant MACed under a key this enclave was not given")
        return maced_grant(raw, outer.key_id, entry.key), entry.rotated_at  # the key is this enclave's
    key = ctx.coordinator_keys.get(outer.signer)
    if key is None:
        raise QflareError(Reason.BAD_GRANT, "grant signed by a key the enclave does not trust")
    return verified_grant(raw, key.alg, key.pk), key.rotated_at


def read_header(update: Update) -> UpdateHeader:
    try:
        return decode(update.header, UpdateHeader)
    except CodecError as err:
        raise QflareError(Reason.MALFORMED, err.detail) from None


def admit(header: UpdateHeader, routed_device: str | None, ctx: IntakeContext, seen: bool) -> SessionGrant:
    """Every check the header alone allows, cheapest first; the verified grant, or raise."""
    if routed_device is not None and routed_device != header.device_id:
        raise QflareError(Reason.DEVICE_MISMATCH, "routing key names another device")
    if ctx.shards > 1:  # the signed id, not the shard a device put in its key: it cannot choose
        check_shard(header.device_id, ctx.shard, ctx.shards)
    if ctx.open_round is None or header.round_id != ctx.open_round:
        raise QflareError(Reason.WRONG_ROUND, f"round {header.round_id} is not open (open: {ctx.open_round})")
    if ctx.base_version is not None and header.base_version != ctx.base_version:
        raise QflareError(Reason.STALE_BASE, f"trained on model v{header.base_version}, the round is on "
                          f"v{ctx.base_version}")
    if header.timestamp > ctx.now + ctx.skew or (ctx.opened_at is not None
                                                 and header.timestamp < ctx.opened_at - ctx.skew):
        raise QflareError(Reason.STALE, "update timestamp outside the open round's window")
    if seen:
        raise QflareError(Reason.REPLAY, f"update {header.update_id} was already received")
    if ctx.max_staleness is not None:  # an async round: any version published, and not too old
        staleness.check_base(header.base_version, ctx.version, ctx.max_staleness)
    if header.device_id in ctx.revoked:
        raise QflareError(Reason.REVOKED, f"device {header.device_id} is revoked")
    try:
        grant, rotated_at = grant_of(header.grant, ctx)
    except (QflareError, CodecError) as err:
        raise QflareError(Reason.BAD_GRANT, err.detail) from None
    if rotated_at is not None and grant.issued_at >= rotated_at:
        raise QflareError(Reason.BAD_GRANT, "grant issued by a coordinator key after it was rotated out")
    if grant.device_id != header.device_id:
        raise QflareError(Reason.BAD_GRANT, "grant issued to another device")
    if grant.issued_at < ctx.key_epochs.get(grant.device_id, -math.inf):
        raise QflareError(Reason.SUPERSEDED, "grant issued before the device's last key change")
    if ctx.now > grant.not_after:
        raise QflareError(Reason.GRANT_EXPIRED, "session grant expired")
    if grant.enclave_digest is None or grant.enclave_digest not in ctx.report_digests:
        raise QflareError(Reason.BAD_GRANT, "grant issued for another enclave's report")
    if header.enclave_kem_fp != ctx.kem_fp or header.kem_alg != ctx.kem_alg:
        raise QflareError(Reason.DECRYPTION_FAILED, "sealed to a key this enclave does not hold")
    if header.layout_id != ctx.layout_id:
        raise QflareError(Reason.LAYOUT_MISMATCH, f"layout {header.layout_id} is not {ctx.layout_id}")
    return grant


def check_device_signature(grant: SessionGrant, sig_alg: str | None, parts: list[bytes], signature: bytes | None,
                           context: bytes) -> None:
    """The device's signature over ``parts``, by the key its grant names, or raise."""
    if sig_alg != grant.sig_alg or pqc.fingerprint(grant.sig_pk, grant.sig_alg) != grant.sig_fp:
        raise QflareError(Reason.BAD_SIGNATURE, "signature algorithm or key differs from the grant")
    if signature is None or not pqc.get_signature(grant.sig_alg).verify(grant.sig_pk, parts, signature,
                                                                         context=context):
        raise QflareError(Reason.BAD_SIGNATURE, "device signature does not verify")


def decode_payload(out: np.ndarray, header: UpdateHeader, index: int, data: bytes | memoryview) -> None:
    """Decode chunk ``index`` of the update's encoded delta into ``out`` (the enclave's buffer)."""
    try:
        compression.decode_chunk_into(out, header.encoding, header.chunk_elems, index, header.chunks, data)
    except ValueError as err:
        raise QflareError(Reason.LAYOUT_MISMATCH, str(err)) from None


def opened(header: UpdateHeader, delta: np.ndarray) -> Opened:
    """The decoded delta, refused if it holds NaN or infinity; its norm computed here.

    The norm is finite only if every element is, so one pass over the delta decides (a
    finite delta whose norm overflows float32 is refused too: no filter could weigh it).
    """
    norm = float(np.linalg.norm(delta))
    if not math.isfinite(norm):
        finite = bool(np.isfinite(delta).all())
        raise QflareError(Reason.NON_FINITE, "delta's norm overflows" if finite else "delta has NaN or infinity")
    return Opened(header, delta, norm)


def check_and_open(update: Update, header: UpdateHeader, routed_device: str | None, ctx: IntakeContext,
                   seen: bool, stages: Stages | None = None) -> Opened:
    """Verify everything about a one-message ``update`` and return its delta, or raise with a reason."""
    with timed(stages, "verify"):
        grant = admit(header, routed_device, ctx, seen)
        check_device_signature(grant, update.sig_alg, signed_parts(update.header, update.sealed), update.signature,
                               signing.context_for(Update.TYPE))
    if header.chunks != 1:
        raise QflareError(Reason.CHUNK_SEQUENCE, f"a one-message update declares {header.chunks} chunks")
    if header.encoding == "f32" and ctx.buffers is not None and _sealed_size(update.sealed) == 4 * ctx.n_params:
        return _open_in_place(update, header, ctx, stages)
    with timed(stages, "decrypt"):
        try:
            payload = pqc.open_sealed(ctx.kem_sk, update.sealed, update_aad(update.header), policy=ctx.policy)
        except pqc.errors.QflareCryptoError as exc:
            raise QflareError(Reason.DECRYPTION_FAILED, type(exc).__name__) from None
    with timed(stages, "decode"):
        if header.encoding == "f32":  # the plaintext is the vector, no copy
            if len(payload) != 4 * ctx.n_params:
                raise QflareError(Reason.LAYOUT_MISMATCH, f"{len(payload)} bytes for {ctx.n_params} parameters")
            return opened(header, np.frombuffer(payload, dtype="<f4"))
        delta = np.zeros(ctx.n_params, dtype=np.float32)
        decode_payload(delta, header, 0, payload)
        return opened(header, delta)


def _sealed_size(sealed: bytes | memoryview) -> int | None:
    try:
        return pqc.plaintext_size(sealed)
    except pqc.errors.QflareCryptoError:
        return None  # the usual path says why


def _open_in_place(update: Update, header: UpdateHeader, ctx: IntakeContext, stages: Stages | None) -> Opened:
    """The common case: a float32 delta of the right size, opened straight into one of the
    store's aligned buffers (no zero-filled output, and the store writes from it uncopied)."""
    assert ctx.buffers is not None
    buf = ctx.buffers.take(4 * ctx.n_params)
    try:
        with timed(stages, "decrypt"):
            try:
                pqc.open_sealed_into(ctx.kem_sk, update.sealed, buf.view, update_aad(update.header), policy=ctx.policy)
            except pqc.errors.QflareCryptoError as exc:
                raise QflareError(Reason.DECRYPTION_FAILED, type(exc).__name__) from None
        with timed(stages, "decode"):
            return dataclasses.replace(opened(header, np.frombuffer(buf.view, dtype="<f4")), buffer=buf)
    except BaseException:
        buf.release()
        raise
