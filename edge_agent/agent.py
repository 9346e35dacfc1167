"""``qflare agent run``: one real device, online as long as it runs.

It trains the task ``fl.task`` names, on its own file (``--data``) or on the task's
``load_data(shard, of)``. At start it reads the latest model from the models stream (a device
that was offline catches up), resends anything left in its outbox, then follows the models fanout.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from broker.client import BrokerClient
from common.data import Partition, load_file
from common.settings import Settings
from common.task import TaskError
from common.training import Attack, runner_for
from edge_agent import client
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from edge_agent.storage import device_dir, load_device, save_device

log = logging.getLogger("qflare.agent")

#: How often a device without an attested enclave asks again (each ask is a new session).
ENCLAVE_RETRY_SECONDS = 2.0


async def run_agent(settings: Settings, device_id: str, shard: int, of: int, attack: Attack | None = None,
                    stop: asyncio.Event | None = None, data: Path | None = None) -> None:
    fl = settings.fl
    task = runner_for(fl.task)  # a broken task or data file stops here, before any broker traffic
    if data is not None:
        try:
            x, y = load_file(data)
        except ValueError as exc:
            raise TaskError(str(exc)) from None
    else:
        x, y = task.load_data(shard, of, Partition.of(fl))
    log.info("task %s (layout %s, %d parameters), %d training samples", fl.task, task.layout_id, task.n_params,
             len(y))
    device = load_device(settings.state_dir, device_id)
    # A device declares nothing but its own queues, so it can run as a confined broker user.
    broker = await BrokerClient.open(settings, name=f"qflare-agent-{device_id}", declare=False, client_id=device_id)
    outbox = Outbox(device_dir(settings.state_dir, device_id) / "outbox.sqlite3")
    try:
        rpc = await broker.rpc()
        while True:
            await client.open_session(rpc, broker.names, device, kem_alg=settings.crypto.kem,
                                      timeout=settings.broker.rpc_timeout)
            if device.enclave is not None:
                break
            log.info("no attested enclave yet; asking again in %.0f s", ENCLAVE_RETRY_SECONDS)
            await asyncio.sleep(ENCLAVE_RETRY_SECONDS)
        save_device(settings.state_dir, device)
        fleet = Fleet(broker, outbox, task=task)
        fleet.add(Member(device, x, y, attack=attack))
        resent = await fleet.flush()
        if resent:
            log.info("resent %d pending updates", resent)
        await fleet.listen()
        broker.connection.reconnect_callbacks.add(lambda *_: asyncio.ensure_future(fleet.flush()))
        await (stop or asyncio.Event()).wait()
        await fleet.drain()
    finally:
        outbox.close()
        await broker.close()
