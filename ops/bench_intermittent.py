"""Synchronous rounds against async (FedBuff) on a fleet where devices come and go
(``qflare bench intermittent``).

Both modes run the whole product in one process (coordinator, enclave, devices; real broker,
crypto and training), on the same devices, data, seed and availability trace
(edge_agent/availability.py): each device has its own broker connection, closed while the
trace has it offline. Sync: rounds of ``deadline`` seconds that expect every device (so with
devices away each round runs to its deadline); async: one window of the same length in total,
a new model every ``buffer_size`` accepted updates. Reported per mode: the enclave's test
accuracy of every model against wall time from the plan's start, the time to the target
accuracy, updates sent, wasted (sent but in no model: stale, late, filtered, never delivered),
bytes sent, and a PNG of accuracy against time.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from broker.topology import delete_topology
from common.data import Partition
from common.events import decode_event
from common.report import DOC, md_table, write_section
from common.rootdata import digits_root
from common.settings import Settings
from common.task import DEFAULT_TASK
from common.training import runner_for
from coordinator.rootdata import send_root_data
from coordinator.service import Coordinator
from edge_agent import availability, client
from edge_agent.fleet import Member
from enclave_worker.service import Enclave
from ops.demo import demo_operator, new_namespace
from ops.operator_client import OperatorClient
from schemas.codec import CodecError, encode
from schemas.messages import RoundStart, RoundStarted

MODES = ("sync", "async")
#: Goal of issue 10: async reaches the target at least this many times sooner, and its final
#: accuracy is at most this many points below sync's.
GOAL_SPEEDUP = 2.0
GOAL_ACCURACY_POINTS = 1.0


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time the accuracy curve reaches ``target`` (None: never)."""
    return next((t for t, a in curve if a >= target), None)


def paces(devices: int, train_seconds: float, seed: int) -> list[float]:
    """Each simulated device's training time: uniform in [0.5, 1.5] x ``train_seconds`` (edge
    hardware slower than this machine's core, and unequal)."""
    rng = np.random.default_rng(seed + 1)
    return [float(x) for x in rng.uniform(0.5, 1.5, devices) * train_seconds]


