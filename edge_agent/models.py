"""Receiving global models that travel in chunks, live and from the models stream.

A chunked model is a signed ``GlobalModel`` naming the SHA-256 of each ``ModelChunk``, then
the chunks in order. The device verifies the signed part as for any model, then accepts each
chunk only if its digest is the one signed for its place; the model is used once whole.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

from broker.client import BrokerClient
from common.chunks import chunk_sha256
from schemas import signing
from schemas.codec import CodecError, decode, peek_type
from schemas.messages import GlobalModel, ModelChunk, Signed
from schemas.reasons import QflareError

log = logging.getLogger("qflare.agent")

#: How long a returning device waits for the chunks of the latest model in the stream.
STREAM_CHUNK_TIMEOUT = 60.0


@dataclass
class ModelAssembly:
    """A verified chunked model being filled; ``context`` is whatever the caller needs back."""

    model: GlobalModel
    context: object = None
    parts: list[bytes] = field(default_factory=list)

    def add(self, chunk: ModelChunk) -> GlobalModel | None:
        """Take the next chunk; the whole model once the last is in, else None.

        A chunk of another version or place, or whose digest is not the signed one, is
        ignored (logged): the fanout may carry an older model's tail, and a forged chunk
        must not displace the genuine one that follows.
        """
        due = len(self.parts)
        digests = self.model.chunk_digests
        if chunk.version != self.model.version or chunk.index != due or chunk.count != len(digests):
            return None
        if chunk_sha256(chunk.data) != digests[due]:
            log.warning("model %d chunk %d does not match its signed digest; ignored", chunk.version, due)
            return None
        self.parts.append(chunk.data)
        if len(self.parts) < len(digests):
            return None
        params, self.parts = b"".join(self.parts), []
        return self.model.model_copy(update={"params": params, "chunk_digests": []})


def unverified_model(body: bytes) -> GlobalModel | None:
    try:
        return signing.unverified(decode(body, Signed), GlobalModel)
    except (CodecError, QflareError):
        return None


async def latest_model_messages(broker: BrokerClient, settle: float = 0.3) -> list[bytes]:
    """The messages of the latest model in the models stream, in order ([] if none).

    ``x-stream-offset: last`` starts at the stream's last chunk, which may hold several
    messages, or only the tail of a chunked model. The enclave publishes a model's signed
    part and its chunks back to back, so chunk i at offset o says the model began at
    o − i − 1: read again from there when the tail does not hold the whole model.
    """
    tail = await _read_stream(broker, "last", settle=settle)
    begin = None
    for offset, body in tail:
        kind = peek_type(body)
        if kind == Signed.TYPE and unverified_model(body) is not None:
            at = offset
        elif kind == ModelChunk.TYPE:
            try:
                at = offset - decode(body, ModelChunk).index - 1
            except CodecError:
                continue
        else:
            continue
        begin = at if begin is None else max(begin, at)
    if begin is None or begin < 0:
        return []
    messages = _model_from(tail, begin)
    if messages is None:
        messages = _model_from(await _read_stream(broker, begin, whole_model=True, timeout=STREAM_CHUNK_TIMEOUT),
                               begin)
    return messages or []


def _model_from(messages: list[tuple[int, bytes]], begin: int) -> list[bytes] | None:
    """The signed model at offset ``begin`` and its chunks after it, if all are there."""
    by_offset = dict(messages)
    body = by_offset.get(begin)
    model = unverified_model(body) if body is not None else None
    if model is None:
        return None
    want = len(model.chunk_digests)
    chunks = _chunks_of([(o, b) for o, b in messages if o > begin], model.version)[:want]
    return [body, *chunks] if len(chunks) == want else None


def _is_chunk_of(body: bytes, version: int) -> bool:
    if peek_type(body) != ModelChunk.TYPE:
        return False
    try:
        return decode(body, ModelChunk).version == version
    except CodecError:
        return False


def _chunks_of(messages: list[tuple[int, bytes]], version: int) -> list[bytes]:
    out = []
    for _, body in messages:
        if peek_type(body) == ModelChunk.TYPE:
            try:
                chunk = decode(body, ModelChunk)
            except CodecError:
                continue
            if chunk.version == version and chunk.index == len(out):
                out.append(body)
    return out


async def _read_stream(broker: BrokerClient, start: str | int, *, settle: float = 0.3, whole_model: bool = False,
                       timeout: float = 10.0) -> list[tuple[int, bytes]]:
    """(offset, body) from ``start`` until ``settle`` s pass quietly, or (``whole_model``)
    until the model that starts there has all its chunks, or ``timeout`` s passed."""
    ch = await broker.connection.channel()
    try:
        await ch.set_qos(prefetch_count=16)
        q = await ch.declare_queue(broker.names.models_stream, passive=True)
        got: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

        async def on(msg: AbstractIncomingMessage) -> None:
            offset = (msg.headers or {}).get("x-stream-offset")
            await got.put((int(offset) if isinstance(offset, int) else -1, bytes(msg.body)))
            await msg.ack()

        tag = await q.consume(on, arguments={"x-stream-offset": start})
        out: list[tuple[int, bytes]] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        want: tuple[int, int] | None = None  # (version, chunks) of the model being read
        found = 0
        while True:
            wait = settle if not whole_model else max(0.0, end - loop.time())
            try:
                out.append(await asyncio.wait_for(got.get(), wait))
            except TimeoutError:
                break
            if not whole_model:
                continue
            body = out[-1][1]
            if want is None:
                model = unverified_model(body)
                if model is None:
                    break  # not a model's start: give up rather than wait
                want = (model.version, len(model.chunk_digests))
            else:
                found += _is_chunk_of(body, want[0])
            if found >= want[1]:
                break
        await q.cancel(tag)
        return out
    finally:
        await ch.close()
