"""Attestation rules both sides use: the code measurement, the allow-list, the trusted platform.

The coordinator admits an enclave and the enclave reports itself by the same measurement,
so it is computed in one place, below both parties (the enclave's source is read as files).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from common.settings import Settings

PLATFORM_SIG = "ML-DSA-44"
#: The enclave worker's source: read as files to measure it, never imported from here.
_SOURCE = Path(__file__).resolve().parent.parent / "enclave_worker"


def measurement() -> str:
    """SHA3-256 over the enclave worker's source files, in name order (the "MRENCLAVE")."""
    h = hashlib.sha3_256()
    for path in sorted(_SOURCE.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def allowed_measurements(settings: Settings) -> set[str]:
    """The allow-list: configured measurements, or this installation's own code."""
    return set(settings.enclave.allowed_measurements) or {measurement()}


def trusted_platform_key(settings: Settings) -> tuple[str, bytes] | None:
    """(alg, public key) of the platform the coordinator trusts, if one is configured."""
    path = settings.enclave.platform_key_file or settings.state_dir / "platform" / "public.json"
    if not path.exists():
        return None
    pub = json.loads(path.read_text())
    return pub["sig_alg"], base64.b64decode(pub["sig_pk"])
