"""Enclave throughput for a round (``qflare bench round``).

For 100k- and 1M-parameter updates: updates/s from the first publish to the last
acceptance, last-update-to-global-model latency, the same bodies' size through a plaintext
consumer over the same broker (the ratio is the cost of verifying and opening), the
enclave process's peak RSS, and the traced peak memory of closing a FedAvg round for n and
2n updates (flat means it does not grow). The enclave runs in its own process, as deployed;
the devices' publisher and the plaintext consumer share this one.

Plaintext passes and sealed rounds alternate (plaintext, sealed, plaintext, ...), each sealed
round is compared with the mean of the plaintext passes either side of it, and the median of
those ratios is reported: the host's and the broker disk's drift is large here (single runs
minutes apart on an idle host gave 0.47 to 0.88), and one plaintext run minutes away from
the sealed one measured the neighbours as much as QFLARE. Five sealed rounds by default:
one pair's ratio moved by 0.07 (standard deviation of 30 pairs on an idle host, 1M
parameters), so a median of three still moved by about 0.04. Per stage it reports
the devices' sealing and signing (done before the window), the publish, the CPU the rest
of the host (the broker, and any other load) used per update, and the enclave's stages
(common/stages.py), and names the one that bounds the sealed path (:func:`_bound`).
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
from common.stages import Stages
from coordinator.service import META_ENCLAVE_REPORT, Coordinator
from edge_agent import client, updates
from enclave_worker.service import Enclave, close_round_streaming
from enclave_worker.store import WRITERS, EnclaveStore
from schemas.codec import CodecError, encode
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
        stages.update(enclave.stages.snapshot())

    asyncio.run(main())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((usage.ru_maxrss / 1024, stages, usage.ru_utime + usage.ru_stime))


async def _teardown(stop, children: list, broker: BrokerClient | None, coord: Coordinator, root: Path,
                    join_seconds: float = 30) -> None:
    """The end of an enclave benchmark: its enclave processes and the coordinator stopped (the
    enclaves killed if they hang), then the namespace's topology deleted and the state directory
    removed. In that order: a coordinator still running redeclared its two queues as they were
    deleted, and every run left them on the broker."""
    stop.set()
    for child in children:
        child.join(join_seconds)
        if child.is_alive():
            child.kill()
    await coord.stop()
    if broker is not None:
        ch = await broker.connection.channel()
        await delete_topology(ch, broker.names)
        await broker.close()
    shutil.rmtree(root, ignore_errors=True)


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` so far, or None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _host_busy() -> float | None:
    """CPU seconds the whole host was busy so far (all cores), or None without /proc."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _CpuWindow:
    """Cores used over a window by the enclave, this process (devices' publisher or the
    plaintext consumer) and the rest of the host (the broker, and whatever else runs)."""

    def __init__(self, enclave_pid: int | None) -> None:
        self.pid = enclave_pid
        self.t0, self.start = time.perf_counter(), self._read()

    def _read(self) -> tuple[float | None, ...]:
        return (_proc_cpu(self.pid) if self.pid else None, _proc_cpu(os.getpid()), _host_busy())

    def cores(self) -> dict[str, float]:
        end, seconds = self._read(), time.perf_counter() - self.t0
        self.seconds = seconds
        used = [None if a is None or b is None else (b - a) / seconds
                for a, b in zip(self.start, end, strict=True)]
        if used[1] is None or used[2] is None:
            return {}
        out = {"this_process": round(used[1], 2), "host": round(used[2], 2)}
        if used[0] is not None:
            out["enclave"] = round(used[0], 2)
        out["rest_of_host"] = round(max(0.0, used[2] - used[1] - (used[0] or 0.0)), 2)
        return out


def _cpu_ms(cores: dict[str, float], seconds: float, k: int) -> dict[str, float]:
    """CPU milliseconds per update by each part, from its cores over a window of ``seconds``."""
    return {n: round(c * seconds / k * 1e3, 2) for n, c in cores.items()}


#: Publishes each path keeps in flight, each awaiting its confirm (the devices' publisher).
IN_FLIGHT = 16
#: Sealed rounds per case by default (``--passes``; the module docstring says why five).
PASSES = 5


async def _publish_all(broker: BrokerClient, messages: list[tuple[str, str, bytes]]) -> None:
    """Publish ``(exchange, routing key, body)`` messages, :data:`IN_FLIGHT` at a time, confirmed."""
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def pub(exchange: str, key: str, body: bytes) -> None:
        async with sem:
            await broker.publisher.publish(exchange, key, body)

    await asyncio.gather(*(pub(*m) for m in messages))


