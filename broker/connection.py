"""Connecting to RabbitMQ: one robust connection per process, TLS from settings.

Robustness (reconnect, re-declare, re-consume) is a property of aio-pika's robust
connection and channels, not something handlers deal with. With several broker URLs (the
nodes of one cluster, ``Settings.amqp_urls``) a connection fails over: each attempt tries
every URL in turn, starting after the node it last used, so a dead node is tried last.
"""

from __future__ import annotations

import logging
import re
import ssl

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from broker import framing
from broker.principals import refuse_remote_guest
from common.settings import Settings


class BrokerUnavailable(Exception):
    """No broker answered; the message says where and how to start one, ``cause`` what failed."""

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause or message


class BrokerTlsError(BrokerUnavailable):
    """The TLS handshake failed: the message names the CA or certificate that did not verify."""


#: OpenSSL's text inside ``[SSL: CODE] text (_ssl.c:N)``.
_SSL_TEXT = re.compile(r"\[SSL: ([A-Z0-9_]+)\] ([^(]*?)\s*\(_ssl")
#: Alerts a broker sends when it refuses the client's certificate.
_CLIENT_CERT_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "CERTIFICATE_UNKNOWN",
                       "CERTIFICATE_EXPIRED", "HANDSHAKE_FAILURE")


def tls_failure(settings: Settings, exc: BaseException) -> BrokerTlsError | None:
    """A one-line :class:`BrokerTlsError` for a TLS handshake failure, else None.

    Says which side failed: the broker's certificate against our CA file, or our client
    certificate refused by the broker.
    """
    b, where = settings.broker, redact(settings.amqp_url)
    m = _SSL_TEXT.search(str(exc))
    if m is None:
        if b.cert_file and settings.amqp_url.startswith("amqps://") and "reset" in str(exc).lower():
            # TLS 1.3: the broker checks our certificate after the handshake and may just hang up
            return BrokerTlsError(f"TLS: the broker at {where} hung up right after the handshake: it probably "
                                  f"refused client certificate {b.cert_file} (connection reset). It must be "
                                  "signed by a CA the broker trusts.")
        return None
    code, text = m.group(1), m.group(2).strip()
    if code == "CERTIFICATE_VERIFY_FAILED":
        ca = f"CA file {b.ca_file}" if b.ca_file else "the system's CA store (broker.ca_file is not set)"
        return BrokerTlsError(f"TLS: the certificate of the broker at {where} is not trusted by {ca}: {text}. "
                              "Set broker.ca_file to the CA that signed the broker's certificate.")
    if any(code.endswith(alert) for alert in _CLIENT_CERT_ALERTS):
        cert = f"client certificate {b.cert_file}" if b.cert_file else "no client certificate (broker.cert_file)"
        return BrokerTlsError(f"TLS: the broker at {where} refused {cert}: {text}. "
                              "It must be signed by a CA the broker trusts.")
    return BrokerTlsError(f"TLS handshake with the broker at {where} failed: {code} {text}")


class BrokerAccessRefused(Exception):
    """The broker answered but refused this user (wrong password, no access to the vhost, or
    an operation its permissions do not allow); the message names the user."""


def broker_user(settings: Settings) -> str:
    from yarl import URL

    return URL(settings.amqp_url).user or "guest"


def refused(settings: Settings, exc: BaseException) -> BrokerAccessRefused:
    """An ACCESS_REFUSED from the broker, as one line naming the user and what was refused."""
    text = str(exc.args[-1] if getattr(exc, "args", None) else exc).replace("\n", " ")
    return BrokerAccessRefused(f"access_refused: the broker refused user {broker_user(settings)!r}: {text}")


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


log = logging.getLogger("qflare.broker")

