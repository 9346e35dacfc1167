"""Claiming one enrollment token from a shared directory: how replicas of a scaled device
service (``docker compose up --scale device=5``) each become a different device.

The operator (in compose: the coordinator's container at start) writes one file per device,
``<dir>/<device id>.json``, as printed by ``qflare token create --json``. A device claims one
by renaming it into ``<dir>/claimed/`` (atomic on one filesystem: two replicas never get the
same token), and remembers its claim in its own state directory, so a restarted container is
the same device. A token is still one-time and bound to its device id at the coordinator.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

CLAIM_FILE = "claim.json"


@dataclass(frozen=True)
class Claim:
    device_id: str
    token: str
    coordinator_fingerprint: str
    shard: int
    of: int
    enrolled: bool = False


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
        tok = json.loads(target.read_text())
        c = Claim(tok["device_id"], tok["token"], tok["coordinator_fingerprint"],
                  _shard(tok["device_id"], everyone), max(1, len(everyone)))
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
