"""Delivered bodies read and put together cheaply (two aiormq read paths, adjusted).

RabbitMQ splits a body into frames of at most its ``frame_max`` (131072 bytes by default,
a server setting: a client may only ask for less), so a 4 MB update arrives as 31 frames.
aiormq 7 appends them to a ``BytesIO``, which grows by an eighth at a time: almost every
frame reallocates the buffer, and where the heap cannot grow it in place (a process
holding many 4 MB buffers, like the enclave) the whole body so far is copied again. That
was 12% of the enclave's event-loop CPU on 1M-parameter updates (perf). Keeping the
frames and joining them once at the end allocates the body once and copies each byte once.

The frames themselves come through an ``asyncio.StreamReader`` with asyncio's default
64 KiB limit: it stops reading the socket once it holds twice that, less than one 128 KiB
frame, so every frame of a large body paused and resumed the socket (two ``epoll_ctl``
calls and the selector's bookkeeping, and one more turn of the loop). Each connection's
reader gets :data:`READ_LIMIT` instead: receiving a 4 MB message went from 3.7-4.5 to
2.5-3.1 ms of CPU here (100 messages from a quorum queue, prefetch 64), and its wall time
from 6-8 to 3-5 ms. A slow consumer still stops the socket, at 2 MiB per connection.

Installed by :mod:`broker.connection` for every process; :func:`install` checks that
aiormq still has what it replaces, and leaves it alone if not.
"""

from __future__ import annotations

import logging

from aiormq.abc import DeliveredMessage
from aiormq.channel import Channel
from aiormq.connection import FrameReceiver
from pamqp.body import ContentBody

log = logging.getLogger("qflare.broker")

#: aiormq's private names: the method replaced and the one it reads frames with.
_READ_CONTENT = "_read_content"
_GET_CONTENT_FRAME = "_Channel__get_content_frame"
#: Bytes a connection's stream reader may buffer before it pauses the socket at twice this
#: (asyncio's private ``StreamReader._limit``, 64 KiB by default; frames are 128 KiB).
READ_LIMIT = 1 << 20
_ORIGINAL_INIT = FrameReceiver.__init__


async def _read_content(self: Channel, frame, header) -> DeliveredMessage:
    """Read ``header.body_size`` bytes of content frames (as aiormq's, but one join)."""
    parts: list[bytes] = []
    size, want = 0, header.body_size
    while size < want:
        content = await getattr(self, _GET_CONTENT_FRAME)()
        if not isinstance(content, ContentBody) or not content.value:
            break  # aiormq's reader stops on an empty frame too (its ``while content``)
        parts.append(content.value)
        size += len(content.value)
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    return DeliveredMessage(delivery=frame, header=header, body=body, channel=self)


def _frame_receiver_init(self: FrameReceiver, reader, *args, **kwargs) -> None:
    """aiormq's, then the connection's reader allowed :data:`READ_LIMIT` bytes of buffer."""
    _ORIGINAL_INIT(self, reader, *args, **kwargs)
    if isinstance(getattr(reader, "_limit", None), int):
        reader._limit = max(reader._limit, READ_LIMIT)


def install() -> bool:
    """Adjust aiormq's two read paths once; False where its names moved (that part unchanged)."""
    ok = True
    if FrameReceiver.__init__ is not _frame_receiver_init:
        FrameReceiver.__init__ = _frame_receiver_init
    if getattr(Channel, _READ_CONTENT, None) is not _read_content:
        if not hasattr(Channel, _READ_CONTENT) or not hasattr(Channel, _GET_CONTENT_FRAME):
            log.warning("aiormq has no Channel.%s: delivered bodies keep its own assembly", _READ_CONTENT)
            ok = False
        else:
            setattr(Channel, _READ_CONTENT, _read_content)
    return ok
