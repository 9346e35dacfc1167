"""Replicas of a scaled device service each claim a different token, and keep it (ops/claim.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.claim import claim
from tests.test_cli_shell import Shell


def _tokens(directory: Path, n: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        (directory / f"device-{i}.json").write_text(json.dumps(
            {"device_id": f"device-{i}", "token": f"t{i}", "coordinator_fingerprint": "f" * 64}))


def test_each_replica_claims_a_different_token_and_a_restart_keeps_it(tmp_path):
    tokens = tmp_path / "tokens"
    _tokens(tokens, 3)
    a = claim(tokens, tmp_path / "a", "host-a")
    b = claim(tokens, tmp_path / "b", "host-b")
    assert a.device_id != b.device_id and {a.shard, b.shard} <= {0, 1, 2} and a.shard != b.shard
    assert (a.of, b.of) == (3, 3)
    assert claim(tokens, tmp_path / "a", "host-a") == a  # restarted container: same device
    claim(tokens, tmp_path / "c", "host-c")
    with pytest.raises(FileNotFoundError, match="no unclaimed enrollment token"):
        claim(tokens, tmp_path / "d", "host-d")
    assert a.coordinator_keys is None  # token files from before coordinator_keys still claim


def test_a_claim_remembered_before_coordinator_keys_still_loads(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "claim.json").write_text(json.dumps({"device_id": "d", "token": "t", "coordinator_fingerprint": "f" * 64,
                                                  "shard": 0, "of": 1, "enrolled": True}))
    c = claim(tmp_path / "tokens", state, "host")
    assert (c.device_id, c.enrolled, c.coordinator_keys) == ("d", True, None)


@pytest.mark.broker
def test_agent_join_enrolls_from_a_token_file_minted_by_token_create(amqp_url, tmp_path):
    sh = Shell(amqp_url, tmp_path / "coordinator")
    try:
        sh.start("coordinator", "run")
        sh.wait_for_coordinator()
        tokens = tmp_path / "tokens"
        tokens.mkdir()
        (tokens / "device-1.json").write_text(sh.run("token", "create", "--device-id", "device-1", "--json").stdout)
        device_state = tmp_path / "device"
        sh.procs.append(subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "agent", "join", "--token-dir", str(tokens)],
            env={**sh.env, "QFLARE_STATE_DIR": str(device_state)}))
        remembered = device_state / "claim.json"
        end = time.time() + 60
        while time.time() < end and not (remembered.exists() and json.loads(remembered.read_text())["enrolled"]):
            time.sleep(0.3)
        devices = sh.json("device", "list")
        assert [(d["device_id"], d["status"]) for d in devices] == [("device-1", "active")]
        # the claim kept the coordinator's keys of the token file (one-RPC enrolment, checked by the device)
        assert json.loads(remembered.read_text())["coordinator_keys"] == json.loads(
            (tokens / "claimed" / f"device-1.json.{socket.gethostname()}").read_text())["coordinator_keys"]
        assert (device_state / "devices" / "device-1" / "device.json").exists()
    finally:
        sh.close()
