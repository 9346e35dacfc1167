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


#: Said at every start of a service that relies on it: nobody should mistake it for a TEE.
SIMULATED_WARNING = ("ATTESTATION IS SIMULATED: the platform key in %s is a file on this host, not a TEE; "
                     "anyone who can read it can forge enclave reports")


def platform_dir(settings: Settings) -> Path:
    """The simulated platform's own directory: ``enclave.platform_dir``, else a sibling of
    the state directory (``<state_dir>-platform``), never inside any service's state."""
    if settings.enclave.platform_dir is not None:
        return settings.enclave.platform_dir
    state = settings.state_dir.resolve()
    return state.with_name(state.name + "-platform")


def trusted_platform_key(settings: Settings) -> tuple[str, bytes] | None:
    """(alg, public key) of the platform the coordinator trusts, if one is configured."""
    path = settings.enclave.platform_key_file or platform_dir(settings) / "public.json"
    if not path.exists():
        return None
    pub = json.loads(path.read_text())
    return pub["sig_alg"], base64.b64decode(pub["sig_pk"])
