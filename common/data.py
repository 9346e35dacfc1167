"""The digits data set, split and partitioned across simulated devices.

Uses scikit-learn's bundled 8x8 digits (no download), so demos and tests run offline.
Everything is seeded: the same arguments give the same shards on every machine.
"""

from __future__ import annotations

import functools
from functools import lru_cache
from typing import Literal

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Scheme = Literal["iid", "dirichlet"]

#: Fewest samples any device receives: a device with nothing to train on is useless.
MIN_SAMPLES_PER_DEVICE = 8


@lru_cache(maxsize=8)
def _split(
    test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    arrays = tuple(np.ascontiguousarray(a) for a in (x_tr, y_tr, x_te, y_te))
    for a in arrays:
        a.flags.writeable = False  # cached: callers get copies, never the cache itself
    return arrays  # type: ignore[return-value]


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split: (x_train, y_train, x_test, y_test).

    x is float32 in [0, 1], shape (n, 64); y is int64 in 0..9.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return tuple(a.copy() for a in _split(float(test_fraction), int(seed)))  # type: ignore[return-value]


def partition(
    y: np.ndarray,
    n_devices: int,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    *,
    min_size: int = MIN_SAMPLES_PER_DEVICE,
) -> list[np.ndarray]:
    """Disjoint index arrays covering ``y``, one per device (each sorted, int64).

    ``"iid"`` shuffles and deals evenly. ``"dirichlet"`` draws each class's share per device
    from Dir(alpha) (Hsu et al. 2019): small alpha gives skewed, realistic label mixes.
    Every device gets at least ``min_size`` samples, topped up from the largest devices.
    """
    y = np.asarray(y)
    n = y.shape[0]
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if n_devices * min_size > n:
        raise ValueError(f"{n} samples cannot give {n_devices} devices {min_size} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), n_devices)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        buckets: list[list[int]] = [[] for _ in range(n_devices)]
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            shares = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(int)
            for d, chunk in enumerate(np.split(idx, cuts)):
                buckets[d].extend(chunk.tolist())
        parts = [np.array(b, dtype=np.int64) for b in buckets]
        parts = _top_up(parts, min_size)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected 'iid' or 'dirichlet'")
    return [np.sort(p).astype(np.int64) for p in parts]


def _top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move samples from the largest device to the smallest until all have ``min_size``."""
    lists = [list(p) for p in parts]
    while True:
        sizes = [len(p) for p in lists]
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            return [np.array(p, dtype=np.int64) for p in lists]
        large = int(np.argmax(sizes))
        lists[small].append(lists[large].pop())


def device_shard(
    device_index: int,
    n_devices: int,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) training shard of one device under the default train/test split.

    A simulated fleet larger than the data set allows (1437 samples, at least
    ``MIN_SAMPLES_PER_DEVICE`` each) reuses shards: device i holds shard i mod the number
    of shards, so load tests with thousands of devices still train on real data.
    """
    if not 0 <= device_index < n_devices:
        raise ValueError(f"device_index {device_index} not in [0, {n_devices})")
    x_train, y_train, _, _ = load_digits_split()
    shards = min(n_devices, len(y_train) // MIN_SAMPLES_PER_DEVICE)
    idx = _partition_cached(shards, scheme, alpha, seed)[device_index % shards]
    return x_train[idx], y_train[idx]


@functools.lru_cache(maxsize=16)
def _partition_cached(n_devices: int, scheme: Scheme, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    """The default split's partition, computed once per fleet shape (not once per device)."""
    return tuple(partition(load_digits_split()[1], n_devices, scheme, alpha, seed))
