"""The ``qflare`` command line driven from a shell, as an operator and a device would.

Each test runs the real CLI in subprocesses against the real broker, in its own namespace
and state directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from coordinator.service import META_ENCLAVE_REPORT

pytestmark = pytest.mark.broker


class Shell:
    def __init__(self, amqp_url: str, state: Path) -> None:
        self.env = {**os.environ, "QFLARE_AMQP_URL": amqp_url, "QFLARE_STATE_DIR": str(state),
                    "QFLARE_BROKER__NAMESPACE": "c" + uuid.uuid4().hex[:10],
                    "QFLARE_OPERATOR__KEY_DIR": str(state.parent / "operator-key")}
        self.procs: list[subprocess.Popen] = []
        # the operator key, pinned by every coordinator this shell starts
        self.operator_fp = self.json("operator", "init")["fingerprint"]
        self.env["QFLARE_OPERATOR__PINNED_FINGERPRINTS"] = json.dumps([self.operator_fp])

    def run(self, *args: str, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "ops.cli", *args], env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=120)
        assert "Traceback" not in res.stderr, res.stderr
        if ok:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json").stdout)

    def start(self, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "ops.cli", *args], env=self.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait_for_coordinator(self, timeout: float = 30) -> None:
        end = time.time() + timeout
        while time.time() < end:
            res = self.run("broker", "check", "--json", ok=False)
            if res.returncode == 0 and json.loads(res.stdout).get("coordinator"):
                return
            time.sleep(0.3)
        raise AssertionError("coordinator did not answer")

    def close(self) -> None:
        for p in self.procs:
            self.stop(p)
        subprocess.run([sys.executable, "-c", _CLEANUP], env=self.env, timeout=60)


_CLEANUP = """
import asyncio
from broker.client import BrokerClient
from broker.topology import delete_topology
from common.settings import load_settings
async def main():
    b = await BrokerClient.open(load_settings(), declare=False)
    ch = await b.connection.channel()
    await delete_topology(ch, b.names)
    await b.close()
