"""Data for tasks: scikit-learn's bundled sets, splits across simulated devices, device files.

The bundled sets (digits, breast cancer, wine) ship with scikit-learn, so demos and tests run
offline. Everything is seeded: the same arguments give the same shards on every machine. A
real device reads its own data instead: :func:`load_file` takes ``.npz`` (arrays ``x``, ``y``)
or ``.csv`` (a header row and a label column).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Scheme = Literal["iid", "dirichlet"]

#: Fewest samples any device receives: a device with nothing to train on is useless.
MIN_SAMPLES_PER_DEVICE = 8
#: The bundled data sets by name: (scikit-learn loader, how features are scaled).
BUNDLED = ("digits", "breast_cancer", "wine")
#: Label column of a device's ``.csv`` file unless told otherwise.
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class Partition:
    """How a simulated fleet splits a data set (``fl.partition``, ``fl.dirichlet_alpha``, ``fl.seed``)."""

    scheme: Scheme = "iid"
    alpha: float = 0.5
    seed: int = 0

    @classmethod
    def of(cls, fl: object) -> Partition:
        """The partition ``fl`` (the ``fl`` settings) asks for."""
        return cls(fl.partition, fl.dirichlet_alpha, fl.seed)  # type: ignore[attr-defined]


# --- bundled data sets -------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _split(name: str, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name not in BUNDLED:
        raise ValueError(f"unknown bundled data set {name!r}; expected one of {BUNDLED}")
    bunch = getattr(datasets, f"load_{name}")()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if name == "digits":
        x_tr, x_te = x_tr / 16.0, x_te / 16.0  # pixel values are 0..16
    else:
        # tabular features differ by orders of magnitude: z-score with the training split's statistics
        mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    arrays = tuple(np.ascontiguousarray(a, dtype=a.dtype) for a in
                   (x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te))
    for a in arrays:
        a.flags.writeable = False  # cached: callers get copies, never the cache itself
    return arrays  # type: ignore[return-value]


def load_bundled_split(name: str, test_fraction: float = 0.2,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split of a bundled set: (x_train, y_train, x_test, y_test).

    x is float32 (digits in [0, 1]; tabular sets standardised on the training split); y int64.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return tuple(a.copy() for a in _split(name, float(test_fraction), int(seed)))  # type: ignore[return-value]


def load_digits_split(test_fraction: float = 0.2,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split: x float32 in [0, 1], shape (n, 64); y int64 in 0..9."""
    return load_bundled_split("digits", test_fraction, seed)


# --- partitions --------------------------------------------------------------------------------


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


def bundled_shard(name: str, device_index: int, n_devices: int,
                  part: Partition | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) training shard of one simulated device of a bundled set's default split
    (for digits, without the root samples the demo seals to the enclave: ``common.rootdata``).

    A fleet larger than the data set allows (at least ``MIN_SAMPLES_PER_DEVICE`` each) reuses
    shards: device i holds shard i mod the number of shards, so load tests with thousands of
    devices still train on real data.
    """
    if not 0 <= device_index < n_devices:
        raise ValueError(f"device_index {device_index} not in [0, {n_devices})")
    x_train, y_train = _device_pool(name)
    shards = min(n_devices, len(y_train) // MIN_SAMPLES_PER_DEVICE)
    idx = _partition_cached(name, shards, part or Partition())[device_index % shards]
    return x_train[idx], y_train[idx]


def device_shard(device_index: int, n_devices: int, scheme: Scheme = "iid", alpha: float = 0.5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A simulated device's digits shard (the default task's ``load_data``)."""
    return bundled_shard("digits", device_index, n_devices, Partition(scheme, alpha, seed))


@functools.lru_cache(maxsize=16)
def _partition_cached(name: str, n_devices: int, part: Partition) -> tuple[np.ndarray, ...]:
    """The default split's partition, computed once per fleet shape (not once per device)."""
    return tuple(partition(_device_pool(name)[1], n_devices, part.scheme, part.alpha, part.seed))


def _device_pool(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The training split devices share: digits holds out the enclave's root data."""
    if name == "digits":
        from common.rootdata import device_pool  # rootdata builds on this module's split

        return device_pool()
    x_train, y_train, _, _ = load_bundled_split(name)
    return x_train, y_train


# --- a device's own files ----------------------------------------------------------------------


def load_file(path: Path | str, label_column: str = LABEL_COLUMN) -> tuple[np.ndarray, np.ndarray]:
    """A device's training data from ``.npz`` (arrays ``x`` and ``y``) or ``.csv``.

    A ``.csv`` has a header row; ``label_column`` holds y, every other column is a float
    feature. x comes back float32; integral labels int64 (class indices), others float32.
    Raises ValueError with one line saying what is wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz or "y" not in npz:
                    raise ValueError(f"{path.name}: an .npz needs arrays 'x' and 'y', has {sorted(npz.files)}")
                x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path.name}: {exc}".splitlines()[0]) from None
    elif suffix == ".csv":
        x, y = _read_csv(path, label_column)
    else:
        raise ValueError(f"{path.name}: expected a .npz or .csv file")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{path.name}: x {x.shape} and y {y.shape} must be non-empty and aligned")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path.name}: x must be numeric, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32), _labels(y, path.name)


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path.name}: empty file")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    if label_column not in header:
        raise ValueError(f"{path.name}: no label column {label_column!r} in the header {header[:8]}")
    col = header.index(label_column)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path.name}: line {line} has {len(row)} values, the header {len(header)}")
    try:
        table = np.array([[float(v) for v in r] for r in body], dtype=np.float64).reshape(len(body), len(header))
    except ValueError as exc:
        raise ValueError(f"{path.name}: every value must be a number ({exc})") from None
    return np.delete(table, col, axis=1), table[:, col]


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"{name}: y must be numeric, got {y.dtype}")
    if np.issubdtype(y.dtype, np.integer) or (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        return np.ascontiguousarray(y, dtype=np.int64)
    return np.ascontiguousarray(y, dtype=np.float32)
