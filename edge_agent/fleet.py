"""Running devices: each verifies the enclave-signed model, trains, and sends its update.

One process can run one device (``qflare agent run``) or thousands (the simulator): all
devices of a process share one connection, one subscription to the models fanout and one
task (common/task.py), and each keeps its own keys, data and outbox entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from broker.client import BrokerClient
from broker.messaging import RETRY_MAX_SECONDS, TRANSIENT
from common import compression
from common.settings import Settings
from common.task import TaskError, TrainConfig
from common.training import Attack, TaskRunner, runner_for
from edge_agent import updates
from edge_agent.client import Device
from edge_agent.models import ModelAssembly, latest_model_messages
from edge_agent.outbox import Outbox
from schemas import signing
from schemas.codec import CodecError, decode, peek_type
from schemas.messages import GlobalModel, ModelChunk, RoundSpec, Signed
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.agent")


@dataclass
class Member:
    device: Device
    x: np.ndarray
    y: np.ndarray
    attack: Attack | None = None
    last_round: int = 0
    model_version: int = -1
    #: What compression left out of earlier updates (error feedback), added to the next one.
    residual: np.ndarray | None = None
    train_seconds: float | None = None  # how long its last local training took
    #: Async rounds: training now, and the (round, model version) it last trained on.
    busy: bool = False
    trained_on: tuple[int, int] = (0, -1)
    #: Simulated hardware (edge_agent/availability.py): local training takes at least this long.
    pace_seconds: float = 0.0


#: First pause before a fleet resends an update the broker did not confirm (doubling up to
#: broker.messaging's RETRY_MAX_SECONDS, while the update's round is open).
RESEND_FIRST_SECONDS = 1.0


@dataclass
class Lane:
    """A confirming channel a fleet publishes its updates on (None: the client's main one), and
    its window: ``broker.publish_window`` publishes awaiting a confirm at once."""

    channel: AbstractChannel | None
    slots: asyncio.Semaphore
    load: int = 0  # publishes holding or waiting for a slot: the next update takes the least loaded lane


def verify_model(body: bytes, device: Device) -> GlobalModel:
    """The global model if it carries a valid signature of the device's attested enclave."""
    if device.enclave is None:
        raise QflareError(Reason.NO_ENCLAVE, "no attested enclave known")
    signed = decode(body, Signed)
    return signing.verify(signed, GlobalModel, device.enclave.sig_alg, device.enclave.sig_pk)


class Fleet:
    """The devices of one process. ``narrate`` logs each device's steps at INFO (one real
    device, ``qflare agent run``) instead of DEBUG (a simulated fleet of thousands)."""

    def __init__(self, broker: BrokerClient, outbox: Outbox, *, on_sent: Callable[[str, int], None] | None = None,
                 on_reject: Callable[[str, str], None] | None = None, task: TaskRunner | None = None,
                 attacker: Callable[[Member, np.ndarray, RoundSpec, int], np.ndarray] | None = None,
                 narrate: bool = False, settings: Settings | None = None) -> None:
        """``attacker(member, base, spec, seed)`` makes a malicious member's delta (the demo's
        attack library); without it ``Member.attack`` is one of the task runner's attacks."""
        self.broker = broker
        self._settings = settings
        #: Offline (edge_agent/availability.py): no connection; models are not offered, sends wait in the outbox.
        self.paused = False
        #: What the devices train: ``fl.task`` unless given.
        self.task = task or runner_for((settings or broker.settings).fl.task)
        self.outbox = outbox
        self.members: dict[str, Member] = {}
        self.latest: GlobalModel | None = None
        self.on_sent = on_sent
        self.on_reject = on_reject
        #: Called when the broker did not confirm an update (it stays in the outbox, and the fleet
        #: resends it while its round is open): ``qflare agent run`` also connects again, since a channel that nacked (a queue leader lost on a
        #: cluster) may go on nacking, and a new connection resends the outbox.
        self.on_unconfirmed: Callable[[str], None] | None = None
        self.attacker = attacker
        self._tasks: set[asyncio.Task] = set()
        self._queue = None
        self._assembly: ModelAssembly | None = None
        #: Updates built, their encoded deltas' bytes and their messages' bytes (benchmarks, demo).
        self.built = {"updates": 0, "payload_bytes": 0, "message_bytes": 0}
        #: Publishes the broker did not confirm in time, and resends of such updates (same update id).
        self.unconfirmed = 0
        self.resent = 0
        self._lanes: list[Lane] = []
        self._lanes_of: object | None = None  # the BrokerClient the lanes' channels belong to
        self._lanes_lock = asyncio.Lock()
        self._level = logging.INFO if narrate else logging.DEBUG
        self._warm = False
        self._hooked: object | None = None  # the connection whose reconnects we follow

    @property
    def settings(self) -> Settings:
        """The settings devices follow: the broker's, else those given (a fleet that starts offline)."""
        return self.broker.settings if self.broker is not None else self._settings  # type: ignore[return-value]

    def _say(self, msg: str, *args: object) -> None:
        log.log(self._level, msg, *args)

    def add(self, member: Member) -> None:
        self.members[member.device.device_id] = member

    async def listen(self) -> None:
        """Subscribe to the models fanout, then catch up from the models stream.

        Call it on every new connection (``self.broker`` replaced). On a robust connection
        the subscription survives reconnects by itself, and each reconnect resends the outbox
        and catches up again.
        """
        if self.members and not self._warm:
            first = next(iter(self.members.values()))
            await asyncio.to_thread(self.task.warm_up, first.x, first.y)
            self._warm = True
        ch = self.broker.channel
        self._queue = await ch.declare_queue(self.broker.private_queue("models"), exclusive=True, auto_delete=True)
        await self._queue.bind(self.broker.names.models_exchange)
        await self._queue.consume(self._on_message)
        conn = self.broker.connection
        if self._hooked is not conn and hasattr(conn, "reconnect_callbacks"):
            conn.reconnect_callbacks.add(lambda *_: asyncio.ensure_future(self.resume()))
            self._hooked = conn
        await self.catch_up()

    async def catch_up(self) -> bool:
        """Read the latest model and open round from the models stream, and act on it (a device
        that was offline, asleep or disconnected joins the open round if its deadline allows)."""
        bodies = await latest_model_messages(self.broker)
        for body in bodies:
            await self.handle_model(body)
        return bool(bodies)

    async def resume(self) -> None:
        """After a reconnect: resend the outbox, then catch up (never raises: the next reconnect retries)."""
        try:
            resent = await self.flush()
            if resent:
                self._say("resent %d pending updates after the reconnect", resent)
            await self.catch_up()
        except TRANSIENT as exc:
            log.info("catching up after a reconnect failed (%s); trying again at the next one", exc)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process(ignore_processed=True):
            await self.handle_model(bytes(message.body))

    async def handle_model(self, body: bytes) -> None:
        """Verify once per enclave key, then let each device train if the round includes it.

        A chunked model is verified on its signed part and used once its chunks, each checked
        against the signed digests, are all in.
        """
        if peek_type(body) == ModelChunk.TYPE:
            if self._assembly is not None:
                try:
                    whole = self._assembly.add(decode(body, ModelChunk))
                except CodecError as err:
                    log.warning("model chunk refused: %s", err)
                    return
                if whole is not None:
                    verdicts = {k: (whole if v is not None else None) for k, v in self._assembly.context.items()}
                    self._assembly = None
                    self._dispatch(verdicts)
            return
        verdicts: dict[bytes, GlobalModel | None] = {}
        for m in list(self.members.values()):
            key = m.device.enclave.sig_pk if m.device.enclave else b""
            if key not in verdicts:
                try:
                    verdicts[key] = verify_model(body, m.device)
                except (QflareError, CodecError) as err:
                    log.warning("model refused by %s: %s", m.device.device_id, err)
                    if self.on_reject:
                        self.on_reject(m.device.device_id, err.reason.value)
                    verdicts[key] = None
        signed = next((v for v in verdicts.values() if v is not None), None)
        if signed is not None and signed.chunk_digests:
            self._assembly = ModelAssembly(signed, verdicts)  # a newer model replaces one in progress
            return
        self._dispatch(verdicts)

    def _dispatch(self, verdicts: dict[bytes, GlobalModel | None]) -> None:
        for m in list(self.members.values()):
            model = verdicts.get(m.device.enclave.sig_pk if m.device.enclave else b"")
            if model is not None:
                self._offer(m, model)

    def _offer(self, m: Member, model: GlobalModel) -> None:
        """A model verified for ``m``: apply it, and train on it if its round wants this device."""
        if self.paused:
            return
        if model.version < m.model_version:
            return  # older than what this device has
        if model.version > m.model_version:
            self._say("%s: model v%d verified (enclave signature) and applied", m.device.device_id, model.version)
        m.model_version = model.version
        if self.latest is None or model.version >= self.latest.version:
            self.latest = model
        spec = model.next_round
        if spec is None:
            return
        if spec.mode == "async":
            # FedBuff: train whenever online and idle, once per model version
            if m.busy or (spec.round_id, model.version) <= m.trained_on:
                return
        elif spec.round_id <= m.last_round:
            return
        if spec.expected and m.device.device_id not in spec.expected:
            return
        mismatch = self._layout_mismatch(model)
        if mismatch:  # followed, but not trained: the device's task cannot load these weights
            log.warning("round %d not joined by %s: %s", spec.round_id, m.device.device_id, mismatch)
            if self.on_reject:
                self.on_reject(m.device.device_id, Reason.LAYOUT_MISMATCH.value)
            return
        m.last_round = spec.round_id
        m.trained_on = (spec.round_id, model.version)
        left = spec.deadline - time.time()
        need = (m.train_seconds or 0.0) + self.settings.recovery.join_margin_seconds
        if left <= 0:  # e.g. read back from the models stream after it closed
            self._say("%s: round %d is past its deadline; waiting for the next round", m.device.device_id,
                      spec.round_id)
            return
        if left < need:
            self._say("%s: round %d closes in %.1f s, too soon to train and send (about %.1f s needed); "
                      "waiting for the next round", m.device.device_id, spec.round_id, left, need)
            return
        if spec.mode == "async":
            self._say("%s: training on model v%d in async round %d (closes in %.0f s)", m.device.device_id,
                      model.version, spec.round_id, left)
            m.busy = True
        else:
            self._say("%s: joined round %d (closes in %.0f s)", m.device.device_id, spec.round_id, left)
        task = asyncio.create_task(self._train_and_send(m, model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if spec.mode == "async":
            task.add_done_callback(lambda _t, m=m: self._idle(m))

    def _idle(self, m: Member) -> None:
        """An async device done with its update trains again on the latest model, if newer."""
        m.busy = False
        if m.device.device_id in self.members and self.latest is not None and self.latest.version == m.model_version:
            self._offer(m, self.latest)

    def _layout_mismatch(self, model: GlobalModel) -> str | None:
        """Why this device's task cannot train ``model`` (another task, or another version of it), if so."""
        if model.layout_id != self.task.layout_id or len(model.params) != 4 * self.task.n_params:
            return (f"model layout {model.layout_id} is not {self.task.name}'s {self.task.layout_id}: "
                    "device and enclave run different tasks")
        return None

    async def _train_and_send(self, m: Member, model: GlobalModel) -> None:
        spec = model.next_round
        base = np.frombuffer(model.params, dtype="<f4").copy()
        seed = zlib.crc32((f"{m.device.device_id}/{spec.round_id}" if spec.mode == "sync" else
                           f"{m.device.device_id}/{spec.round_id}/{model.version}").encode())
        config = TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=seed)
        t0 = time.monotonic()
        try:
            if m.attack is not None and self.attacker is not None:
                delta, n = await asyncio.to_thread(self.attacker, m, base, spec, seed), int(len(m.y))
            else:
                delta, n = await asyncio.to_thread(self.task.train, base, m.x, m.y, config, m.attack)
        except (TaskError, ValueError) as exc:
            log.error("training of %s in round %d failed, nothing sent: %s", m.device.device_id, spec.round_id, exc)
            if self.on_reject:
                self.on_reject(m.device.device_id, Reason.TASK_FAILED.value)
            return
        if m.pace_seconds > time.monotonic() - t0:  # a slower device than this machine's core
            await asyncio.sleep(m.pace_seconds - (time.monotonic() - t0))
        m.train_seconds = time.monotonic() - t0
        self._say("%s: trained for round %d on %d samples in %.1f s", m.device.device_id, spec.round_id, n,
                  m.train_seconds)
        # Compress, seal, sign and keep it in the outbox in a worker thread: on the event loop, a
        # fleet's devices finishing training together ran these back to back (seconds for
        # thousands), and the publishes and confirms waited behind them.
        built = await asyncio.to_thread(self._build, m, model, delta, n)
        if isinstance(built, int):
            # The enclave would dead-letter it as oversize; say so here, where it can be fixed.
            log.error("a message of %s's update is %d bytes, over broker.max_message_bytes (%d): not sent; "
                      "lower chunking.chunk_bytes", m.device.device_id, built, self.settings.broker.max_message_bytes)
            if self.on_reject:
                self.on_reject(m.device.device_id, "oversize")
            return
        update_id, key, body, payload_bytes = built
        self.built["updates"] += 1
        self.built["payload_bytes"] += payload_bytes
        self.built["message_bytes"] += len(body) if isinstance(body, bytes) else sum(len(b) for b in body)
        self._say("%s: sent update %s for round %d", m.device.device_id, update_id, spec.round_id)
        if await self._send_until_confirmed(m, spec, update_id, key, body) and self.on_sent:
            self.on_sent(m.device.device_id, spec.round_id)

    def _build(self, m: Member, model: GlobalModel, delta: np.ndarray,
               n: int) -> tuple[str, str, bytes | list[bytes], int] | int:
        """(update id, routing key, message or chunk messages, encoded delta's bytes) of ``m``'s
        sealed, signed update, kept in the outbox; or the size of a message over the broker's
        limit (not kept, not sent)."""
        s, spec = self.settings, model.next_round
        encoded, m.residual = compression.encode_with_feedback(
            delta, m.residual, compression.ENCODING_OF_SETTING[s.fl.compression], s.chunking.chunk_bytes,
            s.fl.topk_fraction)
        update_id, key, bodies = updates.build_parts(m.device, spec.round_id, model.version, model.layout_id,
                                                     encoded, n, shards=s.enclave.shards)
        if max(len(b) for b in bodies) > s.broker.max_message_bytes:
            return max(len(b) for b in bodies)
        body = bodies[0] if len(bodies) == 1 else bodies
        self.outbox.put(update_id, m.device.device_id, key, body, spec.round_id)
        return update_id, key, body, encoded.nbytes

    async def _send_until_confirmed(self, m: Member, spec: RoundSpec, update_id: str, key: str,
                                    body: bytes | list[bytes]) -> bool:
        """Send, and resend (same update id: the enclave counts it once) what the broker did not
        confirm, while the round is open and the update is still in the outbox; True once confirmed.

        Offline, or once the round closed, it stays in the outbox (a reconnect or ``flush`` sends it).
        """
        pause = RESEND_FIRST_SECONDS
        if await self.send(update_id, key, body):
            return True
        while time.time() + pause < spec.deadline and not self.paused and m.device.device_id in self.members:
            await asyncio.sleep(pause)
            pause = min(2 * pause, RETRY_MAX_SECONDS)
            if self.paused or self.broker is None:
                return False
            if not self.outbox.is_pending(update_id):
                return True  # a reconnect's flush sent it meanwhile
            self.resent += 1
            self._say("%s: resending update %s (not confirmed)", m.device.device_id, update_id)
            if await self.send(update_id, key, body):
                return True
        return False

    async def send(self, update_id: str, routing_key: str, body: bytes | list[bytes]) -> bool:
        """Publish with confirm; the outbox keeps the update until the broker confirmed it.

        A chunked update's messages go in order on this one channel, so they reach the
        updates queue in order; resending sends them all again (the enclave starts over).
        """
        if self.broker is None or self.paused:
            return False  # offline: it stays in the outbox until the device is back
        broker = self.broker
        try:
            lane = await self._lane(broker)
            lane.load += 1
            try:
                async with lane.slots:  # backpressure: waiting here is not counted in the confirm timeout
                    self.outbox.attempt(update_id)
                    # mandatory: an update no queue takes comes back as an error, never vanishes
                    for part in body if isinstance(body, list) else [body]:
                        await broker.publisher.publish(broker.names.updates_exchange, routing_key, part,
                                                       message_id=update_id, mandatory=True, channel=lane.channel)
            finally:
                lane.load -= 1
        except TRANSIENT as exc:
            self.unconfirmed += 1
            log.warning("update %s not confirmed (%s: %s); kept in the outbox", update_id, type(exc).__name__, exc)
            if self.on_unconfirmed:
                self.on_unconfirmed(update_id)
            return False
        except Exception as exc:
            if self.broker is broker and not self.paused:
                raise
            # the device went offline mid-publish (its connection closed under it)
            log.info("update %s not confirmed: the device went offline (%s); kept in the outbox", update_id,
                     type(exc).__name__)
            return False
        self.outbox.confirmed(update_id)
        self._say("update %s confirmed by the broker", update_id)
        return True

    async def _lane(self, broker: BrokerClient) -> Lane:
        """The least loaded of ``broker.publish_channels`` confirming channels on ``broker``'s
        connection (the first is its main channel), opened at the first update."""
        async with self._lanes_lock:
            if self._lanes_of is not broker:
                s = self.settings.broker
                lanes = [Lane(None, asyncio.Semaphore(s.publish_window))]
                for _ in range(s.publish_channels - 1):
                    channel = await broker.connection.channel(publisher_confirms=True)
                    lanes.append(Lane(channel, asyncio.Semaphore(s.publish_window)))
                self._lanes, self._lanes_of = lanes, broker
        return min(self._lanes, key=lambda lane: lane.load)

    async def flush(self) -> int:
        """Resend every pending update of this fleet's devices (same update ids)."""
        sent = 0
        for update_id, device_id, key, body in self.outbox.pending():
            if device_id in self.members and await self.send(update_id, key, body):
                sent += 1
        return sent

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