async def run_mode(base: Settings, mode: str, trace: availability.Trace, *, deadline: float, buffer_size: int,
                   max_staleness: int, min_updates: int, seed: int, pace: list[float]) -> dict:
    """One run of ``mode`` over ``trace``, in a fresh namespace and state directory."""
    devices = trace.devices
    root = Path(tempfile.mkdtemp(prefix=f"qflare-intermittent-{mode}-"))
    state = root / "state"
    ns = new_namespace()
    budget = trace.horizon
    sync_rounds = max(1, math.floor(budget / deadline))
    # the same time in total: sync rounds of ``deadline``, or one async window as long as all of them
    rounds, window = (sync_rounds, deadline) if mode == "sync" else (1, sync_rounds * deadline)
    s = base.model_copy(update={
        "state_dir": state, "registry_path": None, "registry_url": None,
        "broker": base.broker.model_copy(update={"namespace": ns}),
        "crypto": base.crypto.model_copy(update={"allow_pure_backends": True}),
        "fl": base.fl.model_copy(update={"mode": mode, "buffer_size": buffer_size, "max_staleness": max_staleness,
                                         "seed": seed, "evaluate": True, "min_updates": min_updates})})
    s = demo_operator(s, devices, rounds, max(window, deadline))
    fl = s.fl
    task = runner_for(fl.task)
    shards = [task.load_data(i, devices, Partition.of(fl)) for i in range(devices)]
    ids = [f"device-{i:04d}" for i in range(devices)]
    coordinator, enclave = Coordinator(s), Enclave(s)
    broker: BrokerClient | None = None
    sim: availability.IntermittentFleet | None = None
    try:
        await coordinator.start()
        await enclave.start()
        broker = await BrokerClient.open(s, name="qflare-bench")
        curve: list[tuple[float, float]] = [(0.0, float(enclave._evaluate(enclave.params).get("accuracy", 0.0)))]
        rejected: dict[str, int] = {}
        aggregated = 0
        ended: list[str] = []
        t0 = 0.0
        q = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ("round.*", "model.published", "update.rejected.#"):
            await q.bind(broker.names.events_exchange, key)

        async def on_event(message) -> None:
            nonlocal aggregated
            try:
                ev = decode_event(message.body, message.content_type)
            except CodecError:
                return
            if ev.type.startswith("update.rejected."):
                rejected[ev.reason or "?"] = rejected.get(ev.reason or "?", 0) + 1
            elif ev.type == "model.published" or (ev.type == "round.completed" and mode == "sync"):
                aggregated += int(ev.detail.get("accepted") or 0)
                if ev.detail.get("accuracy") is not None:
                    curve.append((time.monotonic() - t0, float(ev.detail["accuracy"])))
            if ev.type in ("round.completed", "round.failed", "round.cancelled"):
                ended.append(ev.type)

        await q.consume(on_event, no_ack=True)
        if fl.defend and fl.task == DEFAULT_TASK:  # the demo's root data, the defence's clean reference
            await send_root_data(s, *digits_root(), broker=broker, registry=coordinator.registry,
                                 identity=coordinator.identity)
            end = time.monotonic() + 30
            while enclave.root is None and time.monotonic() < end:
                await asyncio.sleep(0.02)
        rpc = await broker.rpc()
        members = []
        for i, device_id in enumerate(ids):
            token = coordinator.registry.create_token(device_id, 3600)
            dev = await client.enroll(rpc, broker.names, device_id, token, coordinator.identity.sig_fp,
                                      keys_message=encode(coordinator.keys_message),  # as its token file carries it
                                      sig_alg=s.crypto.signature, kem_alg=s.crypto.kem)
            await client.open_session(rpc, broker.names, dev)
            members.append(Member(dev, *shards[i], pace_seconds=pace[i]))
        sim = availability.IntermittentFleet(s, trace, members, root, task)
        async with OperatorClient(s) as operator:
            t0 = time.monotonic()
            sim.start(t0)
            await operator.call(RoundStart, RoundStarted, rounds=rounds, min_updates=min_updates,
                                deadline_seconds=window, expected=ids, epochs=fl.epochs, lr=fl.lr,
                                batch_size=fl.batch_size)
        end = t0 + rounds * window + 60
        while len(ended) < rounds and time.monotonic() < end:
            await asyncio.sleep(0.1)
        wall = time.monotonic() - t0
        await sim.stop()
        built = sim.built()
        final = curve[-1][1]
        return {"mode": mode, "rounds": rounds, "round_seconds": window, "wall_seconds": round(wall, 2),
                "models": len(curve) - 1, "final_accuracy": round(final, 4),
                "updates_sent": built["updates"], "updates_aggregated": aggregated,
                "updates_wasted": max(0, built["updates"] - aggregated), "rejected": dict(sorted(rejected.items())),
                "update_bytes": built["message_bytes"], "connects": sim.counts["connects"],
                "curve": [(round(t, 2), round(a, 4)) for t, a in curve]}
    finally:
        if sim is not None:
            await sim.stop()
        await enclave.stop()
        await coordinator.stop()
        if broker is not None:
            ch = await broker.connection.channel()
            await delete_topology(ch, broker.names)
            await broker.close()
        shutil.rmtree(root, ignore_errors=True)


