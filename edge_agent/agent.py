"""``qflare agent run``: one real device, online as long as it runs.

At start it reads the latest model from the models stream (a device that was offline
catches up), resends anything left in its outbox, then follows the models fanout.
"""

from __future__ import annotations

import asyncio
import logging

from broker.client import BrokerClient
from common.data import device_shard
from common.settings import Settings
from edge_agent import client
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from edge_agent.storage import device_dir, load_device, save_device

log = logging.getLogger("qflare.agent")

#: How often a device without an attested enclave asks again (each ask is a new session).
ENCLAVE_RETRY_SECONDS = 2.0


async def run_agent(settings: Settings, device_id: str, shard: int, of: int, attack: str | None = None,
                    stop: asyncio.Event | None = None) -> None:
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
        fl = settings.fl
        x, y = device_shard(shard, of, fl.partition, fl.dirichlet_alpha, fl.seed)
        fleet = Fleet(broker, outbox)
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
