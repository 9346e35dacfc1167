"""Reassembling chunked updates inside the enclave, one model-sized buffer per update.

Chunks of one update arrive in order on the updates queue, interleaved with other devices'
chunks. Each chunk is opened, checked and decoded into its update's buffer as it arrives
(:mod:`pqc.stream`), and its body dropped, so an update in progress costs one dense float32
vector however many chunks it has. Its messages stay unacked until the whole update is
durable (or refused): a crash redelivers them all. At most ``max_in_progress`` updates are
reassembled at once (the first chunk of one more is refused as ``busy``), and one whose next
chunk is later than ``timeout`` seconds is refused as ``incomplete``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

import pqc
from common.chunks import ChunkDigest, chunk_aad, chunked_signed_parts, header_digest, stream_info
from enclave_worker import intake
from schemas import signing
from schemas.codec import CodecError, decode
from schemas.messages import SessionGrant, UpdateChunk, UpdateHeader
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.enclave")

#: Update ids whose later chunks are acked without a word (the update was already refused,
#: stored or restarted): enough to cover every update in flight.
FINISHED_MEMORY = 4096


@dataclass
class Assembly:
    """One chunked update being reassembled."""

    update_id: str
    routed: str | None
    touched: float
    held: list = field(default_factory=list)  # its messages, bodies dropped, acked at the end
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    header: UpdateHeader | None = None
    header_bytes: bytes = b""
    header_sha: bytes = b""
    grant: SessionGrant | None = None
    opener: pqc.StreamOpener | None = None
    digest: ChunkDigest | None = None
    delta: np.ndarray | None = None
    next_index: int = 0
    failed: bool = False


def begin(asm: Assembly, chunk: UpdateChunk, ctx: intake.IntakeContext, seen: bool, max_chunks: int,
          stages: intake.Stages | None = None) -> None:
    """Chunk 0: check the header as for a one-message update, open the stream, make the buffer."""
    if chunk.header is None or chunk.enc is None:
        raise QflareError(Reason.CHUNK_SEQUENCE, "the first chunk carries no header or encapsulation")
    try:
        header = decode(chunk.header, UpdateHeader)
    except CodecError as err:
        raise QflareError(Reason.MALFORMED, err.detail) from None
    asm.header, asm.header_bytes = header, chunk.header
    if header.update_id != chunk.update_id:
        raise QflareError(Reason.CHUNK_SEQUENCE, "chunk names another update than its header")
    if header.chunks != chunk.count:
        raise QflareError(Reason.CHUNK_SEQUENCE, f"chunk says {chunk.count} chunks, header {header.chunks}")
    if header.chunks > max_chunks:
        raise QflareError(Reason.CHUNK_SEQUENCE, f"{header.chunks} chunks; at most {max_chunks} for this model")
    with intake.timed(stages, "verify"):
        asm.grant = intake.admit(header, asm.routed, ctx, seen)
    with intake.timed(stages, "decrypt"):
        try:
            asm.opener = pqc.stream_opener(ctx.kem_sk, chunk.enc, header.chunks, stream_info(chunk.header),
                                           policy=ctx.policy)
        except pqc.errors.QflareCryptoError as exc:
            raise QflareError(Reason.DECRYPTION_FAILED, type(exc).__name__) from None
    asm.header_sha = header_digest(chunk.header)
    asm.digest = ChunkDigest(chunk.enc)
    asm.delta = np.zeros(ctx.n_params, dtype=np.float32)


def absorb(asm: Assembly, chunk: UpdateChunk, stages: intake.Stages | None = None) -> intake.Opened | None:
    """Open and decode the next chunk into the buffer; the opened update after the last one.

    A chunk out of place fails twice over: its index is not the one expected, and its
    key and associated data are those of another place, so its tag would not verify.
    """
    header = asm.header
    assert header is not None and asm.opener is not None and asm.digest is not None and asm.delta is not None
    if chunk.index != asm.next_index:
        raise QflareError(Reason.CHUNK_SEQUENCE, f"chunk {chunk.index} where chunk {asm.next_index} was due")
    if chunk.count != header.chunks:
        raise QflareError(Reason.CHUNK_SEQUENCE, f"chunk says {chunk.count} chunks, header {header.chunks}")
    if chunk.index > 0 and (chunk.header is not None or chunk.enc is not None):
        raise QflareError(Reason.CHUNK_SEQUENCE, f"chunk {chunk.index} carries a header")
    last = chunk.index == header.chunks - 1
    if not last and chunk.signature is not None:
        raise QflareError(Reason.CHUNK_SEQUENCE, f"chunk {chunk.index} carries a signature before the end")
    aad = chunk_aad(asm.header_sha, asm.update_id, chunk.index, header.chunks)
    with intake.timed(stages, "decrypt"):
        try:
            plain = asm.opener.open(chunk.index, chunk.sealed, aad)
        except pqc.errors.QflareCryptoError as exc:
            raise QflareError(Reason.DECRYPTION_FAILED, f"chunk {chunk.index}: {type(exc).__name__}") from None
    with intake.timed(stages, "reassembly"):
        asm.digest.add(chunk.sealed)
        intake.decode_payload(asm.delta, header, chunk.index, plain)
    asm.next_index += 1
    if not last:
        return None
    assert asm.grant is not None
    with intake.timed(stages, "verify"):
        intake.check_device_signature(asm.grant, chunk.sig_alg,
                                      chunked_signed_parts(asm.header_bytes, asm.digest.digest()),
                                      chunk.signature, signing.context_for(UpdateChunk.TYPE))
    delta, asm.delta = asm.delta, None
    with intake.timed(stages, "decode"):
        return intake.opened(header, delta)


Reject = Callable[[list, UpdateHeader | None, str | None, QflareError], Awaitable[object]]
Accept = Callable[[list, UpdateHeader, str | None, intake.Opened], Awaitable[object]]
Quiet = Callable[[list], Awaitable[object]]


class ChunkIntake:
    """Routes each chunk to its update's assembly; the enclave's service owns acks and storage.

    Callers (the service) provide: ``context()`` for the intake checks, ``seen(update_id)``,
    ``accept(messages, header, routed, opened)``, ``reject(messages, header, routed, error)``
    and ``quiet(messages)`` (ack without an event). Each is awaited; each acks what it is given.
    """

    def __init__(self, *, max_in_progress: int, timeout: float, max_chunks: int,
                 context: Callable[[], intake.IntakeContext], seen: Callable[[str], bool],
                 accept: Accept, reject: Reject, quiet: Quiet, stages: intake.Stages | None = None) -> None:
        self.max_in_progress = max_in_progress
        self.timeout = timeout
        self.max_chunks = max_chunks
        self._context, self._seen = context, seen
        self._accept, self._reject, self._quiet = accept, reject, quiet
        self.stages = stages
        self.active: dict[str, Assembly] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()

    def _finish(self, asm: Assembly) -> list:
        self.active.pop(asm.update_id, None)
        self._finished[asm.update_id] = None
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)
        held, asm.held = asm.held, []
        return held

    async def _fail(self, asm: Assembly, err: QflareError) -> None:
        asm.failed = True
        asm.delta = None
        await self._reject(self._finish(asm), asm.header, asm.routed, err)

    async def handle(self, chunk: UpdateChunk, raw, routed: str | None) -> None:
        """Take one chunk. Everything up to the assembly's lock runs without yielding, so
        chunks are taken in delivery order (aio-pika starts one task per message, in order)."""
        uid = chunk.update_id
        asm = self.active.get(uid)
        if chunk.index == 0:
            dropped: list = []
            if asm is not None:  # the device resent the whole update: start over
                log.info("update %s begins again; dropping its %d chunks so far", uid, len(asm.held))
                asm.failed = True
                dropped = self._finish(asm)
            if self._seen(uid) and raw.redelivered:  # stored before a crash: counts once
                self._finish(Assembly(uid, routed, 0.0))
                await self._quiet([*dropped, raw])
                return
            asm = Assembly(uid, routed, time.monotonic())
            if len(self.active) >= self.max_in_progress:
                asm.held.append(raw)
                refused = self._finish(asm)  # before yielding: its later chunks are dropped quietly
                await self._quiet(dropped)
                await self._reject(refused, None, routed,
                                   QflareError(Reason.BUSY, f"{len(self.active)} chunked updates in progress"))
                return
            self.active[uid] = asm
            if dropped:
                asm.held.append(raw)
                await self._take(asm, chunk, raw)  # takes the lock before yielding
                await self._quiet(dropped)
                return
        elif asm is None:
            if uid in self._finished:
                await self._quiet([raw])
            else:
                await self._reject([raw], None, routed,
                                   QflareError(Reason.CHUNK_SEQUENCE, f"chunk {chunk.index} of an update not begun"))
            return
        asm.held.append(raw)
        asm.touched = time.monotonic()
        await self._take(asm, chunk, raw)

    async def _take(self, asm: Assembly, chunk: UpdateChunk, raw) -> None:
        uid = chunk.update_id
        async with asm.lock:
            if asm.failed:
                return  # refused meanwhile; its messages (this one included) are acked
            try:
                if chunk.index == 0:
                    await asyncio.to_thread(begin, asm, chunk, self._context(), self._seen(uid), self.max_chunks,
                                            self.stages)
                done = await asyncio.to_thread(absorb, asm, chunk, self.stages)
            except QflareError as err:
                await self._fail(asm, err)
                return
            raw.body = b""  # decoded into the buffer: do not keep the ciphertext too
            if done is not None:
                assert asm.header is not None
                await self._accept(self._finish(asm), asm.header, asm.routed, done)

    async def expire(self) -> int:
        """Refuse updates whose next chunk is overdue; how many were refused."""
        now = time.monotonic()
        late = [a for a in self.active.values() if now - a.touched > self.timeout and not a.lock.locked()]
        for asm in late:
            due = asm.next_index
            await self._fail(asm, QflareError(Reason.INCOMPLETE, f"chunk {due} of "
                                              f"{asm.header.chunks if asm.header else '?'} not received in "
                                              f"{self.timeout:g} s"))
        return len(late)

    async def run_expiry(self) -> None:
        """Check for overdue updates a few times per timeout, until cancelled."""
        while True:
            await asyncio.sleep(max(0.05, self.timeout / 4))
            await self.expire()
