"""Devices that come and go: availability traces, and a simulated fleet that follows one.

A trace says, per device, when it is online: intervals ``[start, end)`` in seconds from the
run's start. :func:`exponential` draws one where each device alternates online and offline
periods of exponential length, so that a ``offline_fraction`` of the fleet is offline at any
moment on average (the stationary share of an on/off process: mean off / (mean on + mean
off)); :func:`load` reads one from a file. Both are pure.

:class:`IntermittentFleet` runs the devices of a trace for real: each has its own broker
connection, opened when it comes online (it then catches up from the models stream and
resends its outbox) and closed when it goes offline, so the broker sees it leave.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from broker.messaging import TRANSIENT
from common.settings import Settings
from common.training import TaskRunner
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox

log = logging.getLogger("qflare.availability")

Intervals = tuple[tuple[float, float], ...]


class TraceError(ValueError):
    """A trace file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Trace:
    """When each device is online, over ``[0, horizon)`` seconds."""

    horizon: float
    online: tuple[Intervals, ...]

    @property
    def devices(self) -> int:
        return len(self.online)

    def is_online(self, device: int, t: float) -> bool:
        return any(a <= t < b for a, b in self.online[device])

    def offline_fraction(self, t: float) -> float:
        """The share of devices offline at ``t``."""
        return 1.0 - sum(self.is_online(i, t) for i in range(self.devices)) / max(1, self.devices)

    def mean_offline_fraction(self) -> float:
        """The share of device-time spent offline over the horizon."""
        on = sum(b - a for iv in self.online for a, b in iv)
        return 1.0 - on / (self.horizon * max(1, self.devices))

    def transitions(self, device: int) -> list[tuple[float, bool]]:
        """(time, online after it) for each change of the device's state, in order."""
        out: list[tuple[float, bool]] = []
        for a, b in self.online[device]:
            out.append((a, True))
            if b < self.horizon:
                out.append((b, False))
        return out

    def as_json(self) -> dict:
        return {"horizon": self.horizon, "devices": [[[round(a, 3), round(b, 3)] for a, b in iv]
                                                     for iv in self.online]}


def _merge(intervals: Sequence[tuple[float, float]], horizon: float) -> Intervals:
    """Sorted, clipped to [0, horizon), empty ones dropped, touching or overlapping ones merged."""
    out: list[list[float]] = []
    for a, b in sorted((max(0.0, float(a)), min(float(horizon), float(b))) for a, b in intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def exponential(devices: int, horizon: float, offline_fraction: float, mean_online: float,
                seed: int = 0) -> Trace:
    """Each device alternates online periods of mean ``mean_online`` seconds and offline ones of
    mean ``mean_online * f / (1 - f)``; it starts online with probability ``1 - f`` (the process's
    stationary state), so a share ``f`` of devices is offline at any moment on average."""
    if not 0.0 <= offline_fraction < 1.0:
        raise ValueError(f"offline_fraction must be in [0, 1), got {offline_fraction}")
    if horizon <= 0 or mean_online <= 0 or devices < 0:
        raise ValueError("devices >= 0, horizon > 0 and mean_online > 0 are needed")
    rng = np.random.default_rng(seed)
    mean_offline = mean_online * offline_fraction / (1.0 - offline_fraction)
    online = []
    for _ in range(devices):
        t, up, iv = 0.0, bool(rng.random() >= offline_fraction), []
        while t < horizon:
            if up:
                d = float(rng.exponential(mean_online))
                iv.append((t, t + d))
            else:
                d = float(rng.exponential(mean_offline)) if mean_offline > 0 else 0.0
            t += d
            up = not up
        online.append(_merge(iv, horizon))
    return Trace(float(horizon), tuple(online))


def load(path: Path, devices: int | None = None) -> Trace:
    """A trace from JSON ``{"horizon": s, "devices": [[[start, end], ...], ...]}`` (one list of
    online intervals per device, in seconds). With ``devices``, the file must hold that many."""
    try:
        data = json.loads(Path(path).read_text())
        horizon = float(data["horizon"])
        raw = data["devices"]
        online = tuple(_merge([(float(a), float(b)) for a, b in iv], horizon) for iv in raw)
    except FileNotFoundError:
        raise TraceError(f"trace file {str(path)!r} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"trace file {str(path)!r}: expected {{\"horizon\": seconds, \"devices\": "
                         f"[[[start, end], ...], ...]}} ({type(exc).__name__}: {exc})") from None
    if horizon <= 0:
        raise TraceError(f"trace file {str(path)!r}: horizon must be > 0")
    if devices is not None and len(online) != devices:
        raise TraceError(f"trace file {str(path)!r} describes {len(online)} devices, not {devices}")
    return Trace(horizon, online)


class IntermittentFleet:
    """Devices that follow a trace: each its own connection and :class:`Fleet`, open only
    while the trace says it is online. ``counts`` tallies connections opened and closed."""

    def __init__(self, settings: Settings, trace: Trace, members: Sequence[Member], outbox_dir: Path,
                 task: TaskRunner) -> None:
        if len(members) != trace.devices:
            raise ValueError(f"{len(members)} devices for a trace of {trace.devices}")
        self.settings = settings
        self.trace = trace
        self.fleets: list[Fleet] = []
        for m in members:
            f = Fleet(None, Outbox(outbox_dir / f"outbox-{m.device.device_id}.sqlite3"), task=task,  # type: ignore[arg-type]
                      settings=settings)
            f.add(m)
            f.paused = True
            self.fleets.append(f)
        self.counts = {"connects": 0, "disconnects": 0}
        self._tasks: list[asyncio.Task] = []

    def start(self, t0: float | None = None) -> None:
        """Follow the trace from ``t0`` (monotonic; default now)."""
        t0 = time.monotonic() if t0 is None else t0
        self._tasks = [asyncio.create_task(self._follow(i, t0)) for i in range(self.trace.devices)]

    async def _follow(self, i: int, t0: float) -> None:
        for at, up in self.trace.transitions(i):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if up:
                await self._online(i)
            else:
                await self._offline(i)

    async def _online(self, i: int) -> None:
        fleet = self.fleets[i]
        device_id = next(iter(fleet.members))
        try:
            fleet.broker = await BrokerClient.open(self.settings, name=f"qflare-sim-{device_id}", declare=False,
                                                   robust=False)
            self.counts["connects"] += 1
            fleet.paused = False
            await fleet.listen()  # catches up from the models stream
            await fleet.flush()  # what it trained but could not send before it left
            log.debug("%s online", device_id)
        except TRANSIENT as exc:
            log.info("%s could not come online (%s)", device_id, exc)

    async def _offline(self, i: int) -> None:
        fleet = self.fleets[i]
        fleet.paused = True
        if fleet.broker is not None:
            broker, fleet.broker = fleet.broker, None
            try:
                await broker.close()
            except TRANSIENT:
                pass
            self.counts["disconnects"] += 1

    def built(self) -> dict[str, int]:
        """Updates built and their bytes, summed over the devices."""
        out = {"updates": 0, "payload_bytes": 0, "message_bytes": 0}
        for f in self.fleets:
            for k in out:
                out[k] += f.built[k]
        return out

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for f in self.fleets:
            f.paused = True
        for f in self.fleets:
            await asyncio.gather(*list(f._tasks), return_exceptions=True)
        for i in range(len(self.fleets)):
            await self._offline(i)
        for f in self.fleets:
            f.outbox.close()
