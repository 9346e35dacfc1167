"""Enrollments/s and sessions/s per algorithm suite (``qflare bench handshake``).

Two figures per suite: the coordinator's own work per request on one core (handlers called
directly, so the number is the crypto and registry cost), and full round trips over the
broker with many requests in flight (device and coordinator in one process, so both sides'
crypto share the two cores).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pqc
from broker.client import BrokerClient
from broker.topology import delete_topology
from common import handshake
from common.report import md_table, write_section
from common.settings import Settings
from coordinator.service import Coordinator
from edge_agent import client
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import EnrollClaim, EnrollRequest, SessionRequest

SUITES = [("ML-KEM-768", "ML-DSA-44"), ("ML-KEM-1024", "ML-DSA-65"), ("ML-KEM-768+X25519", "ML-DSA-44"),
          ("FrodoKEM-640-AES", "ML-DSA-44")]


def _settings(base: Settings, state: Path, kem: str, sig: str) -> Settings:
    return base.model_copy(update={
        "state_dir": state, "registry_path": None,
        "broker": base.broker.model_copy(update={"namespace": f"bench-{uuid.uuid4().hex[:8]}"}),
        "crypto": base.crypto.model_copy(update={"kem": kem, "signature": sig, "allow_pure_backends": True}),
        "rate_limits": base.rate_limits.model_copy(update={
            "global_per_s": 1e9, "global_burst": 1e9, "enroll_per_device_per_s": 1e9,
            "enroll_per_device_burst": 1e9, "session_per_device_per_s": 1e9, "session_per_device_burst": 1e9}),
    })


async def _coordinator_side(coord: Coordinator, kem: str, sig: str, n: int) -> dict[str, float]:
    """Per-request coordinator cost, requests prepared beforehand (device cost excluded)."""
    keys = coord.identity
    idents = [Identity.generate(sig, kem) for _ in range(n)]
    reqs = []
    for i, ident in enumerate(idents):
        token = coord.registry.create_token(f"b{i}", 600)
        claim = EnrollClaim(device_id=f"b{i}", token=token, sig_alg=ident.sig_alg, sig_pk=ident.sig_pk,
                            kem_alg=ident.kem_alg, kem_pk=ident.kem_pk, nonce=secrets.token_bytes(32),
                            timestamp=time.time())
        body = encode(signing.sign(claim, ident.sig_alg, ident.sig_sk, ident.sig_pk))
        reqs.append(EnrollRequest(device_id=claim.device_id, kem_alg=keys.kem_alg, coordinator_kem_fp=keys.kem_fp,
                                  sealed=pqc.seal(keys.kem_alg, keys.kem_pk, body, handshake.enroll_aad(claim.device_id))))
    t0 = time.perf_counter()
    for r in reqs:
        await coord.enroll(r, "bench")  # a shared (non-device) broker user, as in the simulator
    enroll_s = n / (time.perf_counter() - t0)
    eph = pqc.get_kem(kem)
    sess = []
    for i, ident in enumerate(idents):
        for _ in range(4):
            pk, _ = eph.generate_keypair()
            req = SessionRequest(device_id=f"b{i}", eph_kem_alg=eph.name, eph_pk=pk, nonce=secrets.token_bytes(32),
                                 timestamp=time.time())
            sess.append(signing.sign(req, ident.sig_alg, ident.sig_sk, ident.sig_pk))
    t0 = time.perf_counter()
    for s in sess:
        await coord.open_session(s, "bench")
    return {"enroll_per_s": enroll_s, "session_per_s": len(sess) / (time.perf_counter() - t0)}


async def _over_broker(coord: Coordinator, settings: Settings, n: int, concurrency: int = 32) -> dict[str, float]:
    broker = await BrokerClient.open(settings, name="bench-devices")
    try:
        rpc = await broker.rpc()
        fp = coord.identity.sig_fp
        tokens = [coord.registry.create_token(f"w{i}", 600) for i in range(n)]
        sem = asyncio.Semaphore(concurrency)
        devices: list[client.Device] = []

        async def one(i: int) -> None:
            async with sem:
                devices.append(await client.enroll(rpc, broker.names, f"w{i}", tokens[i], fp,
                                                   sig_alg=settings.crypto.signature, kem_alg=settings.crypto.kem))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        enroll_s = n / (time.perf_counter() - t0)

        async def sess(d: client.Device) -> None:
            async with sem:
                await client.open_session(rpc, broker.names, d, kem_alg=settings.crypto.kem)

        t0 = time.perf_counter()
        await asyncio.gather(*(sess(d) for d in devices * 2))
        return {"enroll_per_s": enroll_s, "session_per_s": 2 * n / (time.perf_counter() - t0)}
    finally:
        await broker.close()


async def run_bench(base: Settings, seconds: float = 5.0, suites=SUITES, write_docs: bool = False) -> dict:
    results = []
    for kem, sig in suites:
        state = Path(tempfile.mkdtemp(prefix="qflare-bench-"))
        settings = _settings(base, state, kem, sig)
        coord = Coordinator(settings)
        try:
            await coord.start()
            n = max(20, int(60 * seconds / 5))
            local = await _coordinator_side(coord, kem, sig, n)
            remote = await _over_broker(coord, settings, n)
            results.append({"kem": kem, "signature": sig, "coordinator_enroll_per_s": round(local["enroll_per_s"], 1),
                            "coordinator_session_per_s": round(local["session_per_s"], 1),
                            "broker_enroll_per_s": round(remote["enroll_per_s"], 1),
                            "broker_session_per_s": round(remote["session_per_s"], 1)})
            print(results[-1], file=sys.stderr, flush=True)  # progress; stdout is for --json
        finally:
            ch = await coord.broker.connection.channel()
            await delete_topology(ch, coord.broker.names)
            await coord.stop()
            shutil.rmtree(state, ignore_errors=True)
    md = ("Coordinator-side: the coordinator's handler per request on one core (requests prepared in\n"
          "advance). Over the broker: device and coordinator in one process, 32 requests in flight.\n\n")
    md += md_table(["KEM", "signature", "coordinator enroll/s", "coordinator session/s", "broker enroll/s",
                    "broker session/s"],
                   [[r["kem"], r["signature"], r["coordinator_enroll_per_s"], r["coordinator_session_per_s"],
                     r["broker_enroll_per_s"], r["broker_session_per_s"]] for r in results])
    if write_docs:
        write_section("handshake", "## Handshakes (`qflare bench handshake`)\n\nGoal: >= 1,000 sessions/s with "
                      "ML-KEM-768 + ML-DSA-44 on one core.\n\n" + md)
    return {"suites": results}
