"""Queue figures from the RabbitMQ management API: depth, consumers and rates per queue.

The API's address comes from settings (:meth:`ManagementApi.from_settings`). Read-only.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from broker.users import ManagementApi
from common.settings import Settings


def management_api(settings: Settings) -> ManagementApi:
    """The management API of the broker ``settings.amqp_url`` points at."""
    return ManagementApi.from_settings(settings)


def _rate(stats: dict, key: str) -> float:
    return round(float((stats.get(f"{key}_details") or {}).get("rate", 0.0)), 2)


def queue_figures(api: ManagementApi, namespace: str, vhost: str = "/") -> list[dict[str, Any]]:
    """The namespace's shared queues (not clients' private ones): messages, consumers, rates/s."""
    rows = api.request("GET", f"/api/queues/{urllib.parse.quote(vhost, safe='')}"
                              "?columns=name,type,messages,messages_ready,messages_unacknowledged,consumers,"
                              "message_stats")
    out = []
    for q in rows or []:
        name = q.get("name", "")
        if not name.startswith(namespace + ".") or name.startswith(f"{namespace}.client."):
            continue
        stats = q.get("message_stats") or {}
        out.append({"queue": name, "type": q.get("type"), "messages": q.get("messages") or 0,
                    "unacked": q.get("messages_unacknowledged") or 0, "consumers": q.get("consumers") or 0,
                    "publish_rate": _rate(stats, "publish"), "deliver_rate": _rate(stats, "deliver_get"),
                    "ack_rate": _rate(stats, "ack")})
    return sorted(out, key=lambda r: r["queue"])
