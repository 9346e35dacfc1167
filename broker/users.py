"""Broker users, their permissions and the limits around them (docs/security.md, Broker identities).

Every principal has its own user, named within the namespace (``Names.service_user``,
``Names.device_user``). A device's user may publish updates only under its own routing key
(a topic permission on the updates exchange), send requests to the coordinator, and read
the models fanout, the models stream and its own queues; the services' users may each write
only the exchanges their role publishes to and read only the queues it consumes. Users,
policies and limits are managed over the RabbitMQ management HTTP API (standard library
only); nothing here overwrites a user it did not make unless told to.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from common.settings import Settings
from schemas.names import Names

#: The roles a service user can play; devices have users of their own kind.
ROLES = ("coordinator", "enclave", "operator")
#: Management API port when the settings name none (RabbitMQ's default, http and https alike).
MANAGEMENT_PORT = 15672
#: Priority of the namespace's client queue policies (a deployment's own policies may go above).
POLICY_PRIORITY = 10


class BrokerAdminError(Exception):
    """The management API refused or could not be reached; the message says what to do."""


class UserExists(BrokerAdminError):
    """A user of that name exists with other permissions (another deployment's, or hand-made)."""


@dataclass(frozen=True)
class ManagementApi:
    base_url: str  # e.g. http://127.0.0.1:15672, never with credentials
    user: str = field(repr=False)
    password: str = field(repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> ManagementApi:
        """``broker.management_url``, or the AMQP host on port 15672 (https when amqps).

        Credentials come from the management URL when it has them, else from the AMQP URL.
        """
        amqp = urllib.parse.urlsplit(settings.amqp_url)
        url = urllib.parse.urlsplit(settings.broker.management_url or "")
        if not url.scheme:
            scheme = "https" if amqp.scheme == "amqps" else "http"
            url = urllib.parse.urlsplit(f"{scheme}://{_host(amqp.hostname or '127.0.0.1')}:{MANAGEMENT_PORT}")
        creds = url if url.username else amqp
        ctx = None
        if url.scheme == "https":
            ca = settings.broker.ca_file
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        base = f"{url.scheme}://{_host(url.hostname or '127.0.0.1')}" + (f":{url.port}" if url.port else "")
        return cls(base + url.path.rstrip("/"), urllib.parse.unquote(creds.username or "guest"),
                   urllib.parse.unquote(creds.password or "guest"), ctx)

    def request(self, method: str, path: str, body: dict | None = None) -> object:
        req = urllib.request.Request(self.base_url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl_context) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raise BrokerAdminError(f"management API {method} {self.base_url}{path}: HTTP {exc.code} "
                                   f"{exc.read()[:200]!r}") from None
        except OSError as exc:
            raise BrokerAdminError(
                f"management API at {self.base_url} does not answer ({exc}); enable it with "
                "`rabbitmq-plugins enable rabbitmq_management`, or set broker.management_url") from None

    def get(self, path: str) -> object | None:
        """GET, or None when the resource does not exist."""
        try:
            return self.request("GET", path)
        except BrokerAdminError as exc:
            if ": HTTP 404 " in str(exc):
                return None
            raise


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when its path is empty or ``/``)."""
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


# --- permissions (pure) --------------------------------------------------------------------


def _any(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def _union(*regexes: str) -> str:
    return "^(" + "|".join(r.removeprefix("^").removesuffix("$") for r in regexes) + ")$"


#: Unnamed queues (a service's exclusive event listener): named by the broker (``amq.gen-*``)
#: or by aio-pika (``amq_<uuid hex>``); no device may configure either.
SERVER_NAMED = r"^(amq\.gen-.*|amq_[0-9a-f]{32})$"


def service_permissions(names: Names, role: str) -> dict[str, str]:
    """The vhost permissions of the coordinator's, the enclave's or the operator's user (pure).

    Each may (re)declare the namespace's topology (configure it, bind its queues) and its own
    server-named queues; what it may publish to and consume from is its role's alone.
    """
    n = names
    exchanges = _any(*n.topology_exchanges)
    queues = _union(_any(*n.topology_queues, n.partials_queue), f"^{n.shard_queues_pattern}$")
    publishes = {
        "coordinator": ("amq.default", n.control_exchange, n.events_exchange, n.dlx),  # replies, control
        "enclave": (n.rpc_exchange, n.models_exchange, n.events_exchange, n.dlx),
        "operator": (n.operator_exchange, n.rpc_exchange),
    }[role]
    consumes = {
        "coordinator": (n.coordinator_queue, n.operator_queue),
        "enclave": (n.updates_queue, n.enclave_control_queue, n.models_stream, n.partials_queue),
        "operator": (n.dead_letter_queue, n.models_stream, n.events_stream),  # the dashboard replays events
    }[role]
    consumes_re = _any(*consumes)
    if role == "enclave":  # sharded enclaves (docs/scaling.md): each shard's own queues
        consumes_re = _union(consumes_re, f"^{n.shard_queues_pattern}$")
    return {
        "configure": _union(exchanges, queues, SERVER_NAMED),
        "write": _union(_any(*publishes), queues, SERVER_NAMED),
        "read": _union(consumes_re, exchanges, SERVER_NAMED),
    }


def device_permissions(names: Names, device_id: str, shards: int = 1) -> dict[str, dict[str, str]]:
    """The vhost and topic permissions of one device's user (pure).

    The device's own queues are those under ``names.client_queues_prefix(device_id)``, which
    ends in ``:`` (no device id contains it): device ``D``'s never cover ``D.x``'s. It publishes
    updates under ``update.D`` only, or with ``shards`` > 1 under ``shard.<any index>.D``: the
    broker pins the id, the shard receiving it refuses an id that is not its own (``wrong_shard``).
    """
    own = re.escape(names.client_queues_prefix(device_id)) + ".*"
    key = (re.escape(Names.update_key(device_id)) if shards == 1
           else re.escape(Names.SHARD_UPDATE_WORD) + r"\.[0-9]+\." + re.escape(device_id))
    return {
        "permissions": {
            "configure": f"^{own}$",
            "write": _union(_any(names.rpc_exchange, names.updates_exchange), f"^{own}$"),
            "read": _union(_any(names.models_exchange, names.models_stream), f"^{own}$"),
        },
        "topic": {"exchange": names.updates_exchange,
                  "write": f"^{key}$", "read": "^$"},
    }


# --- users ---------------------------------------------------------------------------------


def _current(api: ManagementApi, user: str, vhost: str) -> tuple[dict, dict | None] | None:
    """(vhost permissions, topic permission on ``exchange``) of ``user``, or None if no such user."""
    if api.get(f"/api/users/{_q(user)}") is None:
        return None
    perms = api.get(f"/api/permissions/{_q(vhost)}/{_q(user)}") or {}
    topics = api.get(f"/api/users/{_q(user)}/topic-permissions") or []
    return ({k: perms.get(k) for k in ("configure", "write", "read")},
            {t["exchange"]: {"exchange": t["exchange"], "write": t["write"], "read": t["read"]}
             for t in topics if t.get("vhost") == vhost})


def ensure_user(api: ManagementApi, user: str, permissions: dict[str, str], password: str, *,
                topic: dict[str, str] | None = None, vhost: str = "/", rotate: bool = False,
                force: bool = False) -> str | None:
    """Create ``user`` with exactly these permissions; returns the password it now has.

    An existing user with the same permissions is left alone (None: its password unchanged)
    unless ``rotate`` gives it ``password``; one with other permissions raises
    :class:`UserExists` unless ``force`` replaces them. Nothing is ever silently overwritten.
    """
    now = _current(api, user, vhost)
    wanted_topics = {topic["exchange"]: topic} if topic else {}
    if now is not None:
        same = now[0] == permissions and now[1] == wanted_topics
        if not same and not force:
            raise UserExists(f"broker user {user} exists with other permissions (another deployment's, or "
                             "made by hand); pass --force to replace them")
        if same and not rotate:
            return None
    api.request("PUT", f"/api/users/{_q(user)}", {"password": password, "tags": ""})
    api.request("PUT", f"/api/permissions/{_q(vhost)}/{_q(user)}", permissions)
    if now is not None:
        for exchange in set(now[1]) - set(wanted_topics):
            api.request("DELETE", f"/api/topic-permissions/{_q(vhost)}/{_q(user)}?exchange={_q(exchange)}")
    if topic:
        api.request("PUT", f"/api/topic-permissions/{_q(vhost)}/{_q(user)}", topic)
    return password


def create_device_user(api: ManagementApi, names: Names, device_id: str, password: str, vhost: str = "/", *,
                       rotate: bool = False, force: bool = False, max_connections: int | None = None,
                       shards: int = 1) -> str | None:
    """Make the device's confined user (see :func:`ensure_user`); returns its password when set."""
    perms = device_permissions(names, device_id, shards)
    user = names.device_user(device_id)
    out = ensure_user(api, user, perms["permissions"], password, topic=perms["topic"], vhost=vhost,
                      rotate=rotate, force=force)
    if max_connections is not None:
        api.request("PUT", f"/api/user-limits/{_q(user)}/max-connections", {"value": max_connections})
    return out


def delete_device_user(api: ManagementApi, names: Names, device_id: str) -> None:
    api.request("DELETE", f"/api/users/{_q(names.device_user(device_id))}")


# --- policies and limits ---------------------------------------------------------------------


def client_queue_policies(names: Names, settings: Settings) -> dict[str, dict[str, object]]:
    """The namespace's policies on client queues (pure): bounded bytes and an idle expiry.

    Two, because a stream takes no policy that has ``expires``: whatever a client declares
    under ``<ns>.client.`` (a stream bound to the models fanout included) stays bounded.
    """
    b = settings.broker
    pattern = names.client_queues_pattern
    return {
        names.client_queues_policy: {
            "pattern": pattern, "apply-to": "queues", "priority": POLICY_PRIORITY + 1,
            "definition": {"max-length-bytes": b.client_queue_max_bytes, "overflow": "drop-head",
                           "expires": int(b.client_queue_expires_seconds * 1000)}},
        names.client_streams_policy: {
            "pattern": pattern, "apply-to": "queues", "priority": POLICY_PRIORITY,
            "definition": {"max-length-bytes": b.client_queue_max_bytes,
                           "stream-max-segment-size-bytes": min(b.client_queue_max_bytes, 8 * 1024 * 1024)}},
    }


def apply_policies(api: ManagementApi, names: Names, settings: Settings, vhost: str = "/") -> list[str]:
    """Set the client queue policies and, when configured, the vhost's queue cap."""
    done = []
    for name, policy in client_queue_policies(names, settings).items():
        api.request("PUT", f"/api/policies/{_q(vhost)}/{_q(name)}", policy)
        done.append(name)
    if settings.broker.vhost_max_queues is not None:
        api.request("PUT", f"/api/vhost-limits/{_q(vhost)}/max-queues", {"value": settings.broker.vhost_max_queues})
        done.append(f"max-queues={settings.broker.vhost_max_queues}")
    return done


def remove_policies(api: ManagementApi, names: Names, vhost: str = "/") -> None:
    for name in (names.client_queues_policy, names.client_streams_policy):
        try:
            api.request("DELETE", f"/api/policies/{_q(vhost)}/{_q(name)}")
        except BrokerAdminError:
            pass


# --- provisioning ------------------------------------------------------------------------------


def amqp_url_for(amqp_url: str, user: str, password: str) -> str:
    """``amqp_url`` with another user's credentials (what to hand that principal, once)."""
    u = urllib.parse.urlsplit(amqp_url)
    netloc = f"{_q(user)}:{_q(password)}@{_host(u.hostname or '127.0.0.1')}:{u.port or (5671 if u.scheme == 'amqps' else 5672)}"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path or "/", "", ""))


def cluster_url_for(settings: Settings, user: str, password: str) -> str:
    """Every broker URL of ``settings`` with that user's credentials, comma-separated (one for one node)."""
    return ",".join(amqp_url_for(u, user, password) for u in settings.amqp_urls)


def provision_services(api: ManagementApi, settings: Settings, password: Callable[[], str], *,
                       rotate: bool = False, force: bool = False) -> dict[str, str | None]:
    """``qflare broker setup``: the coordinator's, enclave's and operator's users, and the policies.

    Returns each role's user and the password it was given (None: it existed unchanged).
    """
    names = Names(settings.broker.namespace)
    vhost = vhost_of(settings.amqp_url)
    out: dict[str, str | None] = {}
    for role in ROLES:
        user = names.service_user(role)
        out[user] = ensure_user(api, user, service_permissions(names, role), password(), vhost=vhost,
                                rotate=rotate, force=force)
    apply_policies(api, names, settings, vhost)
    return out
