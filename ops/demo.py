"""``qflare demo``: the whole product on one machine, through the real protocol.

Starts a coordinator, an enclave and N simulated devices in one process over RabbitMQ;
creates a token per device and enrolls each one, opens sessions, runs R rounds of the task
``fl.task`` names and reports per round: accuracy (and the task's other metrics), accepted
updates, rejections by reason, seconds.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker.client import BrokerClient
from broker.topology import delete_topology
from common import attacks
from common.data import Partition
from common.events import decode_event
from common.rootdata import digits_root
from common.settings import Settings
from common.task import DEFAULT_TASK
from common.training import runner_for
from coordinator.rootdata import send_root_data
from coordinator.service import Coordinator
from edge_agent import client
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from enclave_worker.service import Enclave
from ops.operator_client import OperatorClient, init_operator
from schemas.codec import CodecError, encode
from schemas.messages import Event, RoundStart, RoundStarted


@dataclass
class RoundRow:
    round: int
    status: str
    accuracy: float | None
    accepted: int
    rejected: dict[str, int]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoReport:
    devices: int
    malicious: list[str]
    attack: str | None
    task: str = ""
    rounds: list[RoundRow] = field(default_factory=list)
    enroll_seconds: float = 0.0
    namespace: str = ""
    #: Mean bytes of an update's encoded delta, and of the messages that carried it.
    payload_bytes: float = 0.0
    message_bytes: float = 0.0

    def as_json(self) -> dict:
        return {"namespace": self.namespace, "task": self.task, "devices": self.devices, "malicious": self.malicious,
                "attack": self.attack,
                "enroll_seconds": round(self.enroll_seconds, 3), "payload_bytes": round(self.payload_bytes),
                "message_bytes": round(self.message_bytes),
                "rounds": [{"round": r.round, "status": r.status, "accuracy": r.accuracy, "metrics": r.metrics,
                            "accepted": r.accepted, "rejected": r.rejected, "seconds": round(r.seconds, 3)}
                           for r in self.rounds]}


def parse_pairs(text: str | None, kind: type = int) -> dict:
    """``"a=1,b=2"`` (how round events carry rejections and metrics) → ``{"a": 1, "b": 2}``."""
    out: dict = {}
    for part in (text or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = kind(v)
    return out


def new_namespace() -> str:
    return f"demo-{uuid.uuid4().hex[:8]}"


def demo_operator(settings: Settings, devices: int, rounds: int, deadline: float | None = None) -> Settings:
    """Make the demo's operator key and pin it in the demo coordinator's settings, as an
    operator would with ``qflare operator init``; the demo's bounds fit the demo's plan."""
    operator, _ = init_operator(settings)
    op, fl = settings.operator, settings.fl
    return settings.model_copy(update={
        "operator": op.model_copy(update={
            "pinned_fingerprints": [operator.sig_fp], "max_rounds": max(op.max_rounds, rounds),
            "max_deadline_seconds": max(op.max_deadline_seconds, deadline or fl.deadline_seconds)}),
        "fl": fl.model_copy(update={"min_updates": min(fl.min_updates, devices)})})


async def round_events(broker: BrokerClient) -> asyncio.Queue[Event]:
    """A queue that receives every ``round.*`` event of the namespace from now on."""
    events: asyncio.Queue[Event] = asyncio.Queue()
    q = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
    await q.bind(broker.names.events_exchange, "round.*")

    async def on_event(message) -> None:
        try:
            await events.put(decode_event(message.body, message.content_type))
        except CodecError:
            pass

    await q.consume(on_event, no_ack=True)
    return events


def malicious_ids(device_ids: list[str], fraction: float) -> list[str]:
    """The last ``round(fraction * n)`` devices misbehave (deterministic, easy to read)."""
    k = int(round(fraction * len(device_ids)))
    return device_ids[len(device_ids) - k:] if k else []


def attacker(attack: str, settings: Settings, task, n_total: int, n_malicious: int):
    """A malicious demo device's update from the attack library (``Fleet(attacker=...)``); the
    adaptive attack is given the enclave's rule, run on the device's own honest estimates."""
    from common.task import TrainConfig
    from ops.bench_robust import accepts_rule

    defence = "qflare" if settings.fl.defend else "legacy"
    names = [f"colluder-{i}" for i in range(n_malicious)]

    def make(member: Member, base, spec, seed: int):
        def train(x, y, s: int):
            return task.train(base, x, y, TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                                                      seed=s))[0]

        return attacks.device_update(attack, train, member.x, member.y, seed, n_total=n_total,
                                     n_malicious=n_malicious,
                                     accepts_for=lambda benign: accepts_rule(defence, settings.fl, benign,
                                                                             n_malicious, names))

    return make


async def run_demo(settings: Settings, *, devices: int = 5, rounds: int = 3, malicious: float = 0.0,
                   attack: str = "sign-flip", deadline: float | None = None,
                   progress: Callable[[str, int, int], None] | None = None, keep_state: bool = False,
                   namespace: str | None = None) -> DemoReport:
    """Run the demo in a fresh state directory and namespace (``namespace``, else a new
    ``demo-<hex>``); clean both up afterwards."""
    root = Path(tempfile.mkdtemp(prefix="qflare-demo-"))
    state = root / "state"  # the simulated platform key goes beside it (state-platform), under root
    ns = namespace or new_namespace()
    settings = settings.model_copy(update={
        "state_dir": state, "registry_path": None,
        "broker": settings.broker.model_copy(update={"namespace": ns}),
        # the demo may show every configurable algorithm, pure-Python backends included
        "crypto": settings.crypto.model_copy(update={"allow_pure_backends": True})})
    settings = demo_operator(settings, devices, rounds, deadline)
    say = progress or (lambda *_: None)
    ids = [f"device-{i:04d}" for i in range(devices)]
    bad = malicious_ids(ids, malicious)
    report = DemoReport(devices, bad, attack if bad else None, task=settings.fl.task, namespace=ns)
    fl = settings.fl
    task = runner_for(fl.task)  # a broken task stops the demo here, before any service starts
    shards = [task.load_data(i, devices, Partition.of(fl)) for i in range(devices)]
    coordinator = Coordinator(settings)
    enclave = Enclave(settings)
    fleet_broker: BrokerClient | None = None
    try:
        say("broker", 0, 1)
        await coordinator.start()
        await enclave.start()
        fleet_broker = await BrokerClient.open(settings, name="qflare-fleet")
        events = await round_events(fleet_broker)
        if fl.defend and fl.task == DEFAULT_TASK:  # digits' root data: held out of every device's shard
            await send_root_data(settings, *digits_root(), broker=fleet_broker, registry=coordinator.registry,
                                 identity=coordinator.identity)
            end = time.monotonic() + 30
            while enclave.root is None and time.monotonic() < end:
                await asyncio.sleep(0.02)
        say("broker", 1, 1)

        rpc = await fleet_broker.rpc()
        fleet = Fleet(fleet_broker, Outbox(state / "fleet-outbox.sqlite3"), task=task,
                      attacker=attacker(attack, settings, task, devices, len(bad)) if bad else None)
        fp = coordinator.identity.sig_fp
        # what `token create` puts in each token file beside the token: every device checks it
        # against the pinned fingerprint and enrols in one round trip
        keys_message = encode(coordinator.keys_message)
        t0 = time.perf_counter()
        done = 0

        async def join(i: int, device_id: str) -> None:
            nonlocal done
            token = coordinator.registry.create_token(device_id, 3600)
            dev = await client.enroll(rpc, fleet_broker.names, device_id, token, fp, keys_message=keys_message,
                                      sig_alg=settings.crypto.signature, kem_alg=settings.crypto.kem)
            await client.open_session(rpc, fleet_broker.names, dev)
            x, y = shards[i]
            fleet.add(Member(dev, x, y, attack=attack if device_id in bad else None))
            done += 1
            say("enroll", done, devices)

        for start in range(0, devices, 32):
            await asyncio.gather(*(join(i, ids[i]) for i in range(start, min(devices, start + 32))))
        report.enroll_seconds = time.perf_counter() - t0
        await fleet.listen()

        async with OperatorClient(settings) as operator:  # a signed operator request, as `qflare round start`
            started = await operator.call(
                RoundStart, RoundStarted, rounds=rounds, min_updates=max(fl.min_updates, math.ceil(devices / 2)),
                deadline_seconds=deadline or fl.deadline_seconds, expected=ids, epochs=fl.epochs, lr=fl.lr,
                batch_size=fl.batch_size)
        first = started.round_id
        opened: dict[int, float] = {}
        say("rounds", 0, rounds)
        while len(report.rounds) < rounds:
            ev = await asyncio.wait_for(events.get(), (deadline or fl.deadline_seconds) + 120)
            if ev.round_id is None or ev.round_id < first:
                continue
            if ev.type == "round.opened":
                opened[ev.round_id] = time.perf_counter()
                continue
            secs = time.perf_counter() - opened.get(ev.round_id, time.perf_counter())
            if ev.type == "round.completed":
                acc = ev.detail.get("accuracy")
                report.rounds.append(RoundRow(ev.round_id - first + 1, "completed",
                                              float(acc) if acc is not None else None,
                                              int(ev.detail.get("accepted") or 0),
                                              parse_pairs(ev.detail.get("rejected"), int), secs,
                                              parse_pairs(ev.detail.get("metrics"), float)))
            elif ev.type == "round.failed":
                report.rounds.append(RoundRow(ev.round_id - first + 1, "failed", None, 0,
                                              {"too_few_updates": 1}, secs))
            say("rounds", len(report.rounds), rounds)
        await fleet.drain()
        if fleet.built["updates"]:
            report.payload_bytes = fleet.built["payload_bytes"] / fleet.built["updates"]
            report.message_bytes = fleet.built["message_bytes"] / fleet.built["updates"]
        return report
    finally:
        await enclave.stop()
        await coordinator.stop()
        if fleet_broker is not None:
            ch = await fleet_broker.connection.channel()
            await delete_topology(ch, fleet_broker.names)
            await fleet_broker.close()
        if not keep_state:
            shutil.rmtree(root, ignore_errors=True)
