"""What this installation can do: one row per algorithm, for ``qflare crypto info``."""

from __future__ import annotations

from typing import Any

from pqc.backends import liboqs_library, load_oqs
from pqc.errors import UnsupportedAlgorithm
from pqc.ids import KemId, SigId
from pqc.registry import get_kem, get_signature, kem_backends, sig_backends


def backend_report() -> list[dict[str, Any]]:
    """Algorithm, kind, default backend, available backends and sizes (bytes) of each algorithm."""
    rows: list[dict[str, Any]] = []
    for k in KemId:
        row: dict[str, Any] = {"algorithm": k.value, "kind": "kem", "backends": kem_backends(k)}
        try:
            kem = get_kem(k)
            row |= {"default_backend": kem.backend, "public_key": kem.public_key_size,
                    "secret_key": kem.secret_key_size, "ciphertext": kem.ciphertext_size,
                    "shared_secret": kem.shared_secret_size}
        except UnsupportedAlgorithm:
            row["default_backend"] = None
        rows.append(row)
    for s in SigId:
        row = {"algorithm": s.value, "kind": "signature", "backends": sig_backends(s)}
        try:
            sig = get_signature(s)
            row |= {"default_backend": sig.backend, "public_key": sig.public_key_size,
                    "secret_key": sig.secret_key_size, "signature": sig.signature_size}
        except UnsupportedAlgorithm:
            row["default_backend"] = None
        rows.append(row)
    return rows


def liboqs_status() -> str:
    """One line: whether liboqs is in use, and where it was found."""
    if load_oqs() is not None:
        return f"liboqs in use ({liboqs_library()})"
    lib = liboqs_library()
    return f"liboqs library at {lib}, but liboqs-python is missing or failed" if lib else "liboqs not installed"
