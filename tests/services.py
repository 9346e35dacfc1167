"""Helpers for integration tests: real coordinator and enclave on the test's broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from broker.client import BrokerClient
from common.events import decode_event
from common.settings import Settings
from coordinator.service import Coordinator
from edge_agent import client
from enclave_worker.service import Enclave
from ops.operator_client import OperatorClient, init_operator
from schemas.codec import CodecError
from schemas.messages import Event, RoundStart, RoundStarted


class EventLog:
    """Collects events matching binding keys, for assertions."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    @classmethod
    async def bind(cls, broker: BrokerClient, *keys: str) -> EventLog:
        log = cls()
        q = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
        for k in keys:
            await q.bind(broker.names.events_exchange, k)

        async def on(message) -> None:
            with contextlib.suppress(CodecError):
                log.events.append(decode_event(message.body, message.content_type))

        await q.consume(on, no_ack=True)
        return log

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    async def wait(self, type_: str, count: int = 1, timeout: float = 20.0) -> list[Event]:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            got = [e for e in self.events if e.type == type_]
            if len(got) >= count:
                return got
            if loop.time() > end:
                raise AssertionError(f"expected {count} {type_!r} events, saw {self.types()}")
            await asyncio.sleep(0.02)


def with_operator(settings: Settings) -> Settings:
    """``settings`` whose coordinator pins the operator key under its state directory (made
    on first use, as ``qflare operator init`` does)."""
    operator, _ = init_operator(settings)
    if operator.sig_fp in settings.operator.pinned_fingerprints:
        return settings
    pinned = [*settings.operator.pinned_fingerprints, operator.sig_fp]
    return settings.model_copy(update={"operator": settings.operator.model_copy(
        update={"pinned_fingerprints": pinned})})


async def operator_call(settings: Settings, request_type, reply_type, **fields):
    """One signed operator request over the broker, as the CLI sends it; the verified reply."""
    async with OperatorClient(with_operator(settings)) as op:
        return await op.call(request_type, reply_type, **fields)


async def start_rounds(settings: Settings, **fields) -> RoundStarted:
    return await operator_call(settings, RoundStart, RoundStarted, **fields)


@contextlib.asynccontextmanager
async def coordinator(settings: Settings) -> AsyncIterator[Coordinator]:
    """A running coordinator that pins this test's operator key (``coord.settings`` has it)."""
    c = Coordinator(with_operator(settings))
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@contextlib.asynccontextmanager
async def enclave(settings: Settings) -> AsyncIterator[Enclave]:
    e = Enclave(settings)
    await e.start(attest_timeout=15)
    try:
        yield e
    finally:
        await e.stop()


async def enrolled(broker: BrokerClient, coord: Coordinator, device_id: str, *, session: bool = True) -> client.Device:
    rpc = await broker.rpc()
    token = coord.registry.create_token(device_id, 600)
    s = coord.settings
    dev = await client.enroll(rpc, broker.names, device_id, token, coord.identity.sig_fp,
                              sig_alg=s.crypto.signature, kem_alg=s.crypto.kem)
    if session:
        await client.open_session(rpc, broker.names, dev)
    return dev
