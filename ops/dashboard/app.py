"""``qflare dashboard``: a read-only web page of the fleet, rounds, queues, enclave and dead
letters, updated live with server-sent events.

Every asset is served from ``ops/dashboard/static`` (no CDN). The page and its data need the
operator credential (``dashboard.token``): a login form sets an HttpOnly, SameSite=Strict
session cookie; scripts may send ``Authorization: Bearer <token>`` instead. Tokens are
compared in constant time. Only GET routes (and the login POST) exist: nothing here changes
the deployment.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common import webserver
from common.settings import Settings
from ops.dashboard.feed import Feed
from ops.dashboard.state import FleetView

log = logging.getLogger("qflare.dashboard")
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "qflare_dashboard"
#: Snapshots are sent at most this often per client; a heartbeat comment keeps proxies open.
PUSH_INTERVAL = 0.25
HEARTBEAT_SECONDS = 15.0
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}


class DashboardConfigError(Exception):
    """The dashboard cannot start as configured (e.g. no operator credential)."""


class Credential:
    """The operator credential and the sessions it opened (in memory: a restart logs out)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._sessions: set[str] = set()

    def check(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self._token)

    def open_session(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._sessions.add(sid)
        return sid

    def allows(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return self.check(auth[7:].strip())
        sid = request.cookies.get(COOKIE, "")
        return any(hmac.compare_digest(sid.encode(), s.encode()) for s in self._sessions) if sid else False


def build_app(view: FleetView, changed: asyncio.Event, credential: Credential) -> Starlette:
    """The Starlette app over ``view``; ``changed`` is set whenever the view moved."""
    waiters: set[asyncio.Event] = set()

    async def fan_out() -> None:
        while True:
            await changed.wait()
            changed.clear()
            for w in list(waiters):
                w.set()
            await asyncio.sleep(PUSH_INTERVAL)

    fan_task: list[asyncio.Task] = []

    def secured(resp: Response) -> Response:
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def denied(request: Request) -> Response:
        if request.url.path.startswith("/api/"):
            return secured(JSONResponse({"error": "unauthorized: log in with the operator token"}, status_code=401))
        return secured(RedirectResponse("/login", status_code=303))

    async def index(request: Request) -> Response:
        if not credential.allows(request):
            return denied(request)
        return secured(FileResponse(STATIC / "index.html"))

    async def login_page(_: Request) -> Response:
        return secured(FileResponse(STATIC / "login.html"))

    async def login(request: Request) -> Response:
        body = await request.body()  # a urlencoded form; parsed here (no multipart dependency)
        token = urllib.parse.parse_qs(body[:4096].decode("utf-8", "replace")).get("token", [""])[0]
        if not credential.check(token):
            log.warning("dashboard login refused from %s", request.client.host if request.client else "?")
            return secured(RedirectResponse("/login?refused=1", status_code=303))
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, credential.open_session(), httponly=True, samesite="strict", path="/")
        return secured(resp)

    async def state(request: Request) -> Response:
        if not credential.allows(request):
            return denied(request)
        return secured(JSONResponse(view.snapshot()))

    async def stream(request: Request) -> Response:
        if not credential.allows(request):
            return denied(request)
        if not fan_task or fan_task[0].done():
            fan_task[:] = [asyncio.create_task(fan_out())]
        mine = asyncio.Event()
        waiters.add(mine)

        async def events() -> AsyncIterator[str]:
            try:
                yield f"event: state\ndata: {json.dumps(view.snapshot())}\n\n"
                while True:
                    try:
                        await asyncio.wait_for(mine.wait(), HEARTBEAT_SECONDS)
                    except TimeoutError:
                        yield ": ping\n\n"
                        continue
                    mine.clear()
                    yield f"event: state\ndata: {json.dumps(view.snapshot())}\n\n"
            finally:
                waiters.discard(mine)

        return secured(StreamingResponse(events(), media_type="text/event-stream",
                                         headers={"X-Accel-Buffering": "no"}))

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive", "service": "dashboard"})

    return Starlette(routes=[
        Route("/", index), Route("/login", login_page, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/api/state", state), Route("/api/stream", stream), Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])


async def serve(settings: Settings, ready: asyncio.Future | None = None) -> None:
    """Run the dashboard until cancelled (``ready`` receives the bound port)."""
    d = settings.dashboard
    if d.token is None or not d.token.get_secret_value():
        raise DashboardConfigError("dashboard.token: the operator credential is required "
                                   "(set QFLARE_DASHBOARD__TOKEN or dashboard.token)")
    view = FleetView(settings.broker.namespace)
    feed = Feed(settings, view)
    app = build_app(view, feed.changed, Credential(d.token.get_secret_value()))
    server = await webserver.start(app, d.host, d.port, "dashboard.port")
    feed.start()
    log.info("dashboard started: namespace %s, http://%s:%d/", view.namespace, d.host, server.port,
             extra={"namespace": view.namespace, "http_port": server.port})
    if ready is not None:
        ready.set_result(server.port)
    try:
        await asyncio.Event().wait()
    finally:
        await feed.stop()
        await server.stop()
