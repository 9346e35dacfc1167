"""Sharded enclaves: a shard's partial aggregate, sealed and signed, and the root's robust
combination of them (docs/scaling.md, "Sharded enclaves"; docs/protocol.md).

Pure functions and one small book of what the root has taken; no I/O. A shard screens its own
devices' updates exactly as a single enclave does and sends Σ wᵢ·Δᵢ and Σ wᵢ over the
survivors; the root's FedAvg Σ sums / Σ totals is then the single enclave's over the same
updates (float64 sums, one float32 cast at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

import pqc
from common.shards import partial_aad, shard_of
from schemas import signing
from schemas.codec import decode, encode
from schemas.messages import PartialEnvelope, ShardPartial, Signed
from schemas.reasons import QflareError, Reason

#: A partial whose mean lies further than this many times the median such distance from the
#: coordinate-wise median of the partials' means is left out (needs 3 partials or more).
OUTLIER_MULTIPLE = 3.0
#: Below this many partials a median says nothing about which one is off: none is dropped.
MIN_PARTIALS_FOR_MEDIAN = 3


class SignerKey(NamedTuple):
    """An enclave signature key the coordinator admitted (its attestation report named it)."""

    alg: str
    pk: bytes


def check_shard(device_id: str, shard: int, shards: int) -> None:
    """Refuse an update of a device another shard owns (a device cannot choose its shard)."""
    owner = shard_of(device_id, shards)
    if owner != shard:
        raise QflareError(Reason.WRONG_SHARD, f"device {device_id} belongs to shard {owner} of {shards}, "
                          f"not {shard}")


def weighted_sum(deltas: np.ndarray, weights: np.ndarray, accepted: np.ndarray) -> tuple[np.ndarray, float]:
    """(Σ wᵢ·Δᵢ in float64, Σ wᵢ) over the ``accepted`` rows."""
    keep = np.asarray(accepted, dtype=bool)
    w = np.asarray(weights, dtype=np.float64)[keep]
    d = np.asarray(deltas)[keep].astype(np.float64, copy=False)
    total = float(w.sum())
    return (w @ d if keep.any() else np.zeros(np.asarray(deltas).shape[1])), total


def seal_partial(partial: ShardPartial, signer, root_kem_alg: str, root_kem_pk: bytes, namespace: str) -> bytes:
    """The encoded ``PartialEnvelope``: ``partial`` signed by ``signer`` (a pqc Identity, the
    shard's attested enclave keys), then sealed to the root's KEM key."""
    signed = signing.sign(partial, signer.sig_alg, signer.sig_sk, signer.sig_pk)
    aad = partial_aad(namespace, partial.round_id, partial.shard, partial.base_version)
    return encode(PartialEnvelope(round_id=partial.round_id, shard=partial.shard, base_version=partial.base_version,
                                  sealed=pqc.seal(root_kem_alg, root_kem_pk, encode(signed), aad)))


def open_partial(envelope: PartialEnvelope, kem_sk: bytes, admitted: dict[str, SignerKey], namespace: str,
                 policy=None) -> ShardPartial:
    """Open and verify a partial: it must open with the root's key under its clear fields, be
    signed by an enclave key the coordinator admitted, and repeat the clear fields inside."""
    aad = partial_aad(namespace, envelope.round_id, envelope.shard, envelope.base_version)
    try:
        inner = pqc.open_sealed(kem_sk, envelope.sealed, aad, policy=policy)
    except pqc.errors.QflareCryptoError as exc:
        raise QflareError(Reason.DECRYPTION_FAILED, f"partial does not open: {type(exc).__name__}") from None
    signed = decode(inner, Signed)
    key = admitted.get(signed.signer)
    if key is None:
        raise QflareError(Reason.BAD_SIGNATURE, f"partial signed by {signed.signer[:16]}, not an admitted enclave key")
    partial = signing.verify(signed, ShardPartial, key.alg, key.pk)
    if (partial.round_id, partial.shard, partial.base_version) != (envelope.round_id, envelope.shard,
                                                                    envelope.base_version):
        raise QflareError(Reason.INVALID_FIELD, "partial's signed fields differ from its envelope's")
    return partial


@dataclass
class PartialBook:
    """What the root has taken for its open round: one partial per shard, fresh, on its model."""

    round_id: int
    shards: int
    base_version: int
    layout_id: str
    n_params: int
    taken: dict[int, ShardPartial] = field(default_factory=dict)

    def take(self, p: ShardPartial, now: float | None = None, skew: float = 120.0,
             opened_at: float | None = None) -> None:
        """Keep ``p`` or refuse it with a reason (nothing is kept on a refusal)."""
        now = time.time() if now is None else now
        if p.round_id != self.round_id:
            raise QflareError(Reason.WRONG_ROUND, f"partial for round {p.round_id}, round {self.round_id} is open")
        if p.shards != self.shards or p.shard >= self.shards or p.shard == 0:
            raise QflareError(Reason.WRONG_SHARD, f"partial of shard {p.shard} of {p.shards}; the root runs "
                              f"{self.shards} and is shard 0 itself")
        if p.shard in self.taken:
            raise QflareError(Reason.REPLAY, f"shard {p.shard} already sent its partial for round {p.round_id}")
        if p.base_version != self.base_version:
            raise QflareError(Reason.STALE_BASE, f"partial on model v{p.base_version}, the round is on "
                              f"v{self.base_version}")
        if p.layout_id != self.layout_id:
            raise QflareError(Reason.LAYOUT_MISMATCH, "partial of another model layout")
        if p.issued_at > now + skew or (opened_at is not None and p.issued_at < opened_at - skew):
            raise QflareError(Reason.STALE, f"partial issued at {p.issued_at:.0f}, outside the round")
        check_counts(p, self.n_params)
        self.taken[p.shard] = p


def check_counts(p: ShardPartial, n_params: int) -> None:
    """A partial's fields agree with each other: the sum has one float64 per parameter (none
    when nothing was accepted), accepted ≤ received, a weight exactly when something was
    accepted, finite values. (``rejected`` also counts intake refusals, which ``received``
    does not: it is bounded by the schema only.)"""
    size = 0 if p.accepted == 0 else 8 * n_params
    if len(p.weighted_sum) != size:
        raise QflareError(Reason.LAYOUT_MISMATCH, f"partial sum of {len(p.weighted_sum)} bytes, expected {size}")
    if p.accepted > p.received:
        raise QflareError(Reason.INVALID_FIELD, "partial's counts do not add up")
    if (p.accepted == 0) != (p.weight_total == 0):
        raise QflareError(Reason.INVALID_FIELD, "partial's weight total does not match its accepted count")
    if size and not np.all(np.isfinite(partial_sum(p))):
        raise QflareError(Reason.NON_FINITE, "NaN or infinity in the partial sum")


def partial_sum(p: ShardPartial) -> np.ndarray:
    return np.frombuffer(p.weighted_sum, dtype="<f8")


class Combined(NamedTuple):
    delta: np.ndarray | None  # float32; None when no partial had an accepted update
    used: list[int]           # shards whose partials made it
    dropped: dict[int, str]   # shard -> reason it was left out


def combine(partials: list[ShardPartial], max_norm: float | None = None,
            multiple: float = OUTLIER_MULTIPLE) -> Combined:
    """The global delta from the partials: Σ sums / Σ totals over the partials kept.

    Each shard's mean (sum / total) is a convex combination of updates that passed its screen,
    so with ``fl.max_norm`` set, a mean over it cannot come from honest screening and is left
    out (``norm_bound``). With 3 or more partials, one whose mean is further than ``multiple``
    times the median distance from the coordinate-wise median of the means is left out
    (``outlier``); with fewer, or when all agree, this is the exact weighted mean.
    """
    live = [p for p in partials if p.weight_total > 0]
    dropped: dict[int, str] = {}
    means = {p.shard: partial_sum(p) / p.weight_total for p in live}
    if max_norm is not None:
        for s, m in list(means.items()):
            if float(np.linalg.norm(m)) > max_norm * (1 + 1e-6):
                dropped[s] = Reason.NORM_BOUND.value
                del means[s]
    if len(means) >= MIN_PARTIALS_FOR_MEDIAN:
        centre = np.median(np.stack(list(means.values())), axis=0)
        dist = {s: float(np.linalg.norm(m - centre)) for s, m in means.items()}
        scale = float(np.median(list(dist.values())))
        for s, d in dist.items():
            if d > multiple * scale and d > 1e-12:
                dropped[s] = Reason.OUTLIER.value
    used = sorted(p.shard for p in live if p.shard not in dropped)
    if not used:
        return Combined(None, [], dropped)
    by_shard = {p.shard: p for p in live}
    total = sum(by_shard[s].weight_total for s in used)
    acc = np.zeros_like(partial_sum(by_shard[used[0]]))
    for s in used:
        acc += partial_sum(by_shard[s])
    return Combined((acc / total).astype(np.float32), used, dropped)
