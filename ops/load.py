"""``qflare load --devices N``: a load generator through the real protocol.

Starts a coordinator and an enclave, each in a process of its own, and N simulated devices split
over P spawned processes (``--device-processes``), each multiplexing its devices over a few
broker connections of its own; each device enrols with its own token,
opens a forward-secret session, and trains and sends its signed, sealed update in one round.
Reports per step (enrol, session, update) the rate and the p50/p95/p99 latency, and per phase
the CPU of each process (devices, coordinator, enclave, broker), as JSON and as a PNG plot.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from broker.topology import delete_topology
from common.data import Partition
from common.report import md_table
from common.settings import Settings
from common.training import runner_for
from coordinator.registry import open_registry
from coordinator.service import Coordinator, load_identity
from edge_agent import client
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from enclave_worker.service import Enclave
from ops.demo import demo_operator, new_namespace, parse_pairs, round_events
from ops.operator_client import OperatorClient
from schemas.messages import KeyChain, KeysRequest, RoundStart, RoundStarted
from schemas.names import Names
from schemas.reasons import Reason

STEPS = ("enroll", "session", "update")


def _cpu_of(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used, from /proc; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pids() -> list[int]:
    """This host's RabbitMQ (``beam.smp``) processes: their CPU is shared with whoever else uses it."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1:text.rindex(")")] == "beam.smp":
            out.append(int(stat.parent.name))
    return out


class Clock:
    """Wall time and the CPU time of each process of the load (devices, coordinator, enclave,
    the local broker) at each mark: which process bounds which phase."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.marks: list[tuple[str, float, dict[str, float | None]]] = []
        self.mark("start")

    def _cpu(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, pids in self.pids.items():
            values = [_cpu_of(p) for p in pids]
            out[name] = sum(v for v in values if v is not None) if values and None not in values else None
        return out

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter(), self._cpu()))

    def phases(self) -> dict[str, dict[str, float | None]]:
        """Per phase (since the mark before): wall seconds and each process's CPU seconds."""
        out = {}
        for (_, w0, c0), (name, w1, c1) in zip(self.marks, self.marks[1:]):
            row: dict[str, float | None] = {"wall_s": round(w1 - w0, 2)}
            for proc in self.pids:
                a, b = c0.get(proc), c1.get(proc)
                row[f"{proc}_cpu_s"] = round(b - a, 2) if a is not None and b is not None else None
            out[name] = row
        return out


def _serve(kind: str, settings: Settings, ready, stop) -> None:
    """A child process: the load's coordinator or enclave, until ``stop`` is set."""
    async def main() -> None:
        service = Coordinator(settings) if kind == "coordinator" else Enclave(settings)
        await service.start()
        ready.set()
        try:
            await asyncio.to_thread(stop.wait)
        finally:
            await service.stop()

    asyncio.run(main())


class Service:
    """The coordinator or the enclave in a process of its own (spawned: no fork of a process
    that holds threads and broker connections), as deployed: the devices' process, the
    coordinator's and the enclave's each get a core when there is one."""

    def __init__(self, kind: str, settings: Settings) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.kind, self._ready, self._stop = kind, ctx.Event(), ctx.Event()
        self.process = ctx.Process(target=_serve, args=(kind, settings, self._ready, self._stop),
                                   name=f"qflare-load-{kind}", daemon=True)

    async def start(self, timeout: float = 180.0) -> None:
        self.process.start()
        limit = time.monotonic() + timeout
        while not self._ready.is_set():
            if not self.process.is_alive() or time.monotonic() > limit:
                raise RuntimeError(f"the load's {self.kind} did not start (exit code {self.process.exitcode})")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process.pid is None:
            return
        self._stop.set()
        await asyncio.to_thread(self.process.join, 60)
        if self.process.is_alive():
            self.process.terminate()
            await asyncio.to_thread(self.process.join, 10)


