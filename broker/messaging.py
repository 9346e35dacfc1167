"""Publishing with confirms, consuming with manual acks, dead-lettering, and RPC.

The broker plumbing lives here and only here: handlers are small typed async functions
(decoded message in, decision out); acks, dead-letters with a reason header, confirms and
error replies are done by this module (after FastStream's subscribers, Dramatiq's
middleware).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from broker.link import Link
from common.events import EventFormat, envelope
from common.metrics import DEAD_LETTERED, HANDLED
from pqc.errors import QflareCryptoError
from schemas.codec import CodecError, decode, encode
from schemas.messages import ERROR_DETAIL_MAX, ErrorReply, Event, Message, Scalar
from schemas.names import BODY_BYTES_HEADER, DETAIL_HEADER, DIRECT_REPLY_TO, REASON_HEADER, Names
from schemas.reasons import QflareError, Reason, as_qflare_error

log = logging.getLogger("qflare.broker")


#: Errors that mean "the broker connection failed", not "this message is bad".
TRANSIENT = (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, ConnectionError, OSError,
             asyncio.TimeoutError)

#: A handler returns this to take over the ack (e.g. to ack a batch after one durable commit).
DEFERRED = object()

#: Seconds to wait for a publisher confirm before treating the link as broken.
CONFIRM_TIMEOUT = 30.0
#: Largest pause between attempts of :meth:`Publisher.publish_until_confirmed`.
RETRY_MAX_SECONDS = 5.0

Handler = Callable[[Message, AbstractIncomingMessage], Awaitable[object]]
#: Handles a request; the second argument is the sender's broker-verified user (``user_id``).
#: A handler's answer: a message, or its encoding where the handler builds that directly.
RpcHandler = Callable[[Message, str], Awaitable[Message | bytes]]


class Publisher:
    """Publishes encoded messages and waits for the broker's confirm of each one."""

    def __init__(self, channel: AbstractChannel, names: Names,
                 events_channel: AbstractChannel | None = None, *, dead_letter_body_bytes: int = 4096,
                 user_id: str | None = None, link: Link | None = None, source: str = "/qflare",
                 events_format: EventFormat = "json", connection: AbstractConnection | None = None) -> None:
        self.user_id = user_id  # the connection's user: RabbitMQ refuses any other
        self.channel = channel
        self.names = names
        self.events_channel = events_channel
        self.dead_letter_body_bytes = dead_letter_body_bytes
        self.link = link
        #: CloudEvents ``source`` of this process's events, e.g. ``/qflare/<namespace>/qflare-enclave``.
        self.source = source
        self.events_format: EventFormat = events_format
        self._exchanges: dict[str, AbstractExchange] = {}
        self._events_exchange: AbstractExchange | None = None
        #: Opens the channel :meth:`publish_until_confirmed` moves to after a nack.
        self.connection = connection
        #: That channel, once a nack was seen (None: the main channel).
        self.confirmed_channel: AbstractChannel | None = None
        #: Seconds :meth:`publish` waits for the broker's confirm (a test makes it tiny to force a miss).
        self.confirm_timeout = CONFIRM_TIMEOUT

    async def exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self.channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def publish(
        self, exchange: str, routing_key: str, msg: Message | bytes, *,
        headers: dict[str, Any] | None = None, message_id: str | None = None,
        correlation_id: str | None = None, reply_to: str | None = None,
        persistent: bool = True, mandatory: bool = False, content_type: str = "application/msgpack",
        channel: AbstractChannel | None = None,
    ) -> None:
        """Publish and return once the broker confirmed it (raises if it was refused).

        ``channel``: another confirming channel than the main one (never for RPC requests:
        their replies come to the channel that published)."""
        body = msg if isinstance(msg, bytes) else encode(msg)
        message = aio_pika.Message(
            body, headers=headers or {}, message_id=message_id, correlation_id=correlation_id,
            reply_to=reply_to, content_type=content_type, user_id=self.user_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        if channel is None or channel is self.channel:
            ex = await self.exchange(exchange)
        else:
            ex = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
        await ex.publish(message, routing_key, mandatory=mandatory, timeout=self.confirm_timeout)

    async def _fresh_confirmed_channel(self) -> None:
        """After a nack, a new channel for what must be confirmed: on a cluster, a channel that
        published to a queue while its leader was being elected may go on being nacked for it
        (RabbitMQ 3.10, seen in tests/test_cluster.py); a new channel is not."""
        assert self.connection is not None
        old, self.confirmed_channel = self.confirmed_channel, None
        if old is not None:
            with contextlib.suppress(*TRANSIENT, RuntimeError):
                await old.close()
        self.confirmed_channel = await self.connection.channel(publisher_confirms=True)

    async def publish_until_confirmed(self, exchange: str, routing_key: str, msg: Message | bytes, *,
                                      what: str, **kw: Any) -> None:
        """:meth:`publish`, retried across broker outages until the broker confirms it.

        For what must not be lost (a round's model and result, a round open): a failure
        waits for the link to come back and tries again; only cancellation stops it. The same
        message may then arrive twice, so its receivers must be idempotent (they are: models
        by version, rounds by id).
        """
        for attempt in itertools.count(1):
            if self.link is not None:
                await self.link.wait_up()
            try:
                await self.publish(exchange, routing_key, msg, channel=self.confirmed_channel, **kw)
                if attempt > 1:
                    log.info("%s confirmed after %d attempts", what, attempt)
                return
            except TRANSIENT as exc:
                pause = min(RETRY_MAX_SECONDS, 0.25 * 2 ** min(attempt, 8))
                nacked = isinstance(exc, aio_pika.exceptions.DeliveryError) and self.connection is not None
                log.warning("%s not confirmed (%s: %s); trying again in %.1f s%s", what, type(exc).__name__,
                            exc, pause, " on a new channel" if nacked else "")
                await asyncio.sleep(pause)
                if nacked:
                    with contextlib.suppress(*TRANSIENT, RuntimeError):
                        await self._fresh_confirmed_channel()

    async def event(self, type_: str, *, device_id: str | None = None, round_id: int | None = None,
                    reason: str | None = None, confirmed: bool = False, **detail: Scalar) -> None:
        """Emit an event on the events topic exchange (routing key = event type), as a CloudEvent.

        Persistent, so the durable events stream keeps it for consumers that replay.
        ``confirmed`` events (those that end a round, which the coordinator waits for) go on
        the confirming channel and are retried across outages; others are fire-and-forget, on a
        channel without confirms, so a handler does not wait a broker round trip per event.
        """
        detail = {k: v[:ERROR_DETAIL_MAX] if isinstance(v, str) else v for k, v in detail.items()}
        ev = Event(type=type_, at=time.time(), device_id=device_id, round_id=round_id,
                   reason=reason, detail=detail)
        env = envelope(ev, self.source, self.events_format)
        message = aio_pika.Message(
            env.body, content_type=env.content_type, headers=env.headers, message_id=env.id, type=type_,
            timestamp=ev.at, app_id=self.source.rsplit("/", 1)[-1], delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user_id)
        if confirmed:
            await self.publish_until_confirmed(self.names.events_exchange, type_, env.body, what=f"event {type_}",
                                               headers=env.headers, message_id=env.id,
                                               content_type=env.content_type)
            return
        if self.events_channel is None:
            ex = await self.exchange(self.names.events_exchange)
        else:
            if self._events_exchange is None:
                self._events_exchange = await self.events_channel.get_exchange(self.names.events_exchange,
                                                                               ensure=False)
            ex = self._events_exchange
        await ex.publish(message, type_, mandatory=False)

    async def dead_letter(self, message: AbstractIncomingMessage, queue: str, reason: str,
                          detail: str) -> None:
        """Copy ``message`` to the dead-letter exchange with its reason, then ack it.

        The body is cut to ``dead_letter_body_bytes`` (its full size is a header): a sender of
        junk cannot fill the broker's disk through the dead-letter queue.
        """
        body = bytes(message.body)
        headers = dict(message.headers or {})
        headers.update({REASON_HEADER: reason, DETAIL_HEADER: detail[:512], "x-qflare-queue": queue,
                        BODY_BYTES_HEADER: len(body)})
        await self.publish(self.names.dlx, queue, body[:self.dead_letter_body_bytes], headers=headers,
                           message_id=message.message_id)
        DEAD_LETTERED.labels(queue, reason).inc()
        log.warning("dead-lettered a message from %s: %s %s", queue, reason, detail)
        await message.ack()
        try:
            await self.event(f"dead_letter.{reason}", reason=str(reason), queue=queue, detail_text=detail[:200])
        except TRANSIENT:
            pass  # the dead letter itself is safe; its notification is best effort


async def consume(
    channel: AbstractChannel, publisher: Publisher, queue_name: str, handler: Handler, *,
    expected: type[Message] | tuple[type[Message], ...], max_bytes: int,
    on_reject: Callable[[AbstractIncomingMessage, QflareError], Awaitable[None]] | None = None,
) -> AbstractQueue:
    """Consume ``queue_name`` with manual acks; nothing a sender does stops the consumer.

    The message is acked when the handler returns, unless it returns :data:`DEFERRED`,
    in which case the handler acks it later (after its effect is durable).

    Undecodable messages, and messages whose handler raises :class:`QflareError`, go to the
    dead-letter queue with a reason header. Unexpected handler errors are logged and
    dead-lettered as ``internal``. Broker failures leave the message unacked, so it is
    delivered again once the robust connection is back.
    """

    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            try:
                msg = decode(message.body, expected, max_bytes)
                outcome = await handler(msg, message)
            except (QflareError, QflareCryptoError) as exc:
                err = as_qflare_error(exc)
                if on_reject is not None:
                    await on_reject(message, err)
                await publisher.dead_letter(message, queue_name, err.reason, err.detail)
                return
            except TRANSIENT:
                raise
            except Exception as exc:
                log.exception("handler failed on a message from %s", queue_name)
                await publisher.dead_letter(message, queue_name, Reason.INTERNAL, type(exc).__name__)
                return
            HANDLED.labels(queue_name).inc()
            if outcome is not DEFERRED and not message.processed:
                await message.ack()
        except TRANSIENT as exc:
            log.warning("broker error while handling a message from %s: %s", queue_name, exc)
            if not message.processed:
                try:
                    await message.nack(requeue=True)
                except Exception:  # noqa: BLE001 - channel gone; broker redelivers anyway
                    pass

    queue = await channel.declare_queue(queue_name, passive=True)
    await queue.consume(on_message)
    return queue


def reply_address(message: AbstractIncomingMessage) -> str | None:
    """Where a request may be answered: only a direct reply-to address, which the broker
    made for the requesting channel. Anything else (the models stream, another namespace's
    queue) would let a requester make a service write into a queue of its choosing."""
    to = message.reply_to or ""
    return to if to.startswith(DIRECT_REPLY_TO + ".") else None


async def serve_rpc(
    channel: AbstractChannel, publisher: Publisher, queue_name: str, handler: RpcHandler, *,
    expected: tuple[type[Message], ...], max_bytes: int,
) -> AbstractQueue:
    """Answer requests on ``queue_name``: a reply message, or a typed :class:`ErrorReply`.

    A request without a direct reply-to address, or without the ``user_id`` property (set by
    every :class:`Publisher`, verified by RabbitMQ), is dead-lettered unhandled; the handler
    gets that user as the sender (:mod:`broker.principals` checks its role).
    """

    async def reply(message: AbstractIncomingMessage, answer: Message | bytes) -> None:
        to = reply_address(message)
        if to is not None:
            await publisher.publish("", to, answer, correlation_id=message.correlation_id, persistent=False)

    async def on_request(msg: Message, message: AbstractIncomingMessage) -> None:
        if reply_address(message) is None:
            raise QflareError(Reason.INVALID_FIELD, f"reply_to must be {DIRECT_REPLY_TO}, got {message.reply_to!r:.80}")
        if not message.user_id:
            raise QflareError(Reason.FORBIDDEN, "request without a user_id (the broker verifies it)")
        try:
            answer = await handler(msg, message.user_id)
        except (QflareError, QflareCryptoError) as exc:
            err = as_qflare_error(exc)
            answer = ErrorReply(reason=err.reason, detail=err.detail[:ERROR_DETAIL_MAX])
        await reply(message, answer)

    async def on_reject(message: AbstractIncomingMessage, err: QflareError) -> None:
        await reply(message, ErrorReply(reason=err.reason, detail=err.detail[:ERROR_DETAIL_MAX]))

    return await consume(channel, publisher, queue_name, on_request, expected=expected,
                         max_bytes=max_bytes, on_reject=on_reject)


class RpcClient:
    """Request/reply over RabbitMQ direct reply-to, with correlation ids and timeouts.

    Replies come to the ``amq.rabbitmq.reply-to`` pseudo-queue of the publishing channel:
    no reply queue to declare (a confined user needs no permission for it) and none a
    service could be pointed at instead.
    """

    def __init__(self, channel: AbstractChannel, publisher: Publisher, max_bytes: int) -> None:
        assert publisher.channel is channel, "direct reply-to answers the channel that published"
        self.channel = channel
        self.publisher = publisher
        self.max_bytes = max_bytes
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._queue: AbstractQueue | None = None

    async def start(self) -> RpcClient:
        """Consume the channel's direct reply-to pseudo-queue (no-ack, as the broker requires)."""
        self._queue = await self.channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await self._queue.consume(self._on_reply, no_ack=True)
        return self

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._pending.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(bytes(message.body))

    async def call(self, exchange: str, routing_key: str, request: Message,
                   expected: type[Message] | tuple[type[Message], ...], timeout: float) -> Message:
        """Send ``request``; return the decoded reply or raise :class:`QflareError`."""
        assert self._queue is not None, "call start() first"
        cid = uuid.uuid4().hex
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            await self.publisher.publish(exchange, routing_key, request, correlation_id=cid,
                                         reply_to=DIRECT_REPLY_TO, persistent=False)
            body = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise QflareError(Reason.TIMEOUT, f"no reply to {request.TYPE} within {timeout:g}s") from None
        finally:
            self._pending.pop(cid, None)
        exp = expected if isinstance(expected, tuple) else (expected,)
        answer = decode(body, (*exp, ErrorReply), self.max_bytes)
        if isinstance(answer, ErrorReply):
            try:
                reason = Reason(answer.reason)
            except ValueError:
                reason = Reason.INTERNAL
            raise QflareError(reason, answer.detail)
        return answer


__all__ = ["TRANSIENT", "CodecError", "Publisher", "RpcClient", "consume", "reply_address", "serve_rpc"]
