"""The dashboard's inputs: the events stream (replayed from its first offset, then live) and
the management API's queue figures, both folded into a :class:`FleetView`.

Read-only: the broker client declares nothing (``declare=False``); while the namespace has no
topology yet, the feed says so on the page and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from broker.client import BrokerClient
from broker.connection import BrokerAccessRefused, BrokerUnavailable
from broker.messaging import TRANSIENT
from broker.queues import management_api, queue_figures
from broker.users import BrokerAdminError, vhost_of
from common.events import decode_event
from common.settings import Settings
from ops.dashboard.state import FleetView
from schemas.codec import CodecError

log = logging.getLogger("qflare.dashboard")
RETRY_SECONDS = 2.0
QUEUE_POLL_SECONDS = 3.0


class Feed:
    def __init__(self, settings: Settings, view: FleetView) -> None:
        self.settings = settings
        self.view = view
        self.changed = asyncio.Event()
        self.broker: BrokerClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._offset = -1  # the last stream offset folded into the view

    def _touch(self) -> None:
        self.changed.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow_events()), asyncio.create_task(self._poll_queues())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.close()

    async def _follow_events(self) -> None:
        import aiormq.exceptions

        while True:
            try:
                if self.broker is None:
                    self.broker = await BrokerClient.open(self.settings, name="qflare-dashboard", declare=False)
                await self._consume(self.broker)
                self.view.broker_error = None
                self._touch()
                return  # consuming; the robust connection keeps it going
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.view.broker_error = (f"no events stream in namespace {self.view.namespace!r} yet "
                                          "(has a coordinator run there?)")
            except (BrokerUnavailable, BrokerAccessRefused) as exc:
                self.view.broker_error = str(exc)
            except TRANSIENT as exc:
                self.view.broker_error = f"broker: {exc}"
            self._touch()
            await asyncio.sleep(RETRY_SECONDS)

    async def _consume(self, broker: BrokerClient) -> None:
        ch = await broker.connection.channel()
        await ch.set_qos(prefetch_count=200)  # a stream is read with a prefetch and acks
        try:
            stream = await ch.declare_queue(broker.names.events_stream, passive=True)
        except BaseException:
            with contextlib.suppress(Exception):
                await ch.close()
            raise

        async def on(message) -> None:
            offset = (message.headers or {}).get("x-stream-offset")
            if isinstance(offset, int):
                # after a reconnect the robust channel consumes again from "first": skip what was seen
                if offset <= self._offset:
                    await message.ack()
                    return
                self._offset = offset
            try:
                self.view.apply(decode_event(message.body, message.content_type))
                self._touch()
            except CodecError:
                pass
            await message.ack()

        await stream.consume(on, arguments={"x-stream-offset": "first"})

    async def _poll_queues(self) -> None:
        api = management_api(self.settings)
        vhost = vhost_of(self.settings.amqp_url)
        while True:
            try:
                rows = await asyncio.to_thread(queue_figures, api, self.view.namespace, vhost)
                self.view.set_queues(rows)
            except BrokerAdminError as exc:
                self.view.set_queues(None, str(exc))
            except Exception as exc:  # noqa: BLE001 - the page says so; the feed goes on
                log.warning("queue figures failed: %s", exc)
                self.view.set_queues(None, f"{type(exc).__name__}: {exc}")
            self._touch()
            await asyncio.sleep(QUEUE_POLL_SECONDS)
