"""``qflare agent run``: one real device that never gives up on its broker.

It trains the task ``fl.task`` names, on its own file (``--data``) or on the task's
``load_data(shard, of)``.

Each pass of the loop is one connection: open it (retrying forever with capped exponential
backoff and jitter, one log line per attempt), open a fresh session (which is also how a
device learns it was revoked: then it stops), resend the outbox, subscribe to the models
fanout and catch up from the models stream (the open round is joined if its deadline allows).
The pass ends when the connection is lost, and the next one begins; a device that wakes from
sleep catches up at once. Local state (keys, outbox, which round it took part in) lives across
passes, so no outage loses a confirmed-or-pending update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from broker.backoff import Backoff
from broker.client import BrokerClient
from broker.connection import BrokerTlsError, BrokerUnavailable
from broker.messaging import TRANSIENT
from common.data import Partition, load_file
from common.settings import Settings
from common.task import TaskError
from common.training import Attack, runner_for
from edge_agent import client
from edge_agent.client import Device
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from edge_agent.storage import device_dir, load_device, save_device
from edge_agent.wakeup import SleepWatch
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.agent")

#: How often a device without an attested enclave asks again (each ask is a new session).
ENCLAVE_RETRY_SECONDS = 2.0
#: A connection that held this long was a success: the backoff starts small again.
STABLE_SECONDS = 30.0
#: A model signed by an enclave key the device does not know (the enclave got new keys, e.g. a
#: new build) makes it ask the coordinator for a new session, at most this often (a forged model
#: costs the coordinator one session per this many seconds, no more).
REKEY_SECONDS = 30.0
#: Coordinator answers that end the agent: asking again cannot change them.
FINAL = {Reason.REVOKED: "revoked", Reason.NOT_ENROLLED: "not enrolled"}


class Stopped(Exception):
    """The coordinator said this device may not go on (revoked, not enrolled)."""


async def _session(broker: BrokerClient, device: Device, settings: Settings, stop: asyncio.Event) -> None:
    """A fresh session with an attested enclave, or :class:`Stopped`."""
    rpc = await broker.rpc()
    while True:
        try:
            await client.open_session(rpc, broker.names, device, kem_alg=settings.crypto.kem,
                                      timeout=settings.broker.rpc_timeout, suite=settings.crypto.handshake)
        except QflareError as err:
            if err.reason in FINAL:
                raise Stopped(f"device {device.device_id} is {FINAL[err.reason]} ({err.detail}); stopping") from None
            raise
        if device.enclave is not None or stop.is_set():
            return
        log.info("no attested enclave yet; asking again in %.0f s", ENCLAVE_RETRY_SECONDS)
        await asyncio.sleep(ENCLAVE_RETRY_SECONDS)


async def _one_connection(settings: Settings, device: Device, fleet: Fleet, stop: asyncio.Event,
                          watch: SleepWatch) -> None:
    """Connect, take part until the connection is lost (returns) or ``stop`` is set."""
    broker = await BrokerClient.open(settings, name=f"qflare-agent-{device.device_id}", declare=False,
                                     client_id=device.device_id, robust=False)
    lost, rekey, unconfirmed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    broker.connection.close_callbacks.add(lambda *_: lost.set())
    fleet.on_reject = lambda _device, reason: rekey.set() if reason == Reason.BAD_SIGNATURE.value else None
    fleet.on_unconfirmed = lambda _update_id: unconfirmed.set()
    try:
        await _session(broker, device, settings, stop)
        save_device(settings.state_dir, device)
        last_session = time.monotonic()
        fleet.broker = broker
        resent = await fleet.flush()
        if resent:
            log.info("resent %d pending updates", resent)
        await fleet.listen()  # subscribes, then catches up from the models stream
        log.info("connected as %s; following the models fanout", device.device_id)
        while not (stop.is_set() or lost.is_set() or unconfirmed.is_set()):
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait()),
                     asyncio.ensure_future(watch.wait()), asyncio.ensure_future(rekey.wait()),
                     asyncio.ensure_future(unconfirmed.wait())}
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if rekey.is_set() and not (stop.is_set() or lost.is_set() or unconfirmed.is_set()):
                await asyncio.sleep(max(0.0, last_session + REKEY_SECONDS - time.monotonic()))
                rekey.clear()
                old = device.enclave.sig_pk if device.enclave else None
                log.info("%s: a model is signed by an enclave key this device does not know; asking the "
                         "coordinator for a new session", device.device_id)
                await _session(broker, device, settings, stop)
                save_device(settings.state_dir, device)
                last_session = time.monotonic()
                if device.enclave and device.enclave.sig_pk != old:
                    log.info("%s: the attested enclave has new keys; catching up", device.device_id)
                    await fleet.catch_up()
            for w in done:
                if not w.cancelled() and isinstance(w.result(), float) and not lost.is_set():
                    log.info("woke after about %.0f s asleep; catching up", w.result())
                    with contextlib.suppress(*TRANSIENT):
                        await fleet.resume()
        if lost.is_set() and not stop.is_set():
            log.warning("broker connection lost")
        elif unconfirmed.is_set() and not stop.is_set():
            log.warning("the broker did not confirm an update on this connection; connecting again to resend it")
    finally:
        if stop.is_set():
            await fleet.drain()  # a training in flight is sent (or kept in the outbox) before we go
        with contextlib.suppress(Exception):
            await broker.close()


async def run_agent(settings: Settings, device_id: str, shard: int, of: int, attack: Attack | None = None,
                    stop: asyncio.Event | None = None, data: Path | None = None) -> None:
    """Run until ``stop`` is set (or forever); returns early only when the device may not go on."""
    stop = stop or asyncio.Event()
    fl, r = settings.fl, settings.recovery
    task = runner_for(fl.task)  # a broken task or data file stops here, before any broker traffic
    if data is not None:
        try:
            x, y = load_file(data)
        except ValueError as exc:
            raise TaskError(str(exc)) from None
    else:
        x, y = task.load_data(shard, of, Partition.of(fl))
    task.warm_up(x, y)  # one tiny step: data the model cannot take fails now, not in the first round
    log.info("task %s (layout %s, %d parameters), %d training samples", fl.task, task.layout_id, task.n_params,
             len(y))
    device = load_device(settings.state_dir, device_id)
    outbox = Outbox(device_dir(settings.state_dir, device_id) / "outbox.sqlite3")
    fleet = Fleet(None, outbox, narrate=True, task=task)  # type: ignore[arg-type]  # broker set per connection
    fleet.add(Member(device, x, y, attack=attack))
    backoff = Backoff(r.agent_backoff_min_seconds, max(r.agent_backoff_min_seconds, r.agent_backoff_max_seconds))
    watch = SleepWatch()
    attempt = 0
    try:
        while not stop.is_set():
            attempt += 1
            began = time.monotonic()
            try:
                await _one_connection(settings, device, fleet, stop, watch)
                why = "connection lost"
            except Stopped as done:
                log.error("%s", done)
                return
            except BrokerTlsError as exc:  # still retried: a device's clock may be wrong until NTP ran
                why = str(exc)
            except BrokerUnavailable as exc:
                why = f"broker unavailable ({exc.cause})"
            except QflareError as err:
                why = f"coordinator: {err.reason.value} {err.detail}".strip()
            except TRANSIENT as exc:
                why = f"connection failed ({type(exc).__name__}: {exc})"
            except Exception as exc:  # noqa: BLE001 - nothing ends the agent but stop or revocation
                why = f"unexpected {type(exc).__name__}: {exc}"
                log.debug("attempt %d failed", attempt, exc_info=True)
            if stop.is_set():
                break
            if time.monotonic() - began >= STABLE_SECONDS:
                backoff.reset()
            pause = backoff.next()
            log.warning("attempt %d: %s; connecting again in %.1f s", attempt, why, pause)
            log.debug("attempt %d ended after %.1f s", attempt, time.monotonic() - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
        await fleet.drain()
    finally:
        outbox.close()
