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
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from broker.topology import delete_topology
from common.events import decode_event
from common.report import md_table, write_section
from common.settings import Settings
from coordinator.service import META_ENCLAVE_REPORT, Coordinator
from edge_agent import client, updates
from enclave_worker.service import Enclave, close_round_streaming
from enclave_worker.store import EnclaveStore
from schemas.codec import CodecError
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
    """Child process: an enclave on a zero model of ``d`` parameters until ``stop`` is set;
    then puts (peak RSS MiB, seconds per intake stage, CPU seconds) on ``out``."""
    from ops.tuning import limit_blas_threads, tune_allocator

    tune_allocator()
    limit_blas_threads()
    stages: dict[str, float] = {}

    async def main() -> None:
        enclave = Enclave(Settings(**dump), initial=(np.zeros(d, dtype=np.float32), f"bench-{d}"))
        await enclave.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await enclave.stop()
        stages.update(enclave.stage_seconds)

    asyncio.run(main())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((usage.ru_maxrss / 1024, stages, usage.ru_utime + usage.ru_stime))


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
                events.append((time.perf_counter(), decode_event(message.body, message.content_type)))
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
        enclave_rss, stages, enclave_cpu = await asyncio.to_thread(out.get, True, 60)
        del built
        peaks = _fedavg_close_peaks(state / "fedavg", d, k, settings, rng)
        disk = _disk_mb_s(state / "probe")
        window = max(accepted) - t0
        per_update = {st: round(sec / k * 1e3, 2) for st, sec in sorted(stages.items())}
        return {"enclave_peak_rss_mib": round(enclave_rss, 1), "params": d, "updates": k, "accepted": len(accepted),
                "sealed_updates_per_s": round(sealed_rate, 1),
                "plaintext_updates_per_s": round(plain_rate, 1), "ratio": round(sealed_rate / plain_rate, 3),
                "last_update_to_model_ms": round(latency * 1e3, 1),
                "fedavg_peak_mib": {str(k // 2): round(peaks[0], 1), str(k): round(peaks[1], 1)},
                "status": done[1].type, "publish_s": round(published, 3),
                "first_accept_s": round(min(accepted) - t0, 3), "last_accept_s": round(window, 3),
                "stage_ms_per_update": per_update, "enclave_cpu_share": round(enclave_cpu / window, 2),
                "bound": _bound(stages, window, sealed_rate, plain_rate),
                "disk_write_fsync_mb_s": round(disk, 1)}
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


def _fedavg_close_peaks(directory: Path, d: int, k: int, settings: Settings, rng) -> list[float]:
    """Traced peak MiB of a streaming FedAvg close over k/2 and k stored updates of d parameters
    (the enclave deletes a round's deltas once it closed, so the bench stores its own)."""
    store = EnclaveStore(directory)
    store.begin()
    for i in range(k):
        store.add_update(1, f"u{i:08d}", f"d{i}", 100, rng.normal(size=d).astype(np.float32))
    store.commit()
    stored = store.round_updates(1)
    weights = np.full(len(stored), 100.0)
    peaks = []
    for n in (k // 2, k):
        tracemalloc.start()
        close_round_streaming(lambda i: store.load_delta(stored[i]), n, weights[:n], settings.fl)
        peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
    store.close()
    return peaks


def _disk_mb_s(directory: Path, mib: int = 64) -> float:
    """This disk's write + fsync rate (MB/s) where the enclave keeps its state."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "disk-probe"
    block = np.random.default_rng(1).bytes(2**20)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return mib * 2**20 / 1e6 / seconds


def _bound(stages: dict[str, float], window: float, sealed: float, plain: float) -> str:
    """Which stage bounds the sealed path, from the enclave's busy time per stage.

    ``store`` and ``commit`` run one at a time (under the enclave's lock), so their sum
    against the window says whether that serial part saturates; ``open`` runs in threads on
    both cores, ``ack`` in tasks beside them. If neither is near the window, the enclave waits on deliveries:
    the broker (and the 2 shared cores) bound it, as they bound the plaintext path.
    """
    serial = sum(stages.get(s, 0.0) for s in ("store", "commit"))
    opening = stages.get("open", 0.0)
    heaviest = max(("store", "commit"), key=lambda s: stages.get(s, 0.0))
    if serial >= 0.5 * window:
        return (f"the enclave's durable store (segment write + fsync, one at a time; {heaviest} heaviest): "
                f"{serial / window:.0%} of the window")
    if opening >= 1.6 * window:
        return f"enclave opening (verify + decrypt, 2 threads): {opening / window:.0%} of one core"
    if sealed >= 0.8 * plain:
        return (f"broker delivery, as for plaintext (enclave serial stages {serial / window:.0%}, "
                f"opening {opening / window:.0%} of the window)")
    return (f"CPU shared with the broker (enclave serial stages {serial / window:.0%}, opening "
            f"{opening / window:.0%} of the window; heaviest: {heaviest})")


async def run_bench(base: Settings, quick: bool = False, sizes: tuple[int, ...] = (100_000, 1_000_000),
                    write_docs: bool = False) -> dict:
    counts = {100_000: 100 if quick else 400, 1_000_000: 20 if quick else 150}
    cases = [(d, counts.get(d, 20 if quick else 100)) for d in sizes]
    results = []
    for d, k in cases:
        results.append(await _one(base, d, k))
        print(results[-1], file=sys.stderr, flush=True)
    md = ("The enclave runs in its own process; the devices' publisher (updates built beforehand) and\n"
          "the plaintext consumer share the benchmark's process. Plaintext: the same number and size of\n"
          "bodies through a quorum queue to a consumer that only parses and sums the floats.\n"
          "Goals: >= 300 updates/s of 100k parameters; sealed >= 0.8x plaintext; FedAvg memory flat.\n"
          "Stages (ms per update, enclave busy time): open = verify + decrypt + decode (worker threads),\n"
          "store = segment write, commit = fsync + SQLite commit per batch (these two one at a time),\n"
          "ack = acks and events (beside them). Every stage's time is wall time on 2 shared cores.\n\n")
    md += md_table(["parameters", "updates", "sealed updates/s", "plaintext updates/s", "ratio",
                    "last update → model (ms)", "enclave peak RSS MiB", "FedAvg close traced peak MiB (n: MiB)",
                    "stages (ms/update)", "disk MB/s (write + fsync)", "bounded by"],
                   [[r["params"], r["updates"], r["sealed_updates_per_s"], r["plaintext_updates_per_s"], r["ratio"],
                     r["last_update_to_model_ms"], r["enclave_peak_rss_mib"],
                     ", ".join(f"{n}: {m}" for n, m in r["fedavg_peak_mib"].items()),
                     ", ".join(f"{st} {ms}" for st, ms in r["stage_ms_per_update"].items()),
                     r["disk_write_fsync_mb_s"], r["bound"]]
                    for r in results])
    if write_docs:
        write_section("round", "## Rounds through the enclave (`qflare bench round`)\n\n" + md)
    return {"cases": results}
