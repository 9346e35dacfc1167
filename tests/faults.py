"""A whole deployment in real processes on a private RabbitMQ node, for fault tests.

The coordinator, the enclave and every device are separate ``qflare`` processes (the CLI, as
an operator would run them), so a kill -9 is a real crash and a node stop a real outage. The
test process only sets up (tokens, enrollment), starts rounds with the CLI, injects faults and
reads results: each process's log (devices log every update the broker confirmed) and, once the
enclave has stopped, the enclave's store. Every wait is for a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.rabbitnode import RabbitCluster, RabbitNode

CONFIRMED = re.compile(r"update (\S+) confirmed by the broker")


@dataclass
class RoundRecord:
    round_id: int
    status: str
    accepted: int
    devices: list[str]  # one entry per stored update
    update_ids: list[str]
    rejected: dict[str, int]


class Rig:
    def __init__(self, node: RabbitNode | RabbitCluster, base: Path, **settings: object) -> None:
        """``node``: one private node, or a cluster (its ``url`` lists every node's)."""
        self.node = node
        self.base = base
        self.state = base / "state"
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.namespace = "f" + uuid.uuid4().hex[:10]
        self.procs: dict[str, subprocess.Popen] = {}
        self.runs: dict[str, int] = {}
        env = {**os.environ, "QFLARE_AMQP_URL": node.url, "QFLARE_STATE_DIR": str(self.state),
               "QFLARE_BROKER__NAMESPACE": self.namespace, "QFLARE_BROKER__RPC_TIMEOUT": "20",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "300",
               "QFLARE_FL__EPOCHS": "1",
               "QFLARE_RECOVERY__RECONNECT_SECONDS": "1", "QFLARE_RECOVERY__CLOSE_GRACE_SECONDS": "4",
               "QFLARE_RECOVERY__STALL_REPORT_SECONDS": "10",
               "QFLARE_RECOVERY__AGENT_BACKOFF_MIN_SECONDS": "0.5",
               "QFLARE_RECOVERY__AGENT_BACKOFF_MAX_SECONDS": "3"}
        env["QFLARE_OPERATOR__KEY_DIR"] = str(base / "operator-key")
        env.update({k: str(v) for k, v in settings.items()})
        self.env = env
        # the operator key, pinned by the coordinator: rounds are started as an operator would
        fp = json.loads(self.cli("operator", "init", "--json").stdout)["fingerprint"]
        self.env["QFLARE_OPERATOR__PINNED_FINGERPRINTS"] = json.dumps([fp])

    # --- processes ------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "ops.cli", *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        assert res.returncode == 0 and "Traceback" not in res.stderr, (args, res.stdout, res.stderr)
        return res

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``qflare -v ARGS`` as ``name``; its stderr is appended to logs/<name>.log."""
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
        self.runs[name] = self.runs.get(name, 0) + 1
        with open(self.log(name), "a") as out:
            out.write(f"=== run {self.runs[name]} ===\n")
            out.flush()
            p = subprocess.Popen([sys.executable, "-m", "ops.cli", "-v", *args], env={**self.env, **(env or {})},
                                 stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL)
        self.procs[name] = p
        return p

    def kill(self, name: str) -> None:
        """kill -9: a crash, nothing flushed, nothing said to the broker."""
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    def stop(self, name: str, timeout: float = 30) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name, timeout=15)

    def text(self, name: str, run: int | None = None) -> str:
        """The log of ``name`` (only its ``run``-th run when given)."""
        if not self.log(name).exists():
            return ""
        text = self.log(name).read_text(errors="replace")
        if run is None:
            return text
        parts = text.split(f"=== run {run} ===\n", 1)
        return parts[1].split("=== run ", 1)[0] if len(parts) == 2 else ""

    async def wait_log(self, name: str, pattern: str, count: int = 1, timeout: float = 90, run: int | None = None
                       ) -> None:
        """Wait until ``pattern`` (a regex) appears ``count`` times in the log of ``name``."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while len(rx.findall(self.text(name, run))) < count:
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                raise AssertionError(f"{name} exited ({p.returncode}) before {pattern!r}:\n{self.text(name)[-3000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"{pattern!r} x{count} not in {name}'s log within {timeout}s:\n"
                                     f"{self.text(name)[-3000:]}")
            await asyncio.sleep(0.1)

    # --- the deployment -------------------------------------------------------------------

    async def start_services(self) -> None:
        self.start("coordinator", "coordinator", "run")
        await self.wait_log("coordinator", "coordinator started", run=self.runs["coordinator"])
        self.start("enclave", "enclave", "run")
        await self.wait_log("enclave", "enclave started", run=self.runs["enclave"])

    async def restart(self, name: str, *args: str, ready: str) -> None:
        self.start(name, *args)
        await self.wait_log(name, ready, run=self.runs[name])

    def settings(self):
        from common.settings import load_settings

        return load_settings(amqp_url=self.node.url, state_dir=self.state,
                             broker={"namespace": self.namespace, "rpc_timeout": 20.0})

    async def enroll(self, *device_ids: str) -> None:
        """Tokens from the registry file, enrollment over the broker, saved where agents look."""
        from broker.client import BrokerClient
        from coordinator.registry import Registry
        from coordinator.service import load_identity
        from edge_agent import client
        from edge_agent.storage import save_device

        s = self.settings()
        fp = load_identity(s).sig_fp
        registry = Registry(str(s.registry_file))
        try:
            tokens = {d: registry.create_token(d, 600) for d in device_ids}
        finally:
            registry.close()
        async with await BrokerClient.open(s, name="fault-enroll", declare=False) as b:
            rpc = await b.rpc()
            for d in device_ids:
                dev = await client.enroll(rpc, b.names, d, tokens[d], fp, sig_alg=s.crypto.signature,
                                          kem_alg=s.crypto.kem, timeout=30)
                save_device(s.state_dir, dev)

    def start_agent(self, device_id: str, shard: int, of: int, env: dict[str, str] | None = None) -> None:
        self.start(device_id, "agent", "run", "--device-id", device_id, "--shard", str(shard), "--of", str(of),
                   env=env)

    async def agent_ready(self, device_id: str) -> None:
        await self.wait_log(device_id, r"following the models fanout", run=self.runs[device_id])

    def start_rounds(self, rounds: int, min_updates: int, deadline: float, devices: list[str] | None = None) -> None:
        args = ["round", "start", "--rounds", str(rounds), "--min-updates", str(min_updates),
                "--deadline", str(deadline)]
        for d in devices or []:
            args += ["--device", d]
        self.cli(*args)

    # --- broker-side faults -------------------------------------------------------------

    def unacked(self, queue: str) -> int:
        """Messages delivered to a consumer of ``queue`` and not yet acknowledged."""
        res = self.node.ctl("list_queues", "name", "messages_unacknowledged", "--formatter", "json", "--silent")
        assert res.returncode == 0, res.stderr
        return sum(int(q["messages_unacknowledged"]) for q in json.loads(res.stdout or "[]") if q["name"] == queue)

    @property
    def names(self):
        from schemas.names import Names

        return Names(self.namespace)

    def freeze(self, name: str) -> None:
        """SIGSTOP: the process neither reads nor answers (a suspended device, a hung service)."""
        self.procs[name].send_signal(signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGCONT)

    # --- results --------------------------------------------------------------------------

    def round_status(self) -> dict[int, str]:
        """Round id → status, read-only from the running enclave's store."""
        path = self.state / "enclave" / "enclave.sqlite3"
        if not path.exists():
            return {}
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            try:
                return dict(db.execute("SELECT round_id, status FROM rounds").fetchall())
            except sqlite3.OperationalError:
                return {}

    def stored(self, round_id: int) -> int:
        """Updates durably stored for ``round_id`` (read-only from the running enclave's store)."""
        path = self.state / "enclave" / "enclave.sqlite3"
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            try:
                return db.execute("SELECT COUNT(*) FROM updates WHERE round_id=?", (round_id,)).fetchone()[0]
            except sqlite3.OperationalError:
                return 0

    async def wait_rounds(self, n: int, timeout: float = 180) -> None:
        """Wait until rounds 1..n are closed; fail at once if one failed."""
        end = time.monotonic() + timeout
        while True:
            status = self.round_status()
            failed = [r for r, s in status.items() if s == "failed"]
            assert not failed, f"rounds {failed} failed: {status}\n{self.text('enclave')[-4000:]}"
            if all(status.get(r) == "completed" for r in range(1, n + 1)):
                return
            if time.monotonic() > end:
                raise AssertionError(f"rounds 1..{n} not completed within {timeout}s: {status}\n"
                                     f"enclave: {self.text('enclave')[-3000:]}\n"
                                     f"coordinator: {self.text('coordinator')[-2000:]}")
            await asyncio.sleep(0.2)

    def confirmed(self, device_id: str) -> set[str]:
        """Every update id the broker confirmed to this device, over all its runs."""
        return set(CONFIRMED.findall(self.text(device_id)))

    def records(self) -> dict[int, RoundRecord]:
        """Every round in the enclave's store (call once the enclave process has stopped)."""
        from enclave_worker.store import EnclaveStore

        store = EnclaveStore(self.state / "enclave")
        try:
            out = {}
            for round_id, _spec in store.db.execute("SELECT round_id, spec FROM rounds").fetchall():
                status = store.round_status(round_id)
                stored = store.round_updates(round_id)
                result = store.closed_round(round_id)[0] if status != "open" else {}
                out[round_id] = RoundRecord(round_id, status, int(result.get("accepted", 0)),
                                            [u.device_id for u in stored], [u.update_id for u in stored],
                                            store.rejections(round_id))
            return out
        finally:
            store.close()

    def assert_nothing_lost_or_doubled(self, rounds: int, devices: list[str]) -> dict[int, RoundRecord]:
        """0 confirmed updates lost, 0 counted twice, every round of the plan completed."""
        self.stop("enclave")
        rec = self.records()
        assert [rec[r].status for r in range(1, rounds + 1)] == ["completed"] * rounds, \
            {r: (x.status, x.rejected) for r, x in rec.items()}
        stored = [u for r in rec.values() for u in r.update_ids]
        assert len(stored) == len(set(stored)), "an update id stored twice"
        for r in rec.values():
            assert len(r.devices) == len(set(r.devices)), f"round {r.round_id} counted a device twice: {r.devices}"
            assert r.accepted <= len(r.devices)
        confirmed = set().union(*(self.confirmed(d) for d in devices))
        lost = confirmed - set(stored)
        assert not lost, f"{len(lost)} confirmed updates lost: {sorted(lost)}; rounds " + json.dumps(
            {r: x.devices for r, x in rec.items()})
        return rec