#: aio-pika's robust connection opens each transport here; :class:`FailoverConnection` wraps
#: it to pick the URL per attempt (checked when a failover connection is made).
_CONNECT_TRANSPORT = "_RobustConnection__connect_transport"
#: Answers that every node of a cluster would give alike: trying the next node cannot help.
_FINAL = (aio_pika.exceptions.AuthenticationError, aio_pika.exceptions.ProbableAuthenticationError)


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over several URLs of one cluster.

    Every (re)connection attempt tries each URL once: the first connection from the first URL,
    later ones from the URL after the one in use when the link was lost. Channels, queues and
    consumers are then restored on the node that answered, as on any robust reconnect.
    """

    def __init__(self, urls: list[str], **kwargs: object) -> None:
        if not hasattr(aio_pika.RobustConnection, _CONNECT_TRANSPORT):  # pragma: no cover - aio-pika changed
            raise RuntimeError(f"aio-pika {aio_pika.__version__} has no RobustConnection.{_CONNECT_TRANSPORT}: "
                               "broker failover over several URLs needs an update of broker/connection.py")
        self.urls = [URL(u) for u in urls]
        self.at: int | None = None  # index of the URL of the last transport that came up
        self.failovers = 0
        super().__init__(self.urls[0], **kwargs)

    async def _RobustConnection__connect_transport(self) -> None:  # aio-pika's private name, mangled
        n = len(self.urls)
        start = 0 if self.at is None else (self.at + 1) % n
        last: BaseException | None = None
        for k in range(n):
            i = (start + k) % n
            self.url = self.urls[i]
            try:
                await getattr(aio_pika.RobustConnection, _CONNECT_TRANSPORT)(self)
            except _FINAL:
                raise
            except CONNECTION_EXCEPTIONS as exc:
                log.info("broker node %s does not answer (%s: %s)", self, type(exc).__name__, exc)
                last = exc
                continue
            if self.at is not None and i != self.at:
                self.failovers += 1
                log.warning("failed over to broker node %s", self)
            self.at = i
            return
        assert last is not None
        raise last


#: The URL list → index of the URL the last plain connection used (a reconnect starts after it).
_last_plain: dict[tuple[str, ...], int] = {}


def where(settings: Settings) -> str:
    """Every broker URL, passwords hidden, for messages."""
    return ", ".join(redact(u) for u in settings.amqp_urls)


async def connect(settings: Settings, *, name: str = "qflare", timeout: float = 5.0,
                  robust: bool = True) -> AbstractRobustConnection:
    """Open a connection, or raise :class:`BrokerUnavailable` with a clear reason.

    ``guest`` is refused for a broker on another host (one line saying how to provision users).
    ``robust`` connections reconnect by themselves every ``recovery.reconnect_seconds``;
    a plain one (``robust=False``) ends at the first outage, for callers that run their own
    reconnect loop (``qflare agent run``'s backoff).
    """
    framing.install()  # delivered bodies in one copy (broker/framing.py)
    urls = settings.amqp_urls
    for url in urls:
        refusal = refuse_remote_guest(url)
        if refusal is not None:
            raise BrokerUnavailable(refusal)
    props = {"connection_name": name}
    try:
        if not robust:
            return await _connect_plain(settings, urls, timeout, props)
        if len(urls) == 1:
            return await aio_pika.connect_robust(
                settings.amqp_url, ssl_context=tls_context(settings), timeout=timeout, client_properties=props,
                reconnect_interval=settings.recovery.reconnect_seconds,
            )
        conn = FailoverConnection(urls, ssl_context=tls_context(settings), client_properties=props,
                                  reconnect_interval=settings.recovery.reconnect_seconds)
        await conn.connect(timeout=timeout)
        return conn
    except _FINAL:
        vhost = URL(settings.amqp_url).path.lstrip("/") or "/"
        raise BrokerAccessRefused(
            f"access_refused: the broker at {redact(settings.amqp_url)} refused user {broker_user(settings)!r} "
            f"(wrong password, or no access to vhost {vhost!r})") from None
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
        tls = tls_failure(settings, exc)
        if tls is not None:
            raise tls from None
        cause = f"{type(exc).__name__}: {exc}"
        raise BrokerUnavailable(
            f"no RabbitMQ answers at {where(settings)} ({cause}). "
            "Start one with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`), "
            "or point QFLARE_AMQP_URL at yours.", cause
        ) from None


async def _connect_plain(settings: Settings, urls: list[str], timeout: float, props: dict) -> aio_pika.Connection:
    """A plain connection to the first URL that answers, starting after the one used last time."""
    key = tuple(urls)
    start = (_last_plain[key] + 1) % len(urls) if key in _last_plain else 0
    last: BaseException | None = None
    for k in range(len(urls)):
        i = (start + k) % len(urls)
        try:
            conn = await aio_pika.connect(urls[i], ssl_context=tls_context(settings), timeout=timeout,
                                          client_properties=props)
        except _FINAL:
            raise
        except CONNECTION_EXCEPTIONS as exc:
            if len(urls) > 1:
                log.info("broker node %s does not answer (%s: %s)", redact(urls[i]), type(exc).__name__, exc)
            last = exc
            continue
        if len(urls) > 1 and key in _last_plain and _last_plain[key] != i:
            log.warning("connected to broker node %s", redact(urls[i]))
        _last_plain[key] = i
        return conn
    assert last is not None
    raise last
