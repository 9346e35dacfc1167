"""Per-device reputation across rounds (pure).

A device's reputation is an exponentially decayed record of its verdicts: 1.0 for a new
device, each round it sends ``r <- decay * r + (1 - decay) * (1 if accepted else 0)``. Below
``quarantine_below`` the device is quarantined: its updates are still judged (so it can
earn its way back) but never aggregated. One honest rejection costs little; an attacker
caught in most rounds is kept out of the rounds it would slip through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.state import private_dir, private_file

INITIAL = 1.0


def current(reputations: Mapping[str, float], device: str) -> float:
    """Reputation of ``device`` (INITIAL when it has no record)."""
    return float(reputations.get(device, INITIAL))


def quarantined(reputations: Mapping[str, float], device: str, below: float | None) -> bool:
    return below is not None and current(reputations, device) < below


def updated(reputations: Mapping[str, float], devices: Sequence[str], passed: Sequence[bool],
            decay: float) -> dict[str, float]:
    """New reputations after a round in which ``devices[i]`` passed the screen iff ``passed[i]``."""
    out = dict(reputations)
    for device, ok in zip(devices, passed, strict=True):
        out[device] = decay * current(out, device) + (1.0 - decay) * (1.0 if ok else 0.0)
    return out


FILE = "reputation.json"


def load(directory: Path) -> dict[str, float]:
    """Reputations the enclave kept in ``directory`` (empty when none or unreadable)."""
    try:
        data = json.loads((directory / FILE).read_text())
        return {str(k): float(v) for k, v in data.get("reputations", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def load_trust_on(directory: Path) -> bool:
    """Whether an earlier round switched trust weighting on (kept across restarts, like reputations)."""
    try:
        return bool(json.loads((directory / FILE).read_text()).get("trust_on", False))
    except (OSError, ValueError, AttributeError):
        return False


def save(directory: Path, reputations: Mapping[str, float], quarantine_below: float | None,
         trust_on: bool = False) -> None:
    """Write reputations atomically, with who is quarantined (``qflare device list`` reads it) and
    whether trust weighting is on (a restarted enclave must not wait for another attack round)."""
    private_dir(directory)
    body = {"reputations": {k: round(v, 6) for k, v in sorted(reputations.items())},
            "quarantined": sorted(d for d in reputations if quarantined(reputations, d, quarantine_below)),
            "trust_on": bool(trust_on)}
    tmp = private_file(directory / (FILE + ".tmp"))  # 0600 like the rest of the enclave's state
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, directory / FILE)
