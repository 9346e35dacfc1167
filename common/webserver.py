"""Serving a Starlette app with uvicorn inside the caller's event loop.

The socket is bound here, so a port already in use is one clear error naming the setting
(not uvicorn's ``sys.exit``), port 0 picks a free port (read it back from ``.port``), and
uvicorn's signal handlers are left out: the service that embeds the server owns Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp


class PortInUse(Exception):
    """The configured port cannot be bound; the message names the setting to change."""


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningServer:
    server: uvicorn.Server
    task: asyncio.Task
    host: str
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 5)


def bind(host: str, port: int, setting: str) -> socket.socket:
    """A listening socket on ``host:port``, or :class:`PortInUse` naming ``setting``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"{setting}: cannot listen on {host}:{port} ({exc.strerror}); "
                        f"choose another port") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start(app: ASGIApp, host: str, port: int, setting: str) -> RunningServer:
    """Start serving ``app``; returns once the socket is bound."""
    sock = bind(host, port, setting)
    # a short graceful shutdown: server-sent event streams never end by themselves
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            timeout_graceful_shutdown=1)
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    return RunningServer(server, task, host, sock.getsockname()[1])
