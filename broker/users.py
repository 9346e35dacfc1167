"""Per-device broker users, confined by RabbitMQ permissions (docs/architecture.md, Broker topology).

A device's user may publish updates only under its own routing key (a topic permission on
the updates exchange), send requests to the coordinator, and read the models fanout, the
models stream and the server-named queues it declares for itself. It cannot publish to the
control, events or dead-letter exchanges, nor read the updates, control or coordinator
queues. Users are managed over the RabbitMQ management HTTP API (standard library only).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from schemas.names import Names


class BrokerAdminError(Exception):
    """The management API refused or could not be reached; the message says what to do."""


@dataclass(frozen=True)
class ManagementApi:
    base_url: str  # e.g. http://127.0.0.1:15672
    user: str
    password: str

    @classmethod
    def from_amqp_url(cls, amqp_url: str, port: int = 15672) -> ManagementApi:
        u = urllib.parse.urlsplit(amqp_url)
        scheme = "https" if u.scheme == "amqps" else "http"
        return cls(f"{scheme}://{u.hostname or '127.0.0.1'}:{port}", urllib.parse.unquote(u.username or "guest"),
                   urllib.parse.unquote(u.password or "guest"))

    def request(self, method: str, path: str, body: dict | None = None) -> object:
        req = urllib.request.Request(self.base_url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raise BrokerAdminError(f"management API {method} {path}: HTTP {exc.code} {exc.read()[:200]!r}") from None
        except OSError as exc:
            raise BrokerAdminError(
                f"management API at {self.base_url} does not answer ({exc}); enable it with "
                "`rabbitmq-plugins enable rabbitmq_management`") from None


def device_permissions(names: Names, device_id: str) -> dict[str, dict[str, str]]:
    """The vhost and topic permissions of one device's user (pure).

    The device's own queues are those under ``names.client_queues_prefix(device_id)``
    (its RPC reply queue and its model feed; the agent names them so).
    """
    ns = re.escape(names.namespace)
    own = re.escape(names.client_queues_prefix(device_id)) + ".*"
    return {
        "permissions": {
            "configure": f"^{own}$",
            "write": f"^({ns}\\.rpc|{ns}\\.updates|{own})$",
            "read": f"^({ns}\\.models|{ns}\\.models\\.latest|{own})$",
        },
        "topic": {"exchange": names.updates_exchange,
                  "write": f"^{re.escape(Names.update_key(device_id))}$", "read": "^$"},
    }


def broker_username(device_id: str) -> str:
    """The broker user of a device: prefixed, so no device id can name an operator account."""
    return f"qflare-device-{device_id}"


def _vhost(vhost: str) -> str:
    return urllib.parse.quote(vhost, safe="")


def create_device_user(api: ManagementApi, names: Names, device_id: str, password: str, vhost: str = "/") -> str:
    """Create (or reset) the device's user with the device's permissions; returns its name."""
    perms = device_permissions(names, device_id)
    name = broker_username(device_id)
    user = urllib.parse.quote(name, safe="")
    api.request("PUT", f"/api/users/{user}", {"password": password, "tags": ""})
    api.request("PUT", f"/api/permissions/{_vhost(vhost)}/{user}", perms["permissions"])
    api.request("PUT", f"/api/topic-permissions/{_vhost(vhost)}/{user}", perms["topic"])
    return name


def delete_device_user(api: ManagementApi, device_id: str) -> None:
    api.request("DELETE", f"/api/users/{urllib.parse.quote(broker_username(device_id), safe='')}")
