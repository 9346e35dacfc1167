"""``/healthz``, ``/readyz`` and ``/metrics`` of a service, on its own port.

``/healthz`` answers 200 while the process serves HTTP at all (a liveness probe: restart me
if this fails). ``/readyz`` runs the service's readiness checks (broker connected, attested,
registry or store usable) and answers 503 naming the first failing check, so an operator,
compose or Kubernetes sees *why*. ``/metrics`` is the Prometheus exposition; any other path
is 404.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from common import webserver

#: A check answers ``None`` when fine, or one line saying what is wrong.
CheckFn = Callable[[], str | None | Awaitable[str | None]]


@dataclass(frozen=True)
class Check:
    name: str
    run: CheckFn


async def readiness(checks: list[Check], timeout: float = 2.0) -> tuple[bool, dict]:
    """Run every check (each bounded by ``timeout``); ready only when all pass."""
    results: dict[str, str] = {}
    failing = None
    for check in checks:
        try:
            answer = check.run()
            if inspect.isawaitable(answer):
                answer = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            answer = f"no answer within {timeout:g}s"
        except Exception as exc:  # noqa: BLE001 - a failing check is a finding, not a crash
            answer = f"{type(exc).__name__}: {exc}"
        results[check.name] = "ok" if answer is None else str(answer)
        if answer is not None and failing is None:
            failing = check.name
    body = {"status": "ready" if failing is None else "not ready", "checks": results}
    if failing is not None:
        body["failing"] = failing
        body["reason"] = f"{failing}: {results[failing]}"
    return failing is None, body


def health_app(service: str, checks: list[Check], registry: CollectorRegistry) -> Starlette:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive", "service": service})

    async def readyz(_: Request) -> Response:
        ok, body = await readiness(checks)
        return JSONResponse({"service": service, **body}, status_code=200 if ok else 503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(_: Request, __: Exception) -> Response:
        return PlainTextResponse("not found: try /healthz, /readyz or /metrics\n", status_code=404)

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)],
                     exception_handlers={404: not_found})


async def serve(service: str, checks: list[Check], registry: CollectorRegistry, host: str, port: int | None,
                setting: str) -> webserver.RunningServer | None:
    """Start the health endpoint in this event loop (None when ``port`` is None: off)."""
    if port is None:
        return None
    return await webserver.start(health_app(service, checks, registry), host, port, setting)


def broker_check(get_broker: Callable[[], object | None]) -> Check:
    """Connected to the broker, with its channel open (the robust connection may be reconnecting)."""

    def run() -> str | None:
        broker = get_broker()
        if broker is None:
            return "not connected yet"
        conn = broker.connection
        if conn.is_closed or not getattr(conn, "connected", None) or not conn.connected.is_set():
            return "connection lost; reconnecting"
        if broker.channel.is_closed:
            return "channel closed"
        return None

    return Check("broker", run)