asyncio.run(main())
"""


def test_help_lists_every_command_group(sh):
    out = sh.run("--help").stdout
    for group in ("demo", "token", "device", "coordinator", "enclave", "agent", "round", "broker", "bench", "crypto"):
        assert group in out


def test_token_enroll_session_from_a_shell_and_across_a_coordinator_restart(sh):
    coord = sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    tok = sh.json("token", "create", "--device-id", "cam-1", "--ttl", "15m")
    assert tok["device_id"] == "cam-1" and len(tok["coordinator_fingerprint"]) == 64
    enroll = ("agent", "enroll", "--device-id", "cam-1", "--token", tok["token"],
              "--coordinator-fingerprint", tok["coordinator_fingerprint"])
    sh.run(*enroll)
    session = sh.json("agent", "session", "--device-id", "cam-1")
    assert len(session["session_id"]) == 32
    assert sh.json("agent", "status", "--device-id", "cam-1")["status"] == "active"  # under the session key
    again = sh.run(*enroll, ok=False)
    assert again.returncode != 0 and "token_used" in again.stderr
    # restart: nothing is lost
    sh.stop(coord)
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    assert sh.json("agent", "session", "--device-id", "cam-1")["session_id"] != session["session_id"]
    devices = sh.json("device", "list")
    assert [d["device_id"] for d in devices] == ["cam-1"] and devices[0]["status"] == "active"
    # a wrong pinned fingerprint is refused before anything is sent
    tok2 = sh.json("token", "create", "--device-id", "cam-2")
    bad = sh.run("agent", "enroll", "--device-id", "cam-2", "--token", tok2["token"],
                 "--coordinator-fingerprint", "0" * 64, ok=False)
    assert bad.returncode != 0 and "bad_signature" in bad.stderr
    # revocation from the shell takes effect at once
    sh.run("device", "revoke", "cam-1")
    refused = sh.run("agent", "session", "--device-id", "cam-1", ok=False)
    assert refused.returncode != 0 and "revoked" in refused.stderr


def test_bad_input_gives_one_clear_line(sh, tmp_path):
    bad_ttl = sh.run("token", "create", "--device-id", "x", "--ttl", "soon", ok=False)
    assert bad_ttl.returncode != 0 and "duration" in bad_ttl.stderr
    bad_id = sh.run("token", "create", "--device-id", "no spaces!", ok=False)
    assert bad_id.returncode == 2 and "device id" in bad_id.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("fl:\n  rounds: 0\n")
    bad_cfg = sh.run("--config", str(cfg), "token", "list", ok=False)
    assert bad_cfg.returncode == 2 and "fl.rounds" in bad_cfg.stderr
    no_broker = sh.run("broker", "check", ok=False, env={"QFLARE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert no_broker.returncode != 0 and "rabbitmq-server -detached" in no_broker.stderr
    not_enrolled = sh.run("agent", "session", "--device-id", "ghost", ok=False)
    assert not_enrolled.returncode != 0 and "not enrolled" in not_enrolled.stderr


def test_demo_json_shows_rounds_and_rejected_attackers(sh):
    res = sh.run("demo", "--devices", "10", "--rounds", "2", "--malicious", "0.2", "--attack", "scale", "--json")
    out = json.loads(res.stdout)
    assert out["namespace"].startswith("demo-") and f"demo namespace: {out['namespace']}" in res.stderr
    assert [set(r) >= {"round", "accuracy", "accepted", "rejected", "seconds"} for r in out["rounds"]] == [True] * 2
    assert all(r["accepted"] == 8 and sum(r["rejected"].values()) == 2 for r in out["rounds"])


def test_a_device_process_trains_in_a_round_started_from_the_shell(sh):
    sh.env["QFLARE_FL__MIN_UPDATES"] = "1"  # a one-device fleet
    sh.env["QFLARE_FL__MIN_ACCEPTED"] = "1"  # (the enclave's floor, 3 by default, lowered on purpose)
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    sh.start("enclave", "run")
    tok = sh.json("token", "create", "--device-id", "cam-3")
    sh.run("agent", "enroll", "--device-id", "cam-3", "--token", tok["token"],
           "--coordinator-fingerprint", tok["coordinator_fingerprint"])
    # the agent waits for an attested enclave before it takes part
    sh.start("agent", "run", "--device-id", "cam-3", "--shard", "0", "--of", "2")
    registry = Path(sh.env["QFLARE_STATE_DIR"]) / "registry.sqlite3"
    _poll(lambda: _meta(registry, META_ENCLAVE_REPORT) is not None, 30)
    # no wait for the agent: a device that joins late reads the open round from the models stream
    started = sh.json("round", "start", "--rounds", "1", "--min-updates", "1", "--deadline", "150", "--device", "cam-3")
    assert started == {"first_round_id": 1, "last_round_id": 1}
    end = time.time() + 180
    status = []
    while time.time() < end:
        status = sh.json("broker", "status")
        model = Path(sh.env["QFLARE_STATE_DIR"]) / "enclave" / "enclave.sqlite3"
        if model.exists():
            import sqlite3

            db = sqlite3.connect(model)
            row = db.execute("SELECT status, result FROM rounds WHERE round_id=1").fetchone()
            db.close()
            if row and row[0] == "completed":
                assert json.loads(row[1])["accepted"] == 1
                break
        time.sleep(0.5)
    else:
        raise AssertionError(f"round did not complete; queues: {status}")
    by_name = {q["queue"].split(".", 1)[1]: q for q in status}
    assert by_name["enclave.updates"]["consumers"] == 1 and by_name["coordinator.requests"]["consumers"] == 1


def _meta(db_path: Path, key: str):
    import sqlite3

    db = sqlite3.connect(db_path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


def _poll(predicate, timeout: float) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def test_crypto_info_names_a_backend_for_every_algorithm(sh):
    info = sh.json("crypto", "info")
    assert {a["algorithm"] for a in info["algorithms"]} >= {"ML-KEM-768", "ML-DSA-44", "FrodoKEM-640-AES",
                                                            "ML-KEM-768+X25519"}
    assert all(a["default_backend"] for a in info["algorithms"])


def test_a_device_enrolls_with_its_own_confined_broker_user(sh):
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    user = sh.json("device", "broker-user", "cam-9")
    try:
        tok = sh.json("token", "create", "--device-id", "cam-9")
        device_env = {"QFLARE_AMQP_URL": user["amqp_url"]}
        sh.run("agent", "enroll", "--device-id", "cam-9", "--token", tok["token"],
               "--coordinator-fingerprint", tok["coordinator_fingerprint"], env=device_env)
        sh.run("agent", "session", "--device-id", "cam-9", env=device_env)
        # the confined user cannot act for another device
        tok2 = sh.json("token", "create", "--device-id", "cam-10")
        other = sh.run("agent", "enroll", "--device-id", "cam-10", "--token", tok2["token"],
                       "--coordinator-fingerprint", tok2["coordinator_fingerprint"], env=device_env, ok=False)
        assert other.returncode != 0
    finally:
        sh.run("device", "broker-user", "cam-9", "--delete")


def test_operators_see_events_and_dead_letters(sh):
    import subprocess as sp

    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    follower = sp.Popen([sys.executable, "-m", "ops.cli", "events", "enrollment.rejected.#", "--count", "1", "--json"],
                        env=sh.env, stdout=sp.PIPE, stderr=sp.PIPE, text=True)
    try:
        time.sleep(1.5)  # the follower binds its queue
        tok = sh.json("token", "create", "--device-id", "cam-e")
        bad = sh.run("agent", "enroll", "--device-id", "cam-e", "--token", "wrong-token",
                     "--coordinator-fingerprint", tok["coordinator_fingerprint"], ok=False)
        assert "token_unknown" in bad.stderr
        out, _ = follower.communicate(timeout=20)
        assert json.loads(out.splitlines()[0])["type"] == "enrollment.rejected.token_unknown"
    finally:
        follower.kill()
    # a malformed request lands in the dead-letter queue, visible to the operator
    subprocess.run([sys.executable, "-c", _PUBLISH_GARBAGE], env=sh.env, check=True, timeout=60)
    rows = sh.json("broker", "dead-letters")
    assert rows and rows[0]["reason"] == "malformed" and rows[0]["queue"].endswith("coordinator.requests")


_PUBLISH_GARBAGE = """
import asyncio
from broker.client import BrokerClient
from common.settings import load_settings
from schemas.names import Names
async def main():
    b = await BrokerClient.open(load_settings(), declare=False)
    await b.publisher.publish(b.names.rpc_exchange, Names.COORDINATOR_KEY, b"\\xc1 never valid msgpack")
    await asyncio.sleep(0.5)
    await b.close()
