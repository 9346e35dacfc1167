"""Attestation rules both sides use: the code measurement, the allow-list, the trusted platform.

The coordinator admits an enclave and the enclave reports itself by the same measurement,
so it is computed in one place, below both parties (the enclave's source is read as files).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import struct
from pathlib import Path

import pqc
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


# --- the attestation challenge (docs/security.md, "Attestation") ---------------------------

_CHALLENGE_LABEL = b"qflare/v1/attest-challenge"
_CHALLENGE_LEN = 16 + 8 + 16  # random, issue time, MAC


def challenge_key(coordinator_secret: bytes) -> bytes:
    """The MAC key of the coordinator's challenges; every coordinator sharing the identity
    derives the same one, so a challenge issued by one is checked by another."""
    return hmac.new(coordinator_secret, _CHALLENGE_LABEL, hashlib.sha256).digest()


def new_challenge(key: bytes, now: float) -> bytes:
    """A challenge the coordinator can later recognise as its own without storing it:
    16 random bytes, the issue time and a MAC over both. Single use is enforced at
    admission (the registry's nonce store)."""
    body = secrets.token_bytes(16) + struct.pack(">d", now)
    return body + hmac.new(key, _CHALLENGE_LABEL + body, hashlib.sha256).digest()[:16]


def challenge_issued_at(key: bytes, challenge: bytes) -> float | None:
    """When the coordinator issued ``challenge``; None if it did not issue it."""
    if len(challenge) != _CHALLENGE_LEN:
        return None
    body, tag = challenge[:24], challenge[24:]
    if not hmac.compare_digest(tag, hmac.new(key, _CHALLENGE_LABEL + body, hashlib.sha256).digest()[:16]):
        return None
    return struct.unpack(">d", body[16:])[0]


def report_digest(report: bytes) -> bytes:
    """SHA-256 of a signed report's exact bytes: what ``AttestAccept`` binds."""
    return hashlib.sha256(report).digest()


def local_coordinator_fingerprint(settings: Settings) -> str | None:
    """The fingerprint of a coordinator key kept under this host's state directory, if any
    (a file the operator's own host holds: as trusted as the settings naming it)."""
    path = settings.state_dir / "coordinator" / "public.json"
    if not path.exists():
        return None
    pub = json.loads(path.read_text())
    return pqc.fingerprint(base64.b64decode(pub["sig_pk"]), pub["sig_alg"])