async def _plaintext(broker: BrokerClient,
                     bodies: list[bytes]) -> tuple[float, dict[str, float], dict[str, float], float]:
    """Updates/s of the same sizes through a consumer that only parses floats and sums them,
    the cores used meanwhile, the CPU ms per update and the window's seconds."""
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
    cpu = _CpuWindow(None)
    t0 = time.perf_counter()
    await _publish_all(broker, [("", qname, body) for body in bodies])
    await done.wait()
    rate = len(bodies) / (time.perf_counter() - t0)
    cores = cpu.cores()
    await q.delete(if_unused=False, if_empty=False)
    await ch.close()
    return rate, cores, _cpu_ms(cores, cpu.seconds, len(bodies)), cpu.seconds


async def _record_events(b: BrokerClient, keys: tuple[str, ...]) -> list[tuple[float, Event]]:
    """A list that fills with (arrival time, event) for the events under ``keys``."""
    events: list[tuple[float, Event]] = []
    q = await b.channel.declare_queue(exclusive=True, auto_delete=True)
    for key in keys:
        await q.bind(b.names.events_exchange, key)

    async def on(message) -> None:
        try:
            events.append((time.perf_counter(), decode_event(message.body, message.content_type)))
        except CodecError:
            pass

    await q.consume(on, no_ack=True)
    return events


async def _join_devices(coord: Coordinator, rpc, b: BrokerClient, settings: Settings, k: int) -> list[client.Device]:
    """``k`` devices enrolled with their own tokens and in session, 32 at a time."""
    sem = asyncio.Semaphore(32)
    keys_message = encode(coord.keys_message)  # as each token file carries it

    async def join(i: int) -> client.Device:
        async with sem:
            token = coord.registry.create_token(f"bench{i}", 600)
            dev = await client.enroll(rpc, b.names, f"bench{i}", token, coord.identity.sig_fp,
                                      keys_message=keys_message,
                                      sig_alg=settings.crypto.signature, kem_alg=settings.crypto.kem)
            await client.open_session(rpc, b.names, dev)
            return dev

    return list(await asyncio.gather(*(join(i) for i in range(k))))


async def _sealed_pass(b: BrokerClient, coord: Coordinator, events: list[tuple[float, Event]], built: list,
                       round_id: int, expected: list[str], enclave_pid: int) -> dict:
    """One round of the prepared updates of ``expected``: opened, published 16 at a time, until closed."""
    k = len(expected)
    spec = RoundSpec(round_id=round_id, deadline=time.time() + 600, min_updates=k, expected=expected,
                     epochs=1, lr=0.1, batch_size=16)
    await b.publisher.publish(b.names.control_exchange, "enclave", coord._sign(RoundOpen(spec=spec,
                                                                                         issued_at=time.time())))

    def mine(kind: tuple[str, ...]) -> list[tuple[float, Event]]:
        return [(t, e) for t, e in events if e.round_id == round_id and e.type in kind]

    while not mine(("round.opened",)):
        await asyncio.sleep(0.01)
    cpu = _CpuWindow(enclave_pid)
    t0 = time.perf_counter()
    await _publish_all(b, [(b.names.updates_exchange, key, body) for _, key, body in built])
    published = time.perf_counter() - t0
    ends = ("round.completed", "round.failed")
    while len(mine(("update.accepted",))) < k and not mine(ends):
        await asyncio.sleep(0.01)
    cores = cpu.cores()  # to the last acceptance: the round's close is not intake
    seconds = cpu.seconds
    while not mine(ends):
        await asyncio.sleep(0.01)
    accepted = [t for t, _ in mine(("update.accepted",))]
    done_at, done = mine(ends)[0]
    return {"rate": len(accepted) / (max(accepted) - t0), "accepted": len(accepted), "window": max(accepted) - t0,
            "published": published, "latency": done_at - max(accepted), "cores": cores, "seconds": seconds,
            "status": done.type, "version": done.detail.get("version"), "first_accept": min(accepted) - t0}


def _mean_cores(windows: list[tuple[dict[str, float], float]]) -> tuple[dict[str, float], float]:
    """Cores over several windows, weighted by their length, and their total seconds."""
    total = sum(sec for _, sec in windows)
    names = set.intersection(*(set(c) for c, _ in windows)) if windows else set()
    return {n: round(sum(c[n] * sec for c, sec in windows) / total, 2) for n in sorted(names)}, total