def default_device_processes() -> int:
    """The devices' processes by default: 2 when the machine has 2 cores (the devices' single
    process bound the round), else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _devices(settings: Settings, part: int, first: int, count: int, devices: int, fp: str, connections: int,
             concurrency: int, inbox, report) -> None:
    """A child process: devices ``first .. first+count-1``, each with its own token, session and
    update, over ``connections`` broker connections of its own. Tells ``report`` when each phase
    is done and, at the end, every device's raw step times (``perf_counter``: one clock per host)."""
    async def main() -> None:
        fl = settings.fl
        task = runner_for(fl.task)
        shards = [task.load_data(i, devices, Partition.of(fl)) for i in range(first, first + count)]
        brokers = [await BrokerClient.open(settings, name=f"qflare-load-{part}-{c}") for c in range(connections)]
        try:
            rpcs = [await b.rpc() for b in brokers]
            times: dict[str, list] = {"enroll": [], "session": [], "update": []}

            def note(step: str, value) -> None:
                times[step].append(value)
                if len(times[step]) % 100 == 0 or len(times[step]) == count:
                    report.put(("progress", part, step, len(times[step])))

            state = Path(settings.state_dir)
            # The devices share this host's disk: their outboxes skip the fsync per commit that each
            # real device makes on its own storage (three per update, serialised here).
            fleets = [Fleet(b, Outbox(state / f"outbox-{part}-{c}.sqlite3", power_safe=False), task=task,
                            on_sent=lambda _d, _r: note("update", time.perf_counter()))
                      for c, b in enumerate(brokers)]
            gate = asyncio.Semaphore(concurrency)
            report.put(("ready", part))
            handed = await asyncio.to_thread(inbox.get)  # the operator's, made by the parent
            if handed is None:
                return
            # each device checks the coordinator's keys of its token file against the pinned
            # fingerprint, as a real one does, and enrols in one round trip (bench handshake
            # measures this against a key chain fetched per device)
            tokens, keys_message = handed

            async def join(j: int) -> None:
                c = j % connections
                async with gate:
                    t0 = time.perf_counter()
                    dev = await client.enroll(rpcs[c], brokers[c].names, f"load-{first + j:05d}", tokens[j], fp,
                                              keys_message=keys_message, sig_alg=settings.crypto.signature,
                                              kem_alg=settings.crypto.kem)
                    t1 = time.perf_counter()
                    await client.open_session(rpcs[c], brokers[c].names, dev)
                    note("enroll", (t0, t1))
                    note("session", (t1, time.perf_counter()))
                fleets[c].add(Member(dev, *shards[j]))

            await asyncio.gather(*(join(j) for j in range(count)))
            report.put(("enroll_and_session", part))
            for f in fleets:
                await f.listen()
            report.put(("subscribe", part))
            await asyncio.to_thread(inbox.get)  # the round is over
            for f in fleets:
                await f.drain()
            report.put(("done", part, {
                **times, "unconfirmed": sum(len(f.outbox.pending()) for f in fleets),
                "publishes_unconfirmed": sum(f.unconfirmed for f in fleets),
                "resent": sum(f.resent for f in fleets)}))
        finally:
            for b in brokers:
                await b.close()

    asyncio.run(main())


class Devices:
    """The simulated devices split over P spawned processes (disjoint index ranges, connections
    and concurrency shared out): the parent waits for each phase in all of them and gathers
    their raw step times."""

    def __init__(self, settings: Settings, devices: int, processes: int, connections: int, concurrency: int,
                 fp: str, say: Callable[[str, int, int], None]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.devices, self.say, self.report = devices, say, ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(processes)]
        bounds = [devices * k // processes for k in range(processes + 1)]
        self.ranges = list(itertools.pairwise(bounds))
        self.processes = [ctx.Process(target=_devices, name=f"qflare-load-devices-{k}", daemon=True, args=(
            settings, k, a, b - a, devices, fp, len(range(k, connections, processes)),
            max(1, len(range(k, concurrency, processes))), self.inboxes[k], self.report))
            for k, (a, b) in enumerate(self.ranges)]
        self.reached: dict[str, int] = {}
        self.progress: dict[tuple[str, int], int] = {}
        self.results: list[dict] = []

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def start(self, timeout: float = 300.0) -> None:
        for p in self.processes:
            p.start()
        await self.wait("ready", timeout)

    def hand_tokens(self, tokens: list[str], keys_message: bytes) -> None:
        """Each process its devices' tokens and the coordinator's keys message their token
        files would carry (``TokenCreated.coordinator_keys``)."""
        for (a, b), inbox in zip(self.ranges, self.inboxes):
            inbox.put((tokens[a:b], keys_message))

    async def wait(self, phase: str, timeout: float) -> None:
        """Until every process has reported ``phase``; raises if one died or ``timeout`` passed."""
        limit = time.monotonic() + timeout
        while self.reached.get(phase, 0) < len(self.processes):
            try:
                msg = await asyncio.to_thread(self.report.get, True, 0.5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in self.processes) or time.monotonic() > limit:
                    raise RuntimeError(f"the load's devices did not reach {phase} "
                                       f"(exit codes {[p.exitcode for p in self.processes]})") from None
                continue
            if msg[0] == "progress":
                self.progress[msg[2], msg[1]] = msg[3]
                self.say(msg[2], sum(n for (s, _), n in self.progress.items() if s == msg[2]), self.devices)
                continue
            if msg[0] == "done":
                self.results.append(msg[2])
            self.reached[msg[0]] = self.reached.get(msg[0], 0) + 1

    async def finish(self, timeout: float) -> None:
        """The round is over: each process drains its outboxes and sends its times."""
        for inbox in self.inboxes:
            inbox.put(None)
        await self.wait("done", timeout)

    async def stop(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)  # a process still waiting for its tokens ends
            inbox.cancel_join_thread()
        for p in self.processes:
            if p.pid is not None:
                await asyncio.to_thread(p.join, 30)
                if p.is_alive():
                    p.terminate()
                    await asyncio.to_thread(p.join, 10)


@dataclass
class Step:
    """When each device finished a step and how long the step took it (seconds)."""

    latencies: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)  # since the load began

    def add(self, started: float, ended: float, origin: float) -> None:
        self.latencies.append(ended - started)
        self.finished.append(ended - origin)


