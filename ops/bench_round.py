"""Enclave throughput for a round (``qflare bench round``).

For 100k- and 1M-parameter updates: updates/s from the first publish to the last
acceptance, last-update-to-global-model latency, the same bodies' size through a plaintext
consumer over the same broker (the ratio is the cost of verifying and opening), the
enclave process's peak RSS, and the traced peak memory of closing a FedAvg round for n and
2n updates (flat means it does not grow). The enclave runs in its own process, as deployed;
the devices' publisher and the plaintext consumer share this one.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import shutil
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from broker.topology import delete_topology
from common.report import md_table, write_section
from common.settings import Settings
from coordinator.service import META_ENCLAVE_REPORT, Coordinator
from edge_agent import client, updates
from enclave_worker.service import Enclave, close_round_streaming
from enclave_worker.store import EnclaveStore
from schemas.codec import CodecError, decode
from schemas.messages import Event, RoundOpen, RoundSpec


def _settings(base: Settings, state: Path) -> Settings:
    return base.model_copy(update={
        "state_dir": state, "registry_path": None,
        "broker": base.broker.model_copy(update={"namespace": f"bench-{uuid.uuid4().hex[:8]}", "prefetch": 64,
                                                 "max_message_bytes": 64 * 1024 * 1024}),
        "fl": base.fl.model_copy(update={"evaluate": False, "aggregator": "fedavg"}),
        "rate_limits": base.rate_limits.model_copy(update={
            "global_per_s": 1e9, "global_burst": 1e9, "enroll_per_device_per_s": 1e9,
            "enroll_per_device_burst": 1e9, "session_per_device_per_s": 1e9, "session_per_device_burst": 1e9}),
    })


def _enclave_process(dump: dict, d: int, stop, out) -> None:
    """Child process: an enclave on a zero model of ``d`` parameters until ``stop`` is set."""
    from ops.tuning import tune_allocator

    tune_allocator()

    async def main() -> None:
        enclave = Enclave(Settings(**dump), initial=(np.zeros(d, dtype=np.float32), f"bench-{d}"))
        await enclave.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await enclave.stop()

    asyncio.run(main())
    out.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


async def _plaintext(broker: BrokerClient, bodies: list[bytes]) -> float:
    """Updates/s of the same sizes through a consumer that only parses floats and sums them."""
    qname = f"{broker.names.namespace}.bench.plain"
    ch = await broker.connection.channel()
    await ch.set_qos(prefetch_count=64)
    q = await ch.declare_queue(qname, durable=True, arguments={"x-queue-type": "quorum"})
    total = np.zeros(len(bodies[0]) // 4, dtype=np.float64)
    done = asyncio.Event()
    count = 0

    async def on(message) -> None:
        nonlocal count
        total.__iadd__(np.frombuffer(message.body, dtype="<f4"))
        await message.ack()
        count += 1
        if count == len(bodies):
            done.set()

    await q.consume(on)
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(16)

    async def pub(body: bytes) -> None:
        async with sem:
            await broker.publisher.publish("", qname, body)

    await asyncio.gather(*(pub(b) for b in bodies))
    await done.wait()
    rate = len(bodies) / (time.perf_counter() - t0)
    await q.delete(if_unused=False, if_empty=False)
    await ch.close()
    return rate


async def _one(base: Settings, d: int, k: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="qflare-bench-round-"))
    state = root / "state"  # its simulated platform key goes beside it, in root, and goes with it
    settings = _settings(base, state)
    rng = np.random.default_rng(0)
    coord = Coordinator(settings)
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_enclave_process, args=(settings.model_dump(mode="json"), d, stop, out))
    devices_broker: BrokerClient | None = None
    try:
        await coord.start()
        child.start()
        devices_broker = await BrokerClient.open(settings, name="bench-devices")
        b = devices_broker
        rpc = await b.rpc()
        events: list[tuple[float, Event]] = []
        q = await b.channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ("update.#", "round.*"):
            await q.bind(b.names.events_exchange, key)

        async def on(message) -> None:
            try:
                events.append((time.perf_counter(), decode(message.body, Event)))
            except CodecError:
                pass

        await q.consume(on, no_ack=True)
        while coord.registry.get_meta(META_ENCLAVE_REPORT) is None:  # the child attested
            await asyncio.sleep(0.05)
        sem = asyncio.Semaphore(32)

        async def join(i: int) -> client.Device:
            async with sem:
                token = coord.registry.create_token(f"bench{i}", 600)
                dev = await client.enroll(rpc, b.names, f"bench{i}", token, coord.identity.sig_fp,
                                          sig_alg=settings.crypto.signature, kem_alg=settings.crypto.kem)
                await client.open_session(rpc, b.names, dev)
                return dev

        devices = await asyncio.gather(*(join(i) for i in range(k)))
        spec = RoundSpec(round_id=1, deadline=time.time() + 600, min_updates=k, expected=[x.device_id for x in devices],
                         epochs=1, lr=0.1, batch_size=16)
        await b.publisher.publish(b.names.control_exchange, "enclave", coord._sign(RoundOpen(spec=spec,
                                                                                             issued_at=time.time())))
        direction = rng.normal(size=d).astype(np.float32)
        built = [updates.build(dev, 1, 0, f"bench-{d}", direction + 0.2 * rng.normal(size=d).astype(np.float32), 100)
                 for dev in devices]
        while not any(e.type == "round.opened" for _, e in events):
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        pub_sem = asyncio.Semaphore(16)

        async def pub(key: str, body: bytes) -> None:
            async with pub_sem:
                await b.publisher.publish(b.names.updates_exchange, key, body)

        await asyncio.gather(*(pub(key, body) for _, key, body in built))
        published = time.perf_counter() - t0
        while not any(e.type in ("round.completed", "round.failed") for _, e in events):
            await asyncio.sleep(0.01)
        accepted = [t for t, e in events if e.type == "update.accepted"]
        done = next((t, e) for t, e in events if e.type in ("round.completed", "round.failed"))
        sealed_rate = len(accepted) / (max(accepted) - t0)
        latency = done[0] - max(accepted)
        plain_rate = await _plaintext(b, [np.ascontiguousarray(rng.normal(size=d), dtype="<f4").tobytes()
                                          for _ in range(k)])
        stop.set()
        enclave_rss = await asyncio.to_thread(out.get, True, 60)
        store = EnclaveStore(state / "enclave")
        stored = store.round_updates(1)
        weights = np.full(len(stored), 100.0)
        peaks = []
        for n in (len(stored) // 2, len(stored)):
            tracemalloc.start()
            close_round_streaming(lambda i: store.load_delta(stored[i]), n, weights[:n], settings.fl)
            peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
        store.close()
        return {"enclave_peak_rss_mib": round(enclave_rss, 1), "params": d, "updates": k, "accepted": len(accepted), "sealed_updates_per_s": round(sealed_rate, 1),
                "plaintext_updates_per_s": round(plain_rate, 1), "ratio": round(sealed_rate / plain_rate, 3),
                "last_update_to_model_ms": round(latency * 1e3, 1),
                "fedavg_peak_mib": {str(len(stored) // 2): round(peaks[0], 1), str(len(stored)): round(peaks[1], 1)},
                "status": done[1].type, "publish_s": round(published, 3),
                "first_accept_s": round(min(accepted) - t0, 3), "last_accept_s": round(max(accepted) - t0, 3)}
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()
        if devices_broker is not None:
            ch = await devices_broker.connection.channel()
            await delete_topology(ch, devices_broker.names)
            await devices_broker.close()
        await coord.stop()
        shutil.rmtree(root, ignore_errors=True)


async def run_bench(base: Settings, quick: bool = False) -> dict:
    cases = [(100_000, 100 if quick else 400), (1_000_000, 20 if quick else 150)]
    results = []
    for d, k in cases:
        results.append(await _one(base, d, k))
        print(results[-1], flush=True)
    md = ("The enclave runs in its own process; the devices' publisher (updates built beforehand) and\n"
          "the plaintext consumer share the benchmark's process. Plaintext: the same number and size of\n"
          "bodies through a quorum queue to a consumer that only parses and sums the floats.\n"
          "Goals: >= 300 updates/s of 100k parameters; sealed >= 0.8x plaintext; FedAvg memory flat.\n\n")
    md += md_table(["parameters", "updates", "sealed updates/s", "plaintext updates/s", "ratio",
                    "last update → model (ms)", "enclave peak RSS MiB", "FedAvg close traced peak MiB (n: MiB)"],
                   [[r["params"], r["updates"], r["sealed_updates_per_s"], r["plaintext_updates_per_s"], r["ratio"],
                     r["last_update_to_model_ms"], r["enclave_peak_rss_mib"],
                     ", ".join(f"{n}: {m}" for n, m in r["fedavg_peak_mib"].items())] for r in results])
    write_section("round", "## Rounds through the enclave (`qflare bench round`)\n\n" + md)
    return {"cases": results}
