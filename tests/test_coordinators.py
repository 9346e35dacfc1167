"""Several coordinator processes behind one request queue, over one PostgreSQL registry and
one identity (docs/scaling.md): real processes, the real broker, real crypto."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.settings import Settings
from coordinator.registry_pg import PgRegistry
from coordinator.service import load_identity
from edge_agent import client
from schemas.reasons import QflareError, Reason

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent


class Fleet:
    """Coordinator processes of one namespace; each logs to a file of its own."""

    def __init__(self, settings: Settings, pg_url: str, tmp: Path) -> None:
        self.settings, self.pg_url, self.tmp = settings, pg_url, tmp
        self.procs: list[subprocess.Popen] = []

    def env(self, state_dir: Path) -> dict[str, str]:
        s = self.settings
        return {**os.environ, "QFLARE_AMQP_URL": s.amqp_url, "QFLARE_STATE_DIR": str(state_dir),
                "QFLARE_BROKER__NAMESPACE": s.broker.namespace, "QFLARE_REGISTRY_URL": self.pg_url,
                "QFLARE_BROKER__RPC_TIMEOUT": "5", "QFLARE_RATE_LIMITS__ENROLL_PER_DEVICE_BURST": "1000",
                "QFLARE_RATE_LIMITS__SESSION_PER_DEVICE_BURST": "1000"}

    def start(self, state_dir: Path | None = None) -> subprocess.Popen:
        n = len(self.procs)
        log = open(self.tmp / f"coordinator-{n}.log", "w")  # noqa: SIM115 (the process holds it)
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "-v", "coordinator", "run"], cwd=ROOT,
                                env=self.env(state_dir or self.settings.state_dir), stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return (self.tmp / f"coordinator-{self.procs.index(proc)}.log").read_text()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def fleet(settings: Settings, pg_url: str, tmp_path: Path) -> Iterator[Fleet]:
    load_identity(settings)  # the key material, provisioned once and shared by every coordinator
    f = Fleet(settings, pg_url, tmp_path)
    try:
        yield f
    finally:
        f.stop()


async def consumers(broker, count: int, timeout: float = 60.0) -> None:
    """Wait until ``count`` coordinators consume the request queue."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        ch = await broker.connection.channel()  # a fresh channel: a robust one replays old declarations
        got = (await ch.declare_queue(broker.names.coordinator_queue, passive=True)).declaration_result.consumer_count
        await ch.close()
        if got == count:
            return
        if loop.time() > end:
            raise AssertionError(f"{got} coordinator(s) consuming, not {count}")
        await asyncio.sleep(0.1)


async def enroll(broker, settings: Settings, device_id: str, token: str, **kw) -> client.Device:
    rpc = await broker.rpc()
    return await client.enroll(rpc, broker.names, device_id, token, load_identity(settings).sig_fp,
                               sig_alg=settings.crypto.signature, kem_alg=settings.crypto.kem, **kw)


async def test_a_token_raced_through_two_coordinators_wins_exactly_once(broker, settings, fleet, pg_url):
    a, b = fleet.start(), fleet.start()
    await consumers(broker, 2)
    reg = PgRegistry(pg_url)
    token = reg.create_token("race-1", 600)
    results = await asyncio.gather(*(enroll(broker, settings, "race-1", token) for _ in range(10)),
                                   return_exceptions=True)
    ok = [r for r in results if isinstance(r, client.Device)]
    refused = [r for r in results if isinstance(r, QflareError)]
    assert len(ok) == 1 and len(refused) == 9, results
    assert {r.reason for r in refused} == {Reason.TOKEN_USED}
    assert reg.get_device("race-1").sig_fp == ok[0].identity.sig_fp
    # both coordinators took part: each refused some of the losers
    assert "token_used" in fleet.log(a) and "token_used" in fleet.log(b)
    reg.close()


async def test_a_session_opened_through_one_coordinator_is_used_through_another(broker, settings, fleet, pg_url):
    a = fleet.start()
    await consumers(broker, 1)
    reg = PgRegistry(pg_url)
    dev = await enroll(broker, settings, "roam-1", reg.create_token("roam-1", 600))
    rpc = await broker.rpc()
    await client.open_session(rpc, broker.names, dev)  # only a serves the queue
    fleet.start()
    await consumers(broker, 2)
    for _ in range(6):  # round-robin over both
        assert (await client.status(rpc, broker.names, dev)).status == "active"
    a.kill()  # SIGKILL: nothing of a's memory survives
    await consumers(broker, 1)
    assert (await client.status(rpc, broker.names, dev)).status == "active"
    dev.session.seq -= 1  # a call the other coordinator already answered, sent again
    with pytest.raises(QflareError) as err:
        await client.status(rpc, broker.names, dev)
    assert err.value.reason == Reason.REPLAY
    reg.close()


