"""Events as CloudEvents 1.0 in the AMQP binding's binary content mode (pure; no I/O).

The body is the event (JSON by default, ``events.format``; or the msgpack envelope); the
AMQP ``content-type`` property is its ``datacontenttype`` (the binding maps it there, not to
a header); every other attribute is an application header prefixed ``cloudEvents:`` (AMQP
binding §3.1.3.1): ``id``, ``source``, ``type``, ``specversion``, ``time`` and, when a device
is concerned, ``subject``. Newer drafts of the binding also allow ``cloudEvents_``; readers
here accept both.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from schemas.codec import CodecError, decode, encode
from schemas.messages import Event
from schemas.reasons import Reason

SPEC_VERSION = "1.0"
PREFIX = "cloudEvents:"
ALT_PREFIX = "cloudEvents_"
CONTENT_TYPES = {"json": "application/json", "msgpack": "application/msgpack"}
#: The largest event body a reader accepts (events are small; anything bigger is not ours).
MAX_EVENT_BYTES = 64 * 1024

EventFormat = Literal["json", "msgpack"]


@dataclass(frozen=True)
class Envelope:
    body: bytes
    content_type: str
    headers: dict[str, str]
    id: str


def rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1e6) % 1_000_000:06d}Z"


def envelope(ev: Event, source: str, fmt: EventFormat = "json") -> Envelope:
    """The AMQP body, content type and ``cloudEvents:`` headers of ``ev``."""
    event_id = uuid.uuid4().hex
    headers = {f"{PREFIX}id": event_id, f"{PREFIX}source": source, f"{PREFIX}type": ev.type,
               f"{PREFIX}specversion": SPEC_VERSION, f"{PREFIX}time": rfc3339(ev.at)}
    if ev.device_id:
        headers[f"{PREFIX}subject"] = ev.device_id
    body = (json.dumps(ev.model_dump(), separators=(",", ":")).encode() if fmt == "json" else encode(ev))
    return Envelope(body, CONTENT_TYPES[fmt], headers, event_id)


def decode_event(body: bytes, content_type: str | None) -> Event:
    """Read an event in either format; :class:`CodecError` when it is not one."""
    if content_type and content_type.split(";")[0].strip() == CONTENT_TYPES["json"]:
        if len(body) > MAX_EVENT_BYTES:
            raise CodecError(Reason.OVERSIZE, f"event body of {len(body)} bytes")
        try:
            return Event.model_validate_json(body)
        except ValidationError as exc:
            raise CodecError(Reason.INVALID_FIELD, str(exc.errors()[0]["msg"])) from None
    return decode(body, Event, MAX_EVENT_BYTES)


def attributes(headers: dict | None) -> dict[str, str]:
    """The CloudEvents attributes in AMQP headers, under either prefix, without it."""
    out = {}
    for key, value in (headers or {}).items():
        for prefix in (PREFIX, ALT_PREFIX):
            if key.startswith(prefix):
                out[key[len(prefix):]] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def topic_matches(binding: str, routing_key: str) -> bool:
    """AMQP topic matching (``*`` one word, ``#`` zero or more), for readers of the events stream."""
    def match(b: list[str], k: list[str]) -> bool:
        if not b:
            return not k
        if b[0] == "#":
            return any(match(b[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and b[0] in ("*", k[0]) and match(b[1:], k[1:])

    return match(binding.split("."), routing_key.split("."))
