"""Whether this process's broker link is up, and when it last came back.

A robust connection reconnects on its own; what it does not tell its users is that it was
away. Round deadlines that fall inside an outage, and publishes that must not be lost, need
exactly that: :class:`Link` follows the connection's close and reconnect callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aio_pika.abc import AbstractConnection

log = logging.getLogger("qflare.broker")


class Link:
    """Up/down state of one connection; times are wall-clock (compared with round deadlines)."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.up = asyncio.Event()
        if not connection.is_closed:
            self.up.set()
        #: When the link last came back after an outage (None: never lost).
        self.back_at: float | None = None
        self.down_at: float | None = None
        self.outages = 0
        self.connection = connection
        connection.close_callbacks.add(self._down)
        reconnect = getattr(connection, "reconnect_callbacks", None)
        if reconnect is not None:
            reconnect.add(self._back)

    def _down(self, conn: object = None, exc: BaseException | None = None) -> None:
        if self.up.is_set():
            self.up.clear()
            self.down_at = time.time()
            if getattr(conn, "close_called", False):
                return  # closed on purpose, not an outage
            self.outages += 1
            log.warning("broker link lost (%s); waiting for it to come back", exc or type(exc).__name__)

    def _back(self, *_: object) -> None:
        self.back_at = time.time()
        away = self.back_at - (self.down_at or self.back_at)
        self.up.set()
        log.warning("broker link back after %.1f s (%s)", away, self.connection)  # the URL, password hidden

    async def wait_up(self) -> None:
        await self.up.wait()
