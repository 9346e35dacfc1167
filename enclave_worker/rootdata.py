"""The enclave's side of root data: open it, keep it sealed at rest, train the reference.

Root data arrives sealed to this enclave's KEM key, either as a :class:`RootData` signed by the
trusted coordinator key (checked by the caller; the demo's path) or as the operator's own
:class:`RootDataSubmit`, forwarded by the coordinator and obeyed only under a key of this
enclave's ``operator.pinned_fingerprints`` (:func:`from_operator`). It is stored exactly as received, still sealed,
so a restarted enclave with the same keys reopens it and nothing readable touches the disk.
The reference update of a round is the task trained on it from the current global model with
the round's own hyper-parameters: what an honest device with clean data would send.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

import pqc
from common import operator_auth, rootdata
from common.state import private_dir, private_file
from common.task import TaskError, TrainConfig
from schemas.codec import decode, encode
from schemas.messages import RootData, RootDataSubmit, RoundSpec, Signed
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.enclave")

FILE = "root-data.msgpack"


def from_operator(signed: Signed, pinned: set[str], freshness_seconds: float, now: float) -> RootData:
    """The :class:`RootData` inside an operator's signed submission, or QflareError
    (``not_operator``: no pinned key signed it; ``stale``: outside the freshness window)."""
    req = operator_auth.authenticate(signed, RootDataSubmit, pinned, freshness_seconds, now)
    return RootData(kem_fp=req.kem_fp, sealed=req.sealed, n_samples=req.n_samples, issued_at=req.issued_at)


def open_root(msg: RootData, kem_sk: bytes, kem_fp: str, newer_than: float | None = None) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """(x, y) of ``msg``, or QflareError saying why it cannot be used."""
    if msg.kem_fp != kem_fp:
        raise QflareError(Reason.DECRYPTION_FAILED, "root data sealed to another enclave key")
    if newer_than is not None and msg.issued_at <= newer_than:
        raise QflareError(Reason.REPLAY, "root data older than the root data in use")
    try:
        plain = pqc.open_sealed(kem_sk, msg.sealed, rootdata.root_aad(kem_fp))
    except Exception as exc:  # noqa: BLE001 - any crypto failure: refuse, never crash
        raise QflareError(Reason.DECRYPTION_FAILED, f"root data does not open: {type(exc).__name__}") from None
    try:
        x, y = rootdata.unpack(bytes(plain))
    except ValueError as exc:
        raise QflareError(Reason.INVALID_FIELD, str(exc)) from None
    if len(y) != msg.n_samples:
        raise QflareError(Reason.INVALID_FIELD, f"root data holds {len(y)} samples, header says {msg.n_samples}")
    return x, y


def save(directory: Path, msg: RootData) -> None:
    """Keep the sealed message (atomic replace)."""
    private_dir(directory)
    tmp = private_file(directory / (FILE + ".tmp"))
    tmp.write_bytes(encode(msg))
    os.replace(tmp, directory / FILE)


def load(directory: Path, kem_sk: bytes, kem_fp: str) -> tuple[RootData, np.ndarray, np.ndarray] | None:
    """The stored root data, if any and still readable with this enclave's key."""
    path = directory / FILE
    if not path.exists():
        return None
    try:
        msg = decode(path.read_bytes(), RootData)
        x, y = open_root(msg, kem_sk, kem_fp)
    except Exception as exc:  # noqa: BLE001 - a stale file must not stop the enclave
        log.warning("stored root data unusable (%s); send it again with `qflare enclave root-data`", exc)
        return None
    return msg, x, y


def reference_update(task, layout_id: str, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                     spec: RoundSpec) -> np.ndarray | None:
    """The round's trusted reference: the enclave's ``task`` (a TaskRunner) trained on the root
    data from ``params``, or None when there is no task for this model or the root data does not
    fit it (logged; the defence then uses its fallback)."""
    if task is None or task.layout_id != layout_id:
        log.warning("no task for this model: round %d uses the fallback reference", spec.round_id)
        return None
    config = TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.round_id)
    try:
        delta, _ = task.train(params, x, y, config)
    except (TaskError, ValueError, RuntimeError) as exc:
        log.warning("root data does not fit the model (%s); round %d uses the fallback reference", exc,
                    spec.round_id)
        return None
    return delta
