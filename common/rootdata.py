"""Root data for the digits task: a small clean set the operator seals to the enclave.

FLTrust needs a few hundred clean samples the devices never see. For the demo they are held
out of the digits training split, stratified and seeded, so every machine draws the same
ones without a download; ``device_pool`` is what is left for the devices.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

import pqc
from common.data import load_digits_split
from schemas import signing
from schemas.codec import decode
from schemas.messages import AttestationReport, Signed

#: Root samples held out per class (10 classes: 200 samples).
ROOT_PER_CLASS = 20
ROOT_SEED = 1234


@lru_cache(maxsize=4)
def _root_index(per_class: int, seed: int) -> np.ndarray:
    _, y, _, _ = load_digits_split()
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=per_class, replace=False) for c in np.unique(y)]
    idx = np.sort(np.concatenate(picks)).astype(np.int64)
    idx.flags.writeable = False
    return idx


def digits_root(per_class: int = ROOT_PER_CLASS, seed: int = ROOT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the root set: ``per_class`` samples of each digit from the training split."""
    x, y, _, _ = load_digits_split()
    idx = _root_index(per_class, seed)
    return x[idx], y[idx]


def device_pool(per_class: int = ROOT_PER_CLASS, seed: int = ROOT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the training split without the root set: what devices are given."""
    x, y, _, _ = load_digits_split()
    keep = np.ones(len(y), dtype=bool)
    keep[_root_index(per_class, seed)] = False
    return x[keep], y[keep]


#: Most root samples an enclave accepts: root data is a small reference, not a training set.
MAX_ROOT_SAMPLES = 1000
AAD_PREFIX = b"qflare-root-data|"


def root_aad(kem_fp: str) -> bytes:
    """Associated data of sealed root data: binds it to the enclave key it was sealed to."""
    return AAD_PREFIX + kem_fp.encode("ascii")


def pack(x: np.ndarray, y: np.ndarray) -> bytes:
    """Root data as the ``.npz`` bytes that are sealed (float32 x, int64 y)."""
    x, y = _checked(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def seal_to(signed_report: bytes, x: np.ndarray, y: np.ndarray) -> tuple[str, bytes]:
    """(enclave KEM fingerprint, root data sealed to it) for the enclave whose
    ``Signed(AttestationReport)`` the coordinator admitted (verified there, at admission)."""
    report = signing.unverified(decode(signed_report, Signed), AttestationReport)
    kem_fp = pqc.fingerprint(report.kem_pk, report.kem_alg)
    return kem_fp, pqc.seal(report.kem_alg, report.kem_pk, pack(x, y), root_aad(kem_fp))


def unpack(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack`; ValueError with the reason for anything else (no pickles)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except Exception as exc:  # noqa: BLE001 - any parse failure is one clear error
        raise ValueError(f"root data is not an .npz with x and y: {type(exc).__name__}") from None
    if x.dtype != np.float32 or y.dtype != np.int64:
        raise ValueError(f"root data must be float32 x and int64 y, got {x.dtype} and {y.dtype}")
    return _checked(x, y)


def _checked(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"root data x {x.shape} and y {y.shape} must be (n, features) and (n,)")
    if x.shape[0] > MAX_ROOT_SAMPLES:
        raise ValueError(f"{x.shape[0]} root samples; at most {MAX_ROOT_SAMPLES} (a small clean set)")
    if not np.isfinite(x).all():
        raise ValueError("root data has NaN or infinity")
    return x, y