def summarize(step: Step, began: float) -> dict:
    """Count, rate (per second of the step's own span, from ``began``) and latency percentiles."""
    if not step.latencies:
        return {"count": 0, "rate_per_s": 0.0, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    lat = np.asarray(step.latencies) * 1000
    span = max(max(step.finished) - began, 1e-9)
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"count": len(lat), "rate_per_s": round(len(lat) / span, 1), "p50_ms": round(float(p50), 1),
            "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1), "max_ms": round(float(lat.max()), 1)}


def machine() -> dict:
    """CPU count and load averages now: what the figures of a shared machine mean."""
    one, five, fifteen = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)]}


def markdown(report: dict, command: str) -> str:
    """docs/benchmarks.md's load section from a report."""
    m0, m1 = report["machine_before"], report["machine_after"]
    rows = [[name, st["count"], st["rate_per_s"], st["p50_ms"], st["p95_ms"], st["p99_ms"]]
            for name, st in report["steps"].items()]
    phase_rows = [[name, ph["wall_s"], *(ph.get(f"{p}_cpu_s") for p in ("devices", "coordinator", "enclave", "broker"))]
                  for name, ph in report["phases"].items()]
    met = report["devices_completed"] >= 10_000 and report["total_seconds"] <= 120
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(report["rejected"].items())) or "none"
    return (
        "## Load generator (`qflare load`)\n\n"
        f"`{command}`: the coordinator and the enclave each in a process of their own, "
        f"{report['devices']:,} devices in {report.get('device_processes', 1)} spawned processes over "
        f"{report['connections']} connections "
        f"({report['concurrency']} enrolments/sessions in flight, prefetch {report['prefetch']}), task `{report['task']}`, "
        f"`{report['compression']}` updates; each device enrols with its own token, opens a session (handshake "
        f"`{report['handshake']}`) "
        "and sends one signed, sealed update in a round that expects all of them.\n\n"
        f"Machine: {m0['cpus']} cores; load average {m0['loadavg'][0]} "
        f"(1 min) at the start, {m1['loadavg'][0]} at the end.\n\n"
        "Goal: 10,000 devices enrolled, in session and through one round in <= 120 s: "
        + ("**met**" if met else "**not met**") + f" ({report['devices_completed']:,} of "
        f"{report['devices']:,} through the round, {report['updates_sent']:,} updates confirmed by the "
        f"broker, {report.get('publishes_unconfirmed', 0):,} publishes not confirmed in time and "
        f"{report.get('updates_resent', 0):,} resends (same update id), {report.get('updates_unconfirmed', 0):,} "
        "never confirmed, round "
        f"{report['round_status']}, "
        f"`total_seconds` {report['total_seconds']}).\n\n"
        + md_table(["step", "devices", "per s", "p50 (ms)", "p95 (ms)", "p99 (ms)"], rows) + "\n\n"
        "Where the time and the CPU went (seconds; broker: every `beam.smp` of this host, shared with "
        "other users of the broker):\n\n"
        + md_table(["phase", "wall", "devices CPU", "coordinator CPU", "enclave CPU", "broker CPU"], phase_rows)
        + f"\n\nThe enclave accepted {report['accepted']:,}; refused: {rejected}. "
        "Per-device costs and the extrapolation: docs/scaling.md.\n")


