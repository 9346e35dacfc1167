"""Connecting to RabbitMQ: one robust connection per process, TLS from settings.

Robustness (reconnect, re-declare, re-consume) is a property of aio-pika's robust
connection and channels, not something handlers deal with.
"""

from __future__ import annotations

import ssl

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from broker.principals import refuse_remote_guest
from common.settings import Settings


class BrokerUnavailable(Exception):
    """No broker answered; the message says where and how to start one."""


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """An SSL context for ``amqps://`` URLs, with the CA and client certificate from settings."""
    if not settings.amqp_url.startswith("amqps://"):
        return None
    b = settings.broker
    ctx = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
    if b.cert_file:
        ctx.load_cert_chain(str(b.cert_file), str(b.key_file) if b.key_file else None)
    return ctx


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from yarl import URL

    u = URL(url)
    return str(u.with_password("***")) if u.password else url


async def connect(settings: Settings, *, name: str = "qflare", timeout: float = 5.0) -> AbstractRobustConnection:
    """Open a robust connection, or raise :class:`BrokerUnavailable` with a clear reason.

    ``guest`` is refused for a broker on another host (one line saying how to provision users).
    """
    refusal = refuse_remote_guest(settings.amqp_url)
    if refusal is not None:
        raise BrokerUnavailable(refusal)
    try:
        return await aio_pika.connect_robust(
            settings.amqp_url, ssl_context=tls_context(settings), timeout=timeout,
            client_properties={"connection_name": name},
        )
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(
            f"no RabbitMQ answers at {redact(settings.amqp_url)} ({type(exc).__name__}: {exc}). "
            "Start one with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`), "
            "or point QFLARE_AMQP_URL at yours."
        ) from None
