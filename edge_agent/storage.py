"""A real device's state on disk: its keys (0600), the pinned coordinator key, the enclave."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from common.state import private_file
from edge_agent.client import Device
from pqc.identity import Identity
from schemas.codec import decode, encode
from schemas.messages import AttestationReport


def device_dir(state_dir: Path, device_id: str) -> Path:
    return state_dir / "devices" / device_id


def save_device(state_dir: Path, device: Device) -> Path:
    d = device_dir(state_dir, device.device_id)
    device.identity.save(d / "keys")
    meta = {"device_id": device.device_id, "coordinator_sig_alg": device.coordinator_sig_alg,
            "coordinator_sig_pk": base64.b64encode(device.coordinator_sig_pk).decode(),
            "enclave": base64.b64encode(encode(device.enclave)).decode() if device.enclave else None,
            "coordinator_kem_alg": device.coordinator_kem_alg,
            "coordinator_kem_pk": base64.b64encode(device.coordinator_kem_pk).decode() if device.coordinator_kem_pk
            else None}
    auth = d / "keys" / "kem-v3.key"  # the kem-v3 MAC key: a secret, beside the private keys
    if device.auth_key is not None:
        private_file(auth).write_bytes(device.auth_key)
    else:
        auth.unlink(missing_ok=True)
    tmp = d / "device.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, d / "device.json")
    return d


def load_device(state_dir: Path, device_id: str) -> Device:
    d = device_dir(state_dir, device_id)
    if not (d / "device.json").exists():
        raise FileNotFoundError(f"device {device_id} is not enrolled here ({d}); run `qflare agent enroll` first")
    meta = json.loads((d / "device.json").read_text())
    enclave = decode(base64.b64decode(meta["enclave"]), AttestationReport) if meta["enclave"] else None
    kem_pk = meta.get("coordinator_kem_pk")  # absent when saved before handshake kem-v2
    auth = d / "keys" / "kem-v3.key"  # absent when saved before kem-v3 or without its key
    return Device(device_id, Identity.load(d / "keys"), meta["coordinator_sig_alg"],
                  base64.b64decode(meta["coordinator_sig_pk"]), enclave,
                  coordinator_kem_alg=meta.get("coordinator_kem_alg"),
                  coordinator_kem_pk=base64.b64decode(kem_pk) if kem_pk else None,
                  auth_key=auth.read_bytes() if auth.exists() else None)
