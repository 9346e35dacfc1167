"""One object per process holding the connection, a confirming channel and its helpers."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from broker.connection import connect
from broker.link import Link
from broker.messaging import Publisher, RpcClient
from broker.principals import url_user
from broker.topology import declare_topology
from common.settings import Settings
from schemas.names import Names


@dataclass
class BrokerClient:
    settings: Settings
    connection: AbstractRobustConnection
    channel: AbstractChannel
    publisher: Publisher
    names: Names
    client_id: str = "qflare"
    link: Link | None = None
    _rpc: RpcClient | None = field(default=None, repr=False)
    _rpc_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @classmethod
    async def open(cls, settings: Settings, name: str = "qflare", *, declare: bool = True,
                   client_id: str | None = None, robust: bool = True) -> BrokerClient:
        """Connect, open a channel with publisher confirms, declare the topology.

        ``client_id`` names this client's private queues (a device passes its device id, which
        its broker user is confined to); devices pass ``declare=False``. ``robust=False``: the
        connection ends at the first outage (the caller reconnects; see ``connect``).
        """
        conn = await connect(settings, name=name, robust=robust)
        try:
            channel = await conn.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=settings.broker.prefetch)
            names = await declare_topology(channel, settings) if declare else Names(settings.broker.namespace)
            events = await conn.channel(publisher_confirms=False)
        except BaseException:
            # e.g. ACCESS_REFUSED on a declare: close, so no half-open connection outlives the error
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        publisher = Publisher(channel, names, events, dead_letter_body_bytes=settings.broker.dead_letter_body_bytes,
                              user_id=url_user(settings.amqp_url), link=(link := Link(conn)),
                              source=f"/qflare/{names.namespace}/{name}", events_format=settings.events.format,
                              connection=conn)
        return cls(settings, conn, channel, publisher, names, client_id or f"{name}-{secrets.token_hex(4)}", link)

    def private_queue(self, purpose: str) -> str:
        return self.names.private_queue(self.client_id, purpose, secrets.token_hex(6))

    async def rpc(self) -> RpcClient:
        """The client's one RPC client (a channel has one direct reply-to consumer)."""
        async with self._rpc_lock:
            if self._rpc is None:
                self._rpc = await RpcClient(self.channel, self.publisher,
                                            self.settings.broker.max_message_bytes).start()
        return self._rpc

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