def plot(steps: dict[str, Step], report: dict, path: Path) -> None:
    """Completions over time and the latency percentiles of each step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, step in steps.items():
        if step.finished:
            t = np.sort(step.finished)
            left.plot(t, np.arange(1, len(t) + 1), label=name)
    left.set(xlabel="seconds since start", ylabel="devices done", title=f"{report['devices']} devices")
    left.legend()
    names = [n for n in steps if report["steps"][n]["count"]]
    x = np.arange(len(names))
    for k, (pct, width) in enumerate((("p50_ms", -0.25), ("p95_ms", 0.0), ("p99_ms", 0.25))):
        right.bar(x + width, [report["steps"][n][pct] for n in names], 0.25, label=pct.removesuffix("_ms"))
    right.set_xticks(x, names)
    right.set(ylabel="latency (ms)", title="latency per step")
    right.legend()
    fig.suptitle(f"qflare load: {report['devices_completed']}/{report['devices']} through the round "
                 f"in {report['total_seconds']:.1f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run_load(settings: Settings, devices: int, *, connections: int = 4, concurrency: int = 64,
                   deadline: float | None = None, namespace: str | None = None,
                   progress: Callable[[str, int, int], None] | None = None,
                   plot_path: Path | None = None, compression: str = "int8", prefetch: int = 256,
                   publish_channels: int = 4, device_processes: int | None = None) -> dict:
    """Drive ``devices`` devices through enrolment, a session and one round; the report.

    ``compression`` (``fl.compression``): int8 by default, so a round of 10,000 updates is
    10,000 x 12,917 B through the broker rather than 10,000 x 27,342 B (digits, bench compression). ``prefetch``
    (``broker.prefetch``): deliveries the coordinator and the enclave hold unacked, so the
    enclave checks the next updates while a batch's commit and acks are under way.
    ``publish_channels`` (``broker.publish_channels``): confirming channels each connection's
    devices spread their updates over, each with ``broker.publish_window`` updates in flight.
    ``device_processes``: processes the devices are split over (default: 2 on 2 cores or more,
    else 1), the ``connections`` and the ``concurrency`` shared out between them.
    """
    root = Path(tempfile.mkdtemp(prefix="qflare-load-"))
    state = root / "state"
    ns = namespace or new_namespace().replace("demo-", "load-")
    deadline = deadline or max(settings.fl.deadline_seconds, 120.0)
    processes = max(1, min(device_processes or default_device_processes(), connections, devices))
    settings = settings.model_copy(update={
        "state_dir": state, "registry_path": None, "registry_url": None,
        "broker": settings.broker.model_copy(update={"namespace": ns, "prefetch": prefetch,
                                                     "publish_channels": publish_channels}),
        "coordinator": settings.coordinator.model_copy(update={"prefetch": prefetch}),
        "crypto": settings.crypto.model_copy(update={"allow_pure_backends": True}),
        "fl": settings.fl.model_copy(update={"compression": compression})})
    settings = demo_operator(settings, devices, 1, deadline)
    say = progress or (lambda *_: None)
    ids = [f"load-{i:05d}" for i in range(devices)]
    fl = settings.fl
    steps = {name: Step() for name in STEPS}
    coordinator, enclave = Service("coordinator", settings), Service("enclave", settings)
    fleet: Devices | None = None
    registry = None
    broker: BrokerClient | None = None
    before = machine()
    try:
        await coordinator.start()
        await enclave.start()  # after the coordinator: it attests to it
        registry = open_registry(settings)  # the coordinator's file: the operator's tokens go there
        broker = await BrokerClient.open(settings, name="qflare-load")
        events = await round_events(broker)
        fp = load_identity(settings).sig_fp  # what an operator hands each device: the pinned fingerprint
        # ... and the coordinator's self-signed keys, as `token create` puts them in each token file
        keys_message = (await (await broker.rpc()).call(broker.names.rpc_exchange, Names.COORDINATOR_KEY,
                                                        KeysRequest(), KeyChain, 15.0)).current
        fleet = Devices(settings, devices, processes, connections, concurrency, fp, say)
        await fleet.start()  # spawned, their shards loaded, their connections open
        origin = time.perf_counter()
        clock = Clock({"devices": fleet.pids(), "coordinator": [coordinator.process.pid],
                       "enclave": [enclave.process.pid], "broker": broker_pids()})
        # The operator's part: one token per device, in one commit (one fsync, not one per token).
        with registry.transaction():
            tokens = [registry.create_token(i, 3600) for i in ids]
        tokens_at = time.perf_counter()
        clock.mark("tokens")
        fleet.hand_tokens(tokens, keys_message)
        await fleet.wait("enroll_and_session", deadline + 600)
        enrolled_at = time.perf_counter()
        clock.mark("enroll_and_session")
        await fleet.wait("subscribe", 300)
        round_began = time.perf_counter()  # the update step counts from the round's start
        clock.mark("subscribe")
        async with OperatorClient(settings) as operator:
            started = await operator.call(
                RoundStart, RoundStarted, rounds=1, min_updates=max(fl.min_updates, math.ceil(devices / 2)),
                deadline_seconds=deadline, expected=ids, epochs=fl.epochs, lr=fl.lr, batch_size=fl.batch_size)
        while True:
            ev = await asyncio.wait_for(events.get(), deadline + 120)
            if ev.round_id == started.round_id and ev.type in ("round.completed", "round.failed"):
                break
        ended = time.perf_counter()
        clock.mark("round")
        await fleet.finish(300)
        for r in fleet.results:
            for t0, t1 in r["enroll"]:
                steps["enroll"].add(t0, t1, origin)
            for t0, t1 in r["session"]:
                steps["session"].add(t0, t1, origin)
            for t1 in r["update"]:  # confirmed by the broker (maybe after resends)
                steps["update"].add(round_began, t1, origin)
        completed = ev.type == "round.completed"
        accepted, rejected = int(ev.detail.get("accepted") or 0), parse_pairs(ev.detail.get("rejected"), int)
        # a resent update the broker had taken after all arrives twice: its copy is refused as a replay
        taken = accepted + sum(n for reason, n in rejected.items() if reason != Reason.REPLAY.value)
        report = {
            "namespace": ns, "task": fl.task, "compression": compression, "devices": devices,
            "handshake": settings.crypto.handshake, "connections": connections, "device_processes": processes, "prefetch": prefetch,
            "concurrency": concurrency,
            # through the round: sent, and taken into the round by the enclave before it closed
            # (accepted or refused by its screening); an update still queued at the deadline is not
            "devices_completed": min(devices, taken) if completed else 0,
            "updates_sent": len(steps["update"].latencies),  # confirmed by the broker
            # never confirmed (still in the devices' outboxes at the round's close)
            "updates_unconfirmed": sum(r["unconfirmed"] for r in fleet.results),
            # publishes not confirmed in time, and the resends they caused (same update id)
            "publishes_unconfirmed": sum(r["publishes_unconfirmed"] for r in fleet.results),
            "updates_resent": sum(r["resent"] for r in fleet.results),
            "publish_window": settings.broker.publish_window, "publish_channels": settings.broker.publish_channels,
            "round_status": ev.type.removeprefix("round."),
            "accepted": accepted,
            "rejected": rejected,
            "tokens_seconds": round(tokens_at - origin, 2),  # the operator's tokens, one commit
            "enroll_and_session_seconds": round(enrolled_at - origin, 2),
            "subscribe_seconds": round(round_began - enrolled_at, 2),  # models fanout, latest model, task warm-up
            "round_seconds": round(ended - round_began, 2),
            "total_seconds": round(ended - origin, 2),
            "phases": clock.phases(),
            "machine_before": before, "machine_after": machine(),
            "steps": {"enroll": summarize(steps["enroll"], 0.0), "session": summarize(steps["session"], 0.0),
                      "update": summarize(steps["update"], round_began - origin)},
        }
        if plot_path is not None:
            plot(steps, report, plot_path)
            report["plot"] = str(plot_path)
        return report
    finally:
        if fleet is not None:
            await fleet.stop()
        await enclave.stop()
        await coordinator.stop()
        if registry is not None:
            registry.close()
        if broker is not None:
            ch = await broker.connection.channel()
            await delete_topology(ch, broker.names)
            await broker.close()
        shutil.rmtree(root, ignore_errors=True)
