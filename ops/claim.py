"""Claiming one enrollment token from a shared directory: how replicas of a scaled device
service (``docker compose up --scale device=5``) each become a different device.

The operator (in compose: the coordinator's container at start) writes one file per device,
``<dir>/<device id>.json``, as printed by ``qflare token create --json``. A device claims one
by renaming it into ``<dir>/claimed/`` (atomic on one filesystem: two replicas never get the
same token), and remembers its claim in its own state directory, so a restarted container is
the same device. A token is still one-time and bound to its device id at the coordinator.

A token file may carry the coordinator's self-signed keys (``coordinator_keys``, base64), so
the device enrols in one round trip; it checks them against the file's fingerprint first
(common/handshake.py: check_keys_message). Files without them (older operators) still work:
the device then fetches the key chain.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from schemas.reasons import QflareError, Reason

CLAIM_FILE = "claim.json"


@dataclass(frozen=True)
class TokenFile:
    """One token file as ``qflare token create --json`` writes it (the fields a device uses)."""

    device_id: str
    token: str
    coordinator_fingerprint: str
    #: base64 of the coordinator's encoded Signed(CoordinatorKeys); None in older files
    coordinator_keys: str | None = None


@dataclass(frozen=True)
class Claim:
    device_id: str
    token: str
    coordinator_fingerprint: str
    shard: int
    of: int
    enrolled: bool = False
    coordinator_keys: str | None = None  # as in the token file; None in claims from before it


def keys_message(encoded: str | None) -> bytes | None:
    """The bytes of a token file's ``coordinator_keys`` (unchecked: the device verifies them)."""
    if encoded is None:
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise QflareError(Reason.MALFORMED, "coordinator_keys in the token file is not base64") from None


def parse_token(text: str) -> TokenFile:
    """A token file's fields, or QflareError(malformed) naming what is missing."""
    try:
        tok = json.loads(text)
        keys = tok.get("coordinator_keys")
        if not isinstance(keys, (str, type(None))):
            raise TypeError("coordinator_keys")
        fields = {k: tok[k] for k in ("device_id", "token", "coordinator_fingerprint")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise TypeError("device_id, token and coordinator_fingerprint are strings")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QflareError(Reason.MALFORMED, f"not a token file of `qflare token create --json`: {exc}") from None
    return TokenFile(**fields, coordinator_keys=keys)


def _shard(device_id: str, names: list[str]) -> int:
    return sorted(names).index(device_id) if device_id in names else 0


def claim(token_dir: Path, state_dir: Path, holder: str) -> Claim:
    """This replica's claim: the remembered one, else a token file taken atomically."""
    remembered = state_dir / CLAIM_FILE
    if remembered.exists():
        return Claim(**json.loads(remembered.read_text()))
    claimed = token_dir / "claimed"
    claimed.mkdir(exist_ok=True)
    pending = sorted(p for p in token_dir.glob("*.json"))
    everyone = sorted({p.stem for p in pending} | {p.name.split(".json")[0] for p in claimed.iterdir()})
    for path in pending:
        target = claimed / f"{path.name}.{holder}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            continue  # another replica took it first
        tok = parse_token(target.read_text())
        c = Claim(tok.device_id, tok.token, tok.coordinator_fingerprint, _shard(tok.device_id, everyone),
                  max(1, len(everyone)), coordinator_keys=tok.coordinator_keys)
        remember(state_dir, c)
        return c
    raise FileNotFoundError(f"no unclaimed enrollment token in {token_dir}: create one per device with "
                            "`qflare token create --device-id D --json > DIR/D.json`")


def remember(state_dir: Path, c: Claim) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (CLAIM_FILE + ".tmp")
    tmp.write_text(json.dumps(c.__dict__))
    os.chmod(tmp, 0o600)
    os.replace(tmp, state_dir / CLAIM_FILE)
