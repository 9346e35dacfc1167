"""Asynchronous rounds (FedBuff, Nguyen et al., AISTATS 2022): the buffer's rules, pure.

In an async round the enclave keeps a buffer of accepted updates and turns it into a new
model every ``buffer_size`` of them. An update is trained on some model version, its
``base_version``; its staleness is how many models were published since (current version
minus base version). Staler updates point the model where it was, so they weigh less,
``1/sqrt(1 + staleness)`` (the polynomial rule of FedBuff and FedAsync), and past
``max_staleness`` they are refused. Only a version this enclave published is a base: one
from the future is refused. (A sync round accepts only its own model version: ``stale_base``,
enclave_worker/intake.py.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from schemas.reasons import QflareError, Reason


def staleness(current: int, base: int) -> int:
    """Models published between the update's base and now (0: trained on the current model)."""
    return current - base


def staleness_weight(s: int) -> float:
    """The factor an update of staleness ``s`` (>= 0) weighs by: 1 at 0, decreasing to 0."""
    if s < 0:
        raise ValueError(f"staleness must be >= 0, got {s}")
    return 1.0 / math.sqrt(1.0 + s)


def check_base(base: int, current: int, max_staleness: int | None) -> int:
    """The update's staleness, or raise: ``unknown_base`` for a version never published
    (newer than the current one), ``too_stale`` past ``max_staleness`` (None: no bound)."""
    if base > current:
        raise QflareError(Reason.UNKNOWN_BASE, f"base version {base} was never published (current: {current})")
    s = staleness(current, base)
    if max_staleness is not None and s > max_staleness:
        raise QflareError(Reason.TOO_STALE, f"base version {base} is {s} versions behind {current} "
                          f"(fl.max_staleness {max_staleness})")
    return s


def buffer_weights(num_samples: Sequence[float], bases: Sequence[int], current: int) -> np.ndarray:
    """Each buffered update's aggregation weight: its (capped) sample count times its staleness factor."""
    if len(num_samples) != len(bases):
        raise ValueError(f"{len(num_samples)} sample counts for {len(bases)} base versions")
    return np.array([float(n) * staleness_weight(staleness(current, b)) for n, b in zip(num_samples, bases,
                                                                                        strict=True)],
                    dtype=np.float64)


def step_scale(num_samples: Sequence[float], bases: Sequence[int], current: int) -> float:
    """How much a buffer's aggregate is shrunk for its staleness: sum(n_i s_i) / sum(n_i) over
    the updates aggregated. The filters average with normalised weights, so without it a
    buffer of equally stale updates would move the model as far as a fresh one; with it the
    step is FedBuff's sum of staleness-weighted updates (1 when every update is fresh)."""
    n = np.asarray(num_samples, dtype=np.float64)
    if n.size == 0 or n.sum() <= 0:
        return 1.0
    return float(buffer_weights(n, bases, current).sum() / n.sum())


def buffer_full(buffered: int, buffer_size: int) -> bool:
    """Whether a buffer holding ``buffered`` accepted updates makes a new model now."""
    return buffered >= buffer_size


def buffer_size_for(requested: int, min_updates: int) -> int:
    """The buffer the enclave uses: never smaller than ``min_updates`` (the round's, or the
    enclave's ``fl.min_accepted`` floor: a buffer of one would let a single device move the
    model, with no filter able to compare it)."""
    return max(requested, min_updates, 1)


def max_staleness_for(requested: int, own: int) -> int:
    """The bound the enclave applies: the round's, never looser than its own ``fl.max_staleness``."""
    return min(requested, own)


def closes_with_leftover(buffered: int, min_updates: int) -> bool:
    """At an async round's deadline, whether the part-filled buffer still makes a last model."""
    return buffered >= min_updates
