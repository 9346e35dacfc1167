"""Screening of model updates before aggregation.

Two cheap, well-understood tests run inside the enclave on every round's updates:
a norm bound (scaled / boosted updates, Sun et al. 2019 "Can you really backdoor FL?")
and cosine similarity to a robust reference (sign-flipped or unrelated updates, in the
spirit of FLTrust, Cao et al. 2021). Rejected updates carry a reason code that the
product reports as an event, so the reason strings are part of the interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REASON_NORM = "norm_bound"
REASON_COSINE = "low_cosine"

#: Below this many updates a median is no longer a robust reference.
MIN_UPDATES_FOR_MEDIAN = 3


def _as_updates(updates: np.ndarray) -> np.ndarray:
    updates = np.asarray(updates)
    if updates.ndim != 2:
        raise ValueError(f"updates must have shape (k, d), got {updates.shape}")
    return updates


def l2_norms(updates: np.ndarray) -> np.ndarray:
    """L2 norm of each row, computed in float64 (non-finite rows give inf or nan)."""
    u = _as_updates(updates).astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.linalg.norm(u, axis=1)


def norm_filter(
    updates: np.ndarray, max_norm: float | None, median_multiple: float | None
) -> np.ndarray:
    """Accept mask: reject norms above ``max_norm`` or above ``median_multiple`` × median norm.

    The relative bound adapts as training converges and updates shrink; the absolute one
    caps the damage when most updates of a round are large. Non-finite rows never pass.
    """
    return norm_verdict(l2_norms(updates), max_norm, median_multiple)


def norm_verdict(norms: np.ndarray, max_norm: float | None, median_multiple: float | None) -> np.ndarray:
    """:func:`norm_filter` on precomputed norms, so a caller can stream the updates."""
    norms = np.asarray(norms, dtype=np.float64)
    accept = np.isfinite(norms)
    if max_norm is not None:
        accept &= norms <= max_norm
    if median_multiple is not None and accept.any():
        med = float(np.median(norms[np.isfinite(norms)]))
        accept &= norms <= median_multiple * med
    return accept


def cosine_to_reference(updates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row to ``reference`` (0 where either vector is zero)."""
    u = _as_updates(updates).astype(np.float64, copy=False)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.shape[0] != u.shape[1]:
        raise ValueError(f"reference length {ref.shape[0]} != update length {u.shape[1]}")
    denom = np.linalg.norm(u, axis=1) * np.linalg.norm(ref)
    dots = u @ ref
    out = np.zeros(u.shape[0], dtype=np.float64)
    ok = denom > 0
    out[ok] = dots[ok] / denom[ok]
    return out


def robust_reference(updates: np.ndarray) -> np.ndarray:
    """Coordinate-wise median: tracks the honest direction while honest devices are a majority."""
    return np.median(_as_updates(updates), axis=0).astype(np.float32)


@dataclass(frozen=True)
class ScreenResult:
    """Per-update verdict: ``reasons[i]`` is None when accepted, else a ``REASON_*`` code."""

    accepted: np.ndarray
    reasons: list[str | None]


def screen(
    updates: np.ndarray,
    weights: np.ndarray,
    *,
    max_norm: float | None,
    norm_median_multiple: float | None,
    min_cosine: float | None,
    reference: np.ndarray | None = None,
) -> ScreenResult:
    """Norm filter, then cosine filter on the survivors; first failing test gives the reason.

    Without ``reference`` the coordinate-wise median of the norm survivors is used; with
    fewer than 3 survivors no median is trustworthy and the cosine test is skipped.
    ``weights`` are validated but do not influence screening: a device's claimed sample
    count is not trusted to shape the reference it is judged against.
    """
    u = _as_updates(updates)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != u.shape[0]:
        raise ValueError(f"{w.shape[0]} weights for {u.shape[0]} updates")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")

    reasons: list[str | None] = [None] * u.shape[0]
    accepted = norm_filter(u, max_norm, norm_median_multiple)
    for i in np.flatnonzero(~accepted):
        reasons[i] = REASON_NORM

    if min_cosine is not None:
        survivors = np.flatnonzero(accepted)
        ref = reference
        if ref is None and survivors.size >= MIN_UPDATES_FOR_MEDIAN:
            ref = robust_reference(u[survivors])
        if ref is not None and survivors.size:
            cos = cosine_to_reference(u[survivors], ref)
            for i, c in zip(survivors, cos, strict=True):
                if c < min_cosine:
                    accepted[i] = False
                    reasons[i] = REASON_COSINE
    return ScreenResult(accepted=accepted, reasons=reasons)