asyncio.run(main())
"""


def test_an_operator_on_another_host_runs_rounds_tokens_and_devices_over_the_broker(sh, tmp_path):
    """Operator commands need the operator key and the broker only: no registry file, no
    coordinator key beside them; replies are checked against the pinned coordinator."""
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    coordinator_fp = sh.json("coordinator", "fingerprint")["coordinator_fingerprint"]
    remote = {"QFLARE_STATE_DIR": str(tmp_path / "laptop"), "QFLARE_OPERATOR__COORDINATOR_FINGERPRINT": coordinator_fp}

    def op(*args: str, ok: bool = True):
        res = sh.run(*args, ok=ok, env=remote)
        return json.loads(res.stdout) if ok and "--json" in args else res

    tokens = [op("token", "create", "--device-id", f"cam-{i}", "--json") for i in range(2)]
    assert all(t["coordinator_fingerprint"] == coordinator_fp for t in tokens)
    for i, t in enumerate(tokens):
        sh.run("agent", "enroll", "--device-id", f"cam-{i}", "--token", t["token"],
               "--coordinator-fingerprint", coordinator_fp)
    assert [d["device_id"] for d in op("device", "list", "--json")] == ["cam-0", "cam-1"]
    assert not (tmp_path / "laptop" / "registry.sqlite3").exists()
    started = op("round", "start", "--rounds", "3", "--deadline", "600", "--device", "cam-0", "--device", "cam-1",
                 "--json")
    assert started == {"first_round_id": 1, "last_round_id": 3}
    status = op("round", "status", "--json")
    assert status["rounds"][0]["status"] == "open" and status["plan"] == {"first_round_id": 1, "last_round_id": 3}
    assert op("round", "cancel", "--json")["skipped"] == 2
    listed = op("round", "list", "--json")
    assert [(r["round_id"], r["status"]) for r in listed["rounds"]] == [(1, "cancelled")] and listed["plan"] is None
    op("device", "revoke", "cam-1")
    assert {d["device_id"]: d["status"] for d in op("device", "list", "--json")}["cam-1"] == "revoked"
    # bounds and bad input: one line each, never a traceback
    too_many = op("round", "start", "--rounds", "100000", "--device", "cam-0", ok=False)
    assert too_many.returncode != 0 and "invalid_field" in too_many.stderr
    negative = op("round", "start", "--rounds", "-1", ok=False)
    assert negative.returncode == 2
    ghost = op("round", "start", "--rounds", "1", "--min-updates", "2", "--device", "cam-0", "--device", "ghost",
               ok=False)
    assert "not_enrolled" in ghost.stderr
    # a coordinator other than the pinned one: its replies are refused
    wrong = sh.run("device", "list", ok=False, env={**remote, "QFLARE_OPERATOR__COORDINATOR_FINGERPRINT": "ab" * 32})
    assert wrong.returncode != 0 and "bad_signature" in wrong.stderr
    # a host without the operator key is told how to make one
    keyless = sh.run("device", "list", ok=False, env={**remote, "QFLARE_OPERATOR__KEY_DIR": str(tmp_path / "none")})
    assert keyless.returncode != 0 and "qflare operator init" in " ".join(keyless.stderr.split())


def test_an_operator_key_not_pinned_by_the_coordinator_is_refused(sh, tmp_path):
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    other = {"QFLARE_OPERATOR__KEY_DIR": str(tmp_path / "intruder")}
    sh.run("operator", "init", env=other)
    refused = sh.run("round", "list", ok=False, env=other)
    assert refused.returncode != 0 and "not_operator" in refused.stderr


def test_services_log_their_start_rounds_and_faults_as_json_lines(sh):
    coord = sh.start("--log-format", "json", "coordinator", "run")
    sh.wait_for_coordinator()
    bad = sh.run("agent", "enroll", "--device-id", "cam-j", "--token", "nope", "--coordinator-fingerprint",
                 sh.json("coordinator", "fingerprint")["coordinator_fingerprint"], ok=False)
    assert "token_unknown" in bad.stderr
    sh.json("round", "start", "--rounds", "1", "--deadline", "600")
    sh.run("round", "cancel")
    sh.stop(coord)
    lines = [json.loads(line) for line in coord.stderr.read().splitlines() if line.startswith("{")]
    messages = [(r["logger"], r["level"], r["message"]) for r in lines]
    start = next(m for lg, _, m in messages if m.startswith("coordinator started"))
    assert sh.env["QFLARE_BROKER__NAMESPACE"] in start and "1 pinned operator key" in start
    assert any(lvl == "warning" and "enrollment refused for cam-j: token_unknown" in m for _, lvl, m in messages)
    assert any(m.startswith("round 1 opened") for _, _, m in messages)
    assert any("round plan cancelled at round 1" in m for _, _, m in messages)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in lines)


def test_broker_setup_makes_the_service_users_once_and_never_silently_resets_them(sh):
    from broker.users import ManagementApi, remove_policies
    from common.settings import load_settings
    from schemas.names import Names

    ns = sh.env["QFLARE_BROKER__NAMESPACE"]
    first = sh.json("broker", "setup")
    users = first["users"]
    try:
        assert set(users) == {f"qflare.{ns}.coordinator", f"qflare.{ns}.enclave", f"qflare.{ns}.operator"}
        assert all(url and url.startswith("amqp://qflare.") for url in users.values())
        again = sh.json("broker", "setup")  # unchanged: no password is reset behind a running service
        assert set(again["users"].values()) == {None}
        rotated = sh.json("broker", "setup", "--rotate")
        assert all(url and url != users[u] for u, url in rotated["users"].items())
        # the operator's own user runs an operator read command
        sh.run("broker", "status", env={"QFLARE_AMQP_URL": rotated["users"][f"qflare.{ns}.operator"]})
    finally:
        s = load_settings(amqp_url=sh.env["QFLARE_AMQP_URL"])
        api = ManagementApi.from_settings(s)
        for user in users:
            api.request("DELETE", f"/api/users/{user}")
        remove_policies(api, Names(ns))