def plot(result: dict, path: Path) -> Path:
    """Accuracy against wall time for both modes, the target as a line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for mode in MODES:
        r = result[mode]
        t, a = zip(*r["curve"], strict=True)
        ax.step(t, a, where="post", label=f"{mode} ({r['models']} models)")
    ax.axhline(result["target_accuracy"], color="grey", linestyle=":", label=f"target {result['target_accuracy']:g}")
    ax.set(xlabel="seconds since the plan started", ylabel="test accuracy",
           title=f"{result['devices']} devices, {round(100 * result['offline_fraction'])} % offline at any moment")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


async def run_bench(base: Settings, *, devices: int = 20, offline_fraction: float = 0.5, mean_online: float = 10.0,
                    budget: float = 90.0, deadline: float = 10.0, buffer_size: int = 5, max_staleness: int = 4,
                    target: float = 0.9, seed: int = 0, trace_file: Path | None = None, train_seconds: float = 2.0,
                    write_docs: bool = False) -> dict:
    """``trace_file``: a trace (edge_agent/availability.py) instead of the exponential one; a bad
    file raises :class:`availability.TraceError` before anything starts."""
    if trace_file is not None:
        trace = availability.load(trace_file, devices)
    else:
        trace = availability.exponential(devices, budget, offline_fraction, mean_online, seed)
    min_updates = min(3, devices)
    pace = paces(devices, train_seconds, seed)
    result: dict = {"devices": devices, "offline_fraction": offline_fraction, "mean_online_seconds": mean_online,
                    "trace_offline_fraction": round(trace.mean_offline_fraction(), 3),
                    "trace_file": str(trace_file) if trace_file else None, "budget_seconds": trace.horizon,
                    "sync_deadline_seconds": deadline, "buffer_size": buffer_size, "max_staleness": max_staleness,
                    "target_accuracy": target, "seed": seed, "task": base.fl.task,
                    "train_seconds": train_seconds}
    for mode in MODES:
        r = await run_mode(base, mode, trace, deadline=deadline, buffer_size=buffer_size,
                           max_staleness=max_staleness, min_updates=min_updates, seed=seed, pace=pace)
        r["time_to_target_s"] = time_to([tuple(p) for p in r["curve"]], target)
        result[mode] = r
        print(f"{mode}: time to {target:g} {r['time_to_target_s']} s, final accuracy {r['final_accuracy']}, "
              f"{r['updates_sent']} sent, {r['updates_wasted']} wasted", file=sys.stderr, flush=True)
    ts, ta = result["sync"]["time_to_target_s"], result["async"]["time_to_target_s"]
    result["speedup"] = round(ts / ta, 2) if ts is not None and ta else None
    result["accuracy_change_points"] = round(100 * (result["async"]["final_accuracy"]
                                                    - result["sync"]["final_accuracy"]), 2)
    result["goal_met"] = bool(result["speedup"] is not None and result["speedup"] >= GOAL_SPEEDUP
                              and result["accuracy_change_points"] >= -GOAL_ACCURACY_POINTS)
    if write_docs:
        png = plot(result, DOC.parent / "bench-intermittent.png")
        result["plot"] = str(png)
        write_section("intermittent", "## Intermittent fleets: sync rounds against async (`qflare bench "
                      "intermittent`)\n\n" + render_md(result, png.name))
    return result


def render_md(r: dict, png: str) -> str:
    def fmt(v: float | None) -> str:
        return "never" if v is None else f"{v:.1f} s"

    rows = [[m, fmt(r[m]["time_to_target_s"]), f"{r[m]['final_accuracy']:.3f}", str(r[m]["models"]),
             str(r[m]["updates_sent"]), str(r[m]["updates_wasted"]),
             ", ".join(f"{k}={v}" for k, v in r[m]["rejected"].items()) or "-", f"{r[m]['update_bytes']:,}"]
            for m in MODES]
    return (f"{r['devices']} simulated devices of the digits task, each with its own broker connection, on and off "
            f"with exponential durations (mean online {r['mean_online_seconds']:g} s, {round(100 * r['offline_fraction'])} % "
            f"offline at any moment; {round(100 * r['trace_offline_fraction'])} % in the drawn trace, seed {r['seed']}); "
            f"an offline device's connection is closed; a device's training takes {r['train_seconds']:g} s on "
            "average (0.5-1.5x, simulated slower hardware). The same trace, data and seed for both modes, "
            f"{r['budget_seconds']:g} s each. Sync: rounds of {r['sync_deadline_seconds']:g} s expecting every device "
            f"(so a round with devices away runs to its deadline); async: fl.buffer_size {r['buffer_size']}, "
            f"fl.max_staleness {r['max_staleness']}. Time from the plan's start to the enclave's first model at "
            f"{r['target_accuracy']:g} test accuracy; wasted: updates sent that went into no model (stale, late, "
            "filtered, or never delivered).\n\n"
            + md_table(["mode", f"time to {r['target_accuracy']:g}", "final accuracy", "models", "updates sent",
                        "wasted", "refused by reason", "update bytes"], rows)
            + f"\n\nAsync reached the target {r['speedup']}x sooner (goal >= {GOAL_SPEEDUP:g}x), final accuracy "
            f"{r['accuracy_change_points']:+.2f} points against sync (goal >= -{GOAL_ACCURACY_POINTS:g}): goal "
            f"{'met' if r['goal_met'] else 'not met'}. On two shared cores; sync's pace is its deadline, which "
            "must cover a device's training and a returning device's catch-up.\n\n"
            f"![accuracy against time]({png})\n")