async def test_a_coordinator_with_another_identity_refuses_to_start(broker, settings, fleet, tmp_path):
    fleet.start()
    await consumers(broker, 1)
    other_state = tmp_path / "other-state"  # other keys, same namespace and registry
    rogue = fleet.start(other_state)
    assert rogue.wait(60) != 0
    errors = [line for line in fleet.log(rogue).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "identity_conflict" in errors[0], fleet.log(rogue)


async def test_a_coordinator_with_another_identity_and_registry_refuses_to_start(broker, settings, fleet, tmp_path):
    """The failure first seen: a second state directory (its own keys and SQLite registry)
    answered every other enrolment with keys devices do not pin."""
    fleet.start()
    await consumers(broker, 1)
    env = {k: v for k, v in fleet.env(tmp_path / "other-state").items() if k != "QFLARE_REGISTRY_URL"}
    rogue = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ops.cli", "coordinator", "run"],
                                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert rogue.returncode != 0
    errors = [line for line in rogue.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "identity_conflict" in errors[0], rogue.stderr


async def device_life(broker, settings: Settings, device_id: str, token: str) -> str:
    """Enrol, open a session, ask for status; a request that times out is sent again, as an
    agent does, with the same keys (an enrolment served by the dead coordinator is answered
    again as served). ``replay``: the dead one saw the request's nonce but died before its
    effect, and the broker redelivered it; a new request (new nonce) goes through."""
    from pqc.identity import Identity

    ident = Identity.generate(settings.crypto.signature, settings.crypto.kem)
    rpc = await broker.rpc()
    dev = None
    for _ in range(20):
        try:
            dev = dev or await enroll(broker, settings, device_id, token, identity=ident, timeout=5)
            if dev.session is None:
                await client.open_session(rpc, broker.names, dev, timeout=5)
            return (await client.status(rpc, broker.names, dev, timeout=5)).status
        except QflareError as err:
            if err.reason not in (Reason.TIMEOUT, Reason.REPLAY):
                raise
    raise AssertionError(f"{device_id} never got through")


@pytest.mark.slow
async def test_a_coordinator_killed_mid_load_loses_no_request(broker, settings, fleet, pg_url):
    a, b = fleet.start(), fleet.start()
    await consumers(broker, 2)
    reg = PgRegistry(pg_url)
    n = 60
    tokens = {f"load-{i}": reg.create_token(f"load-{i}", 600) for i in range(n)}
    lives = [asyncio.create_task(device_life(broker, settings, d, t)) for d, t in tokens.items()]
    loop = asyncio.get_running_loop()
    end = loop.time() + 120
    while len(reg.list_devices()) < n // 4:  # well into the load
        assert loop.time() < end, "the load never started"
        await asyncio.sleep(0.05)
    a.send_signal(signal.SIGKILL)
    results = await asyncio.gather(*lives)
    assert results == ["active"] * n
    assert len(reg.list_devices("active")) == n and not reg.list_tokens()  # every token burnt once
    assert b.poll() is None
    reg.close()


async def test_one_coordinator_drives_a_round_plan_and_another_takes_it_over(broker, settings, pg_url, monkeypatch):
    """The plan lives in the registry: a second coordinator refuses a second plan, takes the
    plan over when the first stops, and can cancel it."""
    import secrets
    import time

    from coordinator import service
    from schemas.messages import RoundStart
    from tests.conftest import wait_for
    from tests.services import coordinator

    monkeypatch.setattr(service, "ROUND_LEASE_SECONDS", 1.5)
    shared = settings.model_copy(update={"registry_url": pg_url})
    plan = RoundStart(operator_alg="ML-DSA-44", operator_pk=b"\0" * 1312, nonce=secrets.token_bytes(32),
                      issued_at=time.time(), rounds=3, min_updates=2, deadline_seconds=600)
    async with coordinator(shared) as b:
        async with coordinator(shared) as a:
            assert await a.start_rounds(plan) == 1
            with pytest.raises(QflareError, match="already running"):
                await b.start_rounds(plan)
            assert b.running_plan() == (1, 3) and not b._driving()
            await wait_for(lambda: a.registry.get_round(1) is not None)  # a opened round 1
        await wait_for(b._driving, timeout=30)  # a stopped: b carries the plan on at round 1
        assert b.registry.get_round(1).status == "open"
        assert await b.cancel_rounds("test") == (1, 2)
        assert b.running_plan() is None and b.registry.get_round(1).status == "cancelled"


async def test_the_coordinator_takes_coordinator_prefetch_requests_at_once(broker, settings):
    """``coordinator.prefetch`` bounds the requests one coordinator holds (its group commit
    batches what is in flight), apart from ``broker.prefetch``, which is sized for updates."""
    from schemas.messages import Ping, Pong
    from schemas.names import Names
    from tests.services import coordinator

    s = settings.model_copy(update={"coordinator": settings.coordinator.model_copy(update={"prefetch": 5}),
                                    "broker": settings.broker.model_copy(update={"prefetch": 2})})
    async with coordinator(s) as coord:
        gate, inside, peak = asyncio.Event(), 0, 0
        real = coord.ping

        async def held(msg):
            nonlocal inside, peak
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1
            return await real(msg)

        coord.ping = held
        rpc = await broker.rpc()
        calls = [asyncio.ensure_future(rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY,
                                                Ping(nonce=bytes([i])), Pong, 20)) for i in range(12)]
        deadline = asyncio.get_running_loop().time() + 10
        while inside < 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # a sixth delivery would arrive by now
        assert (inside, peak) == (5, 5)
        gate.set()
        assert all(isinstance(p, Pong) for p in await asyncio.gather(*calls))
