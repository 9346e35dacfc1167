"""Aggregation rules for model deltas, from the plain to the Byzantine-robust.

All take ``updates`` of shape (k, d) and return one float32 vector of length d.
Computation is in float64 so the result does not depend on the order updates arrived in
beyond rounding of the final cast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _check(updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    u = np.asarray(updates)
    if u.ndim != 2 or u.shape[0] == 0:
        raise ValueError(f"updates must have shape (k>=1, d), got {u.shape}")
    if weights is not None:
        w = np.asarray(weights)
        if w.shape != (u.shape[0],):
            raise ValueError(f"weights shape {w.shape} != ({u.shape[0]},)")
    return u.astype(np.float64, copy=False)


def _weights(weights: np.ndarray, k: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be k finite, non-negative values with a positive sum")
    return w


def fedavg(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sample-weighted mean (FedAvg, McMahan et al. 2017): optimal when all devices are honest."""
    u = _check(updates)
    w = _weights(weights, u.shape[0])
    return ((w @ u) / w.sum()).astype(np.float32)


def median(updates: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018): tolerates under half Byzantine updates."""
    return np.median(_check(updates), axis=0).astype(np.float32)


def trimmed_mean(updates: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): drop the ⌊beta·k⌋ largest and
    smallest values per coordinate, average the rest; smoother than the median."""
    u = _check(updates)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    t = int(np.floor(beta * u.shape[0]))
    s = np.sort(u, axis=0)
    return s[t : u.shape[0] - t].mean(axis=0).astype(np.float32)


def multi_krum(updates: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Multi-Krum (Blanchard et al. 2017): average the ``m`` updates whose summed squared
    distance to their k - f - 2 nearest neighbours is smallest; tolerates ``f`` Byzantine
    updates when k > 2f + 2. ``m`` defaults to k - f."""
    u = _check(updates)
    k = u.shape[0]
    if f < 0 or k - f - 2 < 1:
        raise ValueError(f"multi-krum needs k > f + 2 (k={k}, f={f})")
    m = k - f if m is None else m
    if not 1 <= m <= k:
        raise ValueError(f"m must be in [1, {k}], got {m}")
    sq = np.sum(u * u, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (u @ u.T), 0.0)
    np.fill_diagonal(d2, np.inf)
    scores = np.sort(d2, axis=1)[:, : k - f - 2].sum(axis=1)
    chosen = np.argsort(scores, kind="stable")[:m]
    return u[chosen].mean(axis=0).astype(np.float32)


class RunningFedAvg:
    """FedAvg one update at a time, for rounds too large to hold every update in memory.

    Keeps a float64 weighted sum and total weight: memory is O(d), whatever the count.
    """

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self._weight = 0.0
        self.count = 0

    def add(self, update: np.ndarray, weight: float) -> None:
        u = np.asarray(update, dtype=np.float64).reshape(-1)
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and non-negative, got {weight}")
        if self._sum is None:
            self._sum = np.zeros_like(u)
        elif u.shape != self._sum.shape:
            raise ValueError(f"update length {u.shape[0]} != {self._sum.shape[0]}")
        self._sum += float(weight) * u
        self._weight += float(weight)
        self.count += 1

    def result(self) -> np.ndarray:
        if self._sum is None or self._weight <= 0:
            raise ValueError("no weighted updates to average")
        return (self._sum / self._weight).astype(np.float32)


Aggregator = Callable[..., np.ndarray]


def _fedavg(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return fedavg(updates, weights)


def _median(updates: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    return median(_check(updates, weights))


def _trimmed_mean(updates: np.ndarray, weights: np.ndarray | None, beta: float = 0.1) -> np.ndarray:
    return trimmed_mean(_check(updates, weights), beta)


def _multi_krum(
    updates: np.ndarray, weights: np.ndarray | None, f: int = 1, m: int | None = None
) -> np.ndarray:
    return multi_krum(_check(updates, weights), f, m)


#: Name → aggregator with the uniform signature ``(updates, weights, **params)``; an
#: unexpected parameter raises TypeError rather than being silently ignored. Robust rules
#: ignore weights: claimed sample counts are attacker-controlled.
AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": _fedavg,
    "median": _median,
    "trimmed_mean": _trimmed_mean,
    "multi_krum": _multi_krum,
}


def aggregate(name: str, updates: np.ndarray, weights: np.ndarray, **params: Any) -> np.ndarray:
    """Dispatch to ``AGGREGATORS[name]``; ValueError for an unknown name."""
    try:
        fn = AGGREGATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}"
        ) from None
    return fn(updates, weights, **params)


def capped_weights(claims: np.ndarray, multiple: float, maximum: int) -> tuple[np.ndarray, np.ndarray]:
    """Aggregation weights from claimed sample counts, and which claims were cut.

    A claim cannot be checked, so it cannot buy weight: each is capped at ``multiple`` times
    the round's median claim (a majority of honest devices sets the median) and at
    ``maximum``. One device claiming 1e9 samples weighs at most ``multiple`` medians.
    """
    c = np.asarray(claims, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("claims must be a non-empty vector of finite, non-negative counts")
    cap = min(multiple * float(np.median(c)), float(maximum))
    return np.minimum(c, cap), c > cap
