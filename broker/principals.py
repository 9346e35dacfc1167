"""Who sent a request, as the broker vouches for it, and which role that broker user plays.

Every client publishes with the AMQP ``user_id`` property, which RabbitMQ verifies equals the
connection's user; a service reads it back from each delivery (docs/security.md, Broker
identities). The checks here are pure and cheap, so they run before any crypto.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from common.settings import Settings
from schemas.names import Names
from schemas.reasons import QflareError, Reason

#: RabbitMQ's default account; usable only on a broker on this host.
GUEST = "guest"


def url_user(amqp_url: str) -> str:
    """The user an AMQP URL connects as (``guest`` when it names none, as the client library does)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).username or GUEST)


def is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guest_on_loopback(amqp_url: str) -> bool:
    """True when the URL is guest on this host: the demo's and the tests' broker."""
    return url_user(amqp_url) == GUEST and is_loopback(urllib.parse.urlsplit(amqp_url).hostname)


def refuse_remote_guest(amqp_url: str) -> str | None:
    """One line saying why (and what to do instead) when the URL is guest on another host."""
    if url_user(amqp_url) != GUEST or guest_on_loopback(amqp_url):
        return None
    host = urllib.parse.urlsplit(amqp_url).hostname
    return (f"refusing to use the guest account on {host}: guest is for a broker on this host only; "
            "provision users with `qflare broker setup` (services, operator) and `qflare device broker-user D` "
            "(each device), and set QFLARE_AMQP_URL to the one printed for this process")


def role_users(settings: Settings, role: str) -> frozenset[str]:
    """The broker users that play ``role`` (``coordinator``, ``enclave``, ``operator``).

    From ``broker.roles`` when set; else ``guest`` when this process itself is guest on
    loopback (demo, tests), else the namespace's own user for the role.
    """
    listed = getattr(settings.broker.roles, role)
    if listed:
        return frozenset(listed)
    if guest_on_loopback(settings.amqp_url):
        return frozenset({GUEST})
    return frozenset({Names(settings.broker.namespace).service_user(role)})


def require_role(settings: Settings, role: str, caller: str | None) -> None:
    """Refuse (``forbidden``) a request whose broker user does not play ``role``."""
    if caller not in role_users(settings, role):
        raise QflareError(Reason.FORBIDDEN, f"only the {role}'s broker user may send this (sent by {caller!r:.80})")


def require_device(names: Names, caller: str | None, device_id: str) -> None:
    """A device's broker user speaks only for its own device id.

    A caller that is not a device user of this namespace (guest in the demo, a simulator's
    shared user) may name any device; rate limits are then keyed by both.
    """
    if caller is None:
        raise QflareError(Reason.FORBIDDEN, "request without a broker-verified user_id")
    own = names.device_user(device_id)
    if caller != own and caller.startswith(names.device_user("")):
        raise QflareError(Reason.FORBIDDEN, f"broker user {caller:.160} may not speak for device {device_id}")


def limit_key(caller: str | None, device_id: str) -> str:
    """The rate-limit bucket of a request: who sent it (broker-verified) and for which device."""
    return f"{caller}\x00{device_id}"
