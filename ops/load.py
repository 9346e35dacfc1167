"""``qflare load --devices N``: a load generator through the real protocol.

Starts a coordinator and an enclave in this process (as ``qflare demo`` does) and N simulated
devices multiplexed over a few broker connections; each device enrols with its own token,
opens a forward-secret session, and trains and sends its signed, sealed update in one round.
Reports per step (enrol, session, update) the rate and the p50/p95/p99 latency, as JSON and
as a PNG plot.
"""

from __future__ import annotations

import asyncio
import math
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
from common.settings import Settings
from common.training import runner_for
from coordinator.service import Coordinator
from edge_agent import client
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from enclave_worker.service import Enclave
from ops.demo import demo_operator, new_namespace, parse_pairs, round_events
from ops.operator_client import OperatorClient
from schemas.messages import RoundStart, RoundStarted

STEPS = ("enroll", "session", "update")


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
                   plot_path: Path | None = None) -> dict:
    """Drive ``devices`` devices through enrolment, a session and one round; the report."""
    root = Path(tempfile.mkdtemp(prefix="qflare-load-"))
    state = root / "state"
    ns = namespace or new_namespace().replace("demo-", "load-")
    deadline = deadline or max(settings.fl.deadline_seconds, 120.0)
    settings = settings.model_copy(update={
        "state_dir": state, "registry_path": None, "registry_url": None,
        "broker": settings.broker.model_copy(update={"namespace": ns}),
        "crypto": settings.crypto.model_copy(update={"allow_pure_backends": True})})
    settings = demo_operator(settings, devices, 1, deadline)
    say = progress or (lambda *_: None)
    ids = [f"load-{i:05d}" for i in range(devices)]
    fl = settings.fl
    task = runner_for(fl.task)
    shards = [task.load_data(i, devices, Partition.of(fl)) for i in range(devices)]
    steps = {name: Step() for name in STEPS}
    coordinator, enclave = Coordinator(settings), Enclave(settings)
    brokers: list[BrokerClient] = []
    origin = time.perf_counter()
    try:
        await coordinator.start()
        await enclave.start()
        brokers = [await BrokerClient.open(settings, name=f"qflare-load-{k}") for k in range(connections)]
        rpcs = [await b.rpc() for b in brokers]
        round_began = 0.0

        def sent(_device_id: str, _round_id: int) -> None:
            steps["update"].add(round_began, time.perf_counter(), origin)
            say("update", len(steps["update"].latencies), devices)

        fleets = [Fleet(b, Outbox(state / f"outbox-{k}.sqlite3"), task=task, on_sent=sent)
                  for k, b in enumerate(brokers)]
        events = await round_events(brokers[0])
        fp = coordinator.identity.sig_fp
        gate = asyncio.Semaphore(concurrency)
        origin = time.perf_counter()

        async def join(i: int) -> None:
            k = i % connections
            async with gate:
                token = coordinator.registry.create_token(ids[i], 3600)
                t0 = time.perf_counter()
                dev = await client.enroll(rpcs[k], brokers[k].names, ids[i], token, fp,
                                          sig_alg=settings.crypto.signature, kem_alg=settings.crypto.kem)
                t1 = time.perf_counter()
                steps["enroll"].add(t0, t1, origin)
                await client.open_session(rpcs[k], brokers[k].names, dev)
                steps["session"].add(t1, time.perf_counter(), origin)
            x, y = shards[i]
            fleets[k].add(Member(dev, x, y))
            say("enroll", len(steps["session"].latencies), devices)

        await asyncio.gather(*(join(i) for i in range(devices)))
        enrolled_at = time.perf_counter()
        for f in fleets:
            await f.listen()
        round_began = time.perf_counter()  # the update step counts from the round's start
        async with OperatorClient(settings) as operator:
            started = await operator.call(
                RoundStart, RoundStarted, rounds=1, min_updates=max(fl.min_updates, math.ceil(devices / 2)),
                deadline_seconds=deadline, expected=ids, epochs=fl.epochs, lr=fl.lr, batch_size=fl.batch_size)
        while True:
            ev = await asyncio.wait_for(events.get(), deadline + 120)
            if ev.round_id == started.round_id and ev.type in ("round.completed", "round.failed"):
                break
        ended = time.perf_counter()
        for f in fleets:
            await f.drain()
        completed = ev.type == "round.completed"
        report = {
            "namespace": ns, "task": fl.task, "devices": devices, "connections": connections,
            "concurrency": concurrency,
            "devices_completed": len(steps["update"].latencies) if completed else 0,
            "round_status": ev.type.removeprefix("round."),
            "accepted": int(ev.detail.get("accepted") or 0),
            "rejected": parse_pairs(ev.detail.get("rejected"), int),
            "enroll_and_session_seconds": round(enrolled_at - origin, 2),
            "subscribe_seconds": round(round_began - enrolled_at, 2),  # models fanout, latest model, task warm-up
            "round_seconds": round(ended - round_began, 2),
            "total_seconds": round(ended - origin, 2),
            "steps": {"enroll": summarize(steps["enroll"], 0.0), "session": summarize(steps["session"], 0.0),
                      "update": summarize(steps["update"], round_began - origin)},
        }
        if plot_path is not None:
            plot(steps, report, plot_path)
            report["plot"] = str(plot_path)
        return report
    finally:
        await enclave.stop()
        await coordinator.stop()
        if brokers:
            ch = await brokers[0].connection.channel()
            await delete_topology(ch, brokers[0].names)
        for b in brokers:
            await b.close()
        shutil.rmtree(root, ignore_errors=True)