async def _one(base: Settings, d: int, k: int, passes: int) -> dict:
    """``passes`` sealed rounds of ``k`` updates, each between two plaintext passes of the same
    bodies (plaintext, sealed, plaintext, ..., plaintext): each sealed pass is compared with the
    mean of the plaintext passes either side of it, and the median of those ratios is reported,
    so one burst of the host's (or the broker's disk's) drift decides no figure."""
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
        events = await _record_events(b, ("update.#", "round.*"))
        while coord.registry.get_meta(META_ENCLAVE_REPORT) is None:  # the child attested
            await asyncio.sleep(0.05)
        devices = await _join_devices(coord, rpc, b, settings, k)
        direction = rng.normal(size=d).astype(np.float32)
        deltas = [direction + 0.2 * rng.normal(size=d).astype(np.float32) for _ in devices]
        plain_bodies = [np.ascontiguousarray(rng.normal(size=d), dtype="<f4").tobytes() for _ in range(k)]
        device_stages = Stages()
        plain = [await _plaintext(b, plain_bodies)]
        sealed: list[dict] = []
        version = 0
        for r in range(1, passes + 1):
            built = [updates.build(dev, r, version, f"bench-{d}", delta, 100, stages=device_stages)
                     for dev, delta in zip(devices, deltas, strict=True)]
            sealed.append(await _sealed_pass(b, coord, events, built, r, [x.device_id for x in devices], child.pid))
            del built
            if sealed[-1]["status"] != "round.completed":
                break
            version = int(sealed[-1]["version"])
            plain.append(await _plaintext(b, plain_bodies))
        del plain_bodies, deltas
        stop.set()
        enclave_rss, stages, enclave_cpu = await asyncio.to_thread(out.get, True, 60)
        peaks = _fedavg_close_peaks(state / "fedavg", d, k, settings, rng)
        disk = _disk_mb_s(state / "probe")
        ratios = [s["rate"] / ((plain[i][0] + plain[i + 1][0]) / 2) for i, s in enumerate(sealed) if i + 1 < len(plain)]
        # the median pass (the lower of the two middle ones for an even count: never flattering)
        mid = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2] if ratios else 0
        m = sealed[mid]
        n_sealed = sum(s["accepted"] for s in sealed)
        sealed_cores, sealed_seconds = _mean_cores([(s["cores"], s["seconds"]) for s in sealed])
        plain_cores, plain_seconds = _mean_cores([(c, sec) for _, c, _, sec in plain])
        sealed_ms = _cpu_ms(sealed_cores, sealed_seconds, n_sealed)
        plain_ms = _cpu_ms(plain_cores, plain_seconds, k * len(plain))
        window = sum(s["window"] for s in sealed)
        per_update = {st: round(sec / n_sealed * 1e3, 2) for st, sec in sorted(stages.items())}
        device = {st: round(sec / n_sealed * 1e3, 2) for st, sec in sorted(device_stages.snapshot().items())}
        return {"enclave_peak_rss_mib": round(enclave_rss, 1), "params": d, "updates": k, "passes": len(sealed),
                "accepted": m["accepted"],
                "sealed_updates_per_s": round(m["rate"], 1),
                "plaintext_updates_per_s": round((plain[mid][0] + plain[mid + 1][0]) / 2, 1) if ratios else None,
                "ratio": round(ratios[mid], 3) if ratios else None,
                "ratios": [round(x, 3) for x in ratios],
                "sealed_per_pass": [round(s["rate"], 1) for s in sealed],
                "plaintext_per_pass": [round(p[0], 1) for p in plain],
                "plaintext_before_after": [round(plain[mid][0], 1), round(plain[mid + 1][0], 1)] if ratios else [],
                "device_ms_per_update": device,
                "publish_ms_per_update": round(sum(s["published"] for s in sealed) / n_sealed * 1e3, 2),
                "window_ms_per_update": round(window / n_sealed * 1e3, 2),
                "cores_sealed": sealed_cores, "cores_plaintext": plain_cores,
                "cpu_ms_per_update_sealed": sealed_ms, "cpu_ms_per_update_plaintext": plain_ms,
                "cpu_bound_ratio": cpu_bound_ratio(sealed_ms, plain_ms),
                "last_update_to_model_ms": round(m["latency"] * 1e3, 1),
                "fedavg_peak_mib": {str(k // 2): round(peaks[0], 1), str(k): round(peaks[1], 1)},
                "status": m["status"], "publish_s": round(m["published"], 3),
                "first_accept_s": round(m["first_accept"], 3), "last_accept_s": round(m["window"], 3),
                "stage_ms_per_update": per_update, "enclave_cpu_share": round(enclave_cpu / window, 2),
                "bound": _bound({st: sec / len(sealed) for st, sec in stages.items()}, window / len(sealed),
                                sum(s["published"] for s in sealed) / len(sealed), sealed_cores, sealed_ms, plain_ms),
                "disk_write_fsync_mb_s": round(disk, 1)}
    finally:
        await _teardown(stop, [child], devices_broker, coord, root)


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
        fh.writelines(block for _ in range(mib))
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return mib * 2**20 / 1e6 / seconds


def cpu_bound_ratio(sealed_ms: dict[str, float] | None, plain_ms: dict[str, float] | None) -> float | None:
    """The sealed/plaintext ratio the host's CPU alone allows: plaintext host CPU per update over
    sealed. Where the cores are the shared bound (the broker, the publisher and the consumer or
    enclave on one host), the measured ratio sits near it, and only less CPU per sealed update
    raises it; a measured ratio well below it points to a wait (disk, broker) instead."""
    if not sealed_ms or not plain_ms or not sealed_ms.get("host") or "host" not in plain_ms:
        return None
    return round(plain_ms["host"] / sealed_ms["host"], 3)


def _bound(stages: dict[str, float], window: float, published: float, cores: dict[str, float],
           sealed_ms: dict[str, float] | None = None, plain_ms: dict[str, float] | None = None) -> str:
    """Which stage bounds the sealed path, from the enclave's busy time per stage and the cores.

    ``index`` and ``commit`` run one at a time (under the enclave's lock): if their sum nears
    the window, that serial part is the bound; ``store`` (the segment writes) runs on the
    store's writer threads beside them, and bounds the path if it keeps them all busy.
    Else, if the host's cores are (nearly) all busy, CPU is, and the figure says who used it.
    Else, if publishing took the whole window, the broker's intake is (the enclave kept up
    with what arrived). The heaviest enclave stage is named in every case, and, given the
    CPU ms per update of both paths, what the sealed one costs the host beyond the plaintext.
    """
    serial = sum(stages.get(s, 0.0) for s in ("index", "commit"))
    busy = {s: v for s, v in stages.items() if s != "ack"}
    heaviest = max(busy, key=busy.get) if busy else "-"
    share = f"heaviest enclave stage: {heaviest} {busy.get(heaviest, 0.0) / window:.0%} of the window"
    ncpu = os.cpu_count() or 1
    if sealed_ms and plain_ms and "host" in sealed_ms and "host" in plain_ms:
        share += (f"; host CPU per update {sealed_ms['host']} ms sealed (enclave {sealed_ms.get('enclave', '?')}, "
                  f"devices' publisher {sealed_ms['this_process']}, broker and other load "
                  f"{sealed_ms['rest_of_host']}) vs {plain_ms['host']} ms plaintext (publisher and consumer "
                  f"{plain_ms['this_process']}, broker and other load {plain_ms['rest_of_host']}); "
                  f"the host's CPU alone allows a ratio of {cpu_bound_ratio(sealed_ms, plain_ms)}")
    if serial >= 0.5 * window:
        return (f"the enclave's durable store (index + fsync and commit, one at a time): {serial / window:.0%} "
                f"of the window")
    if stages.get("store", 0.0) >= 0.8 * WRITERS * window:
        return (f"the enclave's segment writes ({WRITERS} threads, to disk): "
                f"{stages['store'] / (WRITERS * window):.0%} of their time")
    if cores and cores["host"] >= 0.9 * ncpu:
        return (f"CPU: the host's {ncpu} cores {cores['host'] / ncpu:.0%} busy (broker and other load "
                f"{cores['rest_of_host']}, enclave {cores.get('enclave', '?')}, devices' publisher "
                f"{cores['this_process']} cores); {share}")
    if published >= 0.9 * window:
        return f"the broker's intake: publishing took {published / window:.0%} of the window; {share}"
    host = f", the host's cores {cores['host'] / ncpu:.0%} busy" if cores else ""
    return (f"no one stage (publishing took {published / window:.0%} of the window{host}, the enclave "
            f"{cores.get('enclave', '?')} cores); {share}")


async def run_bench(base: Settings, quick: bool = False, sizes: tuple[int, ...] = (100_000, 1_000_000),
                    write_docs: bool = False, passes: int | None = None) -> dict:
    counts = {100_000: 100 if quick else 400, 1_000_000: 20 if quick else 150}
    cases = [(d, counts.get(d, 20 if quick else 100)) for d in sizes]
    passes = passes or (1 if quick else PASSES)
    results = []
    for d, k in cases:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # the neighbours' load, stated
        results.append({**await _one(base, d, k, passes), "load_average_1m": None if load is None else round(load, 2)})
        print(results[-1], file=sys.stderr, flush=True)
    md = ("The enclave runs in its own process; the devices' publisher (updates built beforehand) and\n"
          "the plaintext consumer share the benchmark's process. Plaintext: the same number and size of\n"
          "bodies through a quorum queue to a consumer that only parses and sums the floats. The passes\n"
          f"alternate, plaintext, sealed round, plaintext, ... ({passes} sealed rounds): each sealed round is\n"
          "compared with the mean of the plaintext passes either side of it (before/after), and the row\n"
          "shows the round with the median ratio; every pass's rate is listed under the table (single\n"
          "runs minutes apart on this idle host varied from 0.47 to 0.88).\n"
          "Goals: >= 300 updates/s of 100k parameters; sealed >= 0.8x plaintext; FedAvg memory flat.\n"
          "On a loaded host both paths share the cores with the other load, which squeezes the\n"
          "plaintext path (more of its cost is the broker's) more than the sealed one: read the\n"
          "ratio with the load average (1 minute, at the start of each case). CPU-bound ratio: plaintext\n"
          "host CPU per update over sealed, what the cores alone allow; a measured ratio near it means\n"
          "only less CPU per sealed update (the enclave's, or the broker's) would raise it.\n\n")
    md += md_table(["parameters", "updates", "load average", "sealed updates/s", "plaintext updates/s (before/after)",
                    "ratio", "CPU-bound ratio",
                    "last update → model (ms)", "enclave peak RSS MiB", "FedAvg close traced peak MiB (n: MiB)",
                    "disk MB/s (write + fsync)", "bounded by"],
                   [[r["params"], r["updates"], r["load_average_1m"], r["sealed_updates_per_s"],
                     f"{r['plaintext_updates_per_s']} ({'/'.join(map(str, r['plaintext_before_after']))})", r["ratio"],
                     r["cpu_bound_ratio"],
                     r["last_update_to_model_ms"], r["enclave_peak_rss_mib"],
                     ", ".join(f"{n}: {m}" for n, m in r["fedavg_peak_mib"].items()),
                     r["disk_write_fsync_mb_s"], r["bound"]]
                    for r in results])
    md += "\n\nPer pass, updates/s: " + "; ".join(
        f"{r['params']:,} parameters: sealed {', '.join(map(str, r['sealed_per_pass']))}, plaintext "
        f"{', '.join(map(str, r['plaintext_per_pass']))} (ratios {', '.join(map(str, r['ratios']))})" for r in results) + "."
    md += ("\n\nWhere the time goes, ms per update. Devices (before the window, one process): seal = KEM +\n"
           "AES-GCM, sign = ML-DSA. Window: the sealed window per update (first publish to last\n"
           f"acceptance); publish = the publisher's wall time per update, {IN_FLIGHT} in flight, until confirmed.\n"
           "Every figure is per update over all the sealed rounds. Enclave busy time per stage: verify =\n"
           "grant and device signature, decrypt = KEM + AES-GCM,\n"
           "decode = payload to delta, finiteness and norm (these in worker threads, concurrently);\n"
           "reassembly = chunks into their update's buffer (chunked updates only); index = the row and\n"
           "the write's place, commit = waiting for the batch's writes, fsync + SQLite commit (these two\n"
           "one at a time, under the enclave's lock); store = the segment write (O_DIRECT for large\n"
           "deltas) on the store's writer threads (2), and ack = acks and events, both beside them.\n"
           "Cores: CPU used over the window by the enclave, the benchmark's process, and the rest of\n"
           "the host (the broker and any other load); the sealed window ends at the last acceptance, so\n"
           "the round's close is not counted. CPU ms per update: the same, as CPU time per update.\n\n")
    md += md_table(["parameters", "devices: seal, sign", "window", "publish", "enclave stages",
                    "cores, sealed window", "cores, plaintext window", "CPU ms per update, sealed",
                    "CPU ms per update, plaintext"],
                   [[r["params"], ", ".join(f"{st} {ms}" for st, ms in r["device_ms_per_update"].items()),
                     r["window_ms_per_update"], r["publish_ms_per_update"],
                     ", ".join(f"{st} {ms}" for st, ms in r["stage_ms_per_update"].items()),
                     ", ".join(f"{n} {c}" for n, c in r["cores_sealed"].items()),
                     ", ".join(f"{n} {c}" for n, c in r["cores_plaintext"].items()),
                     ", ".join(f"{n} {c}" for n, c in r["cpu_ms_per_update_sealed"].items()),
                     ", ".join(f"{n} {c}" for n, c in r["cpu_ms_per_update_plaintext"].items())]
                    for r in results])
    if write_docs:
        write_section("round", "## Rounds through the enclave (`qflare bench round`)\n\n" + md)
    return {"cases": results}
