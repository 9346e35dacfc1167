"""The strict msgpack wire codec and its versioned envelope.

Wire form: a msgpack map ``{"v": 1, "t": <type>, "b": <body map>}``. Decoding never lets an
exception other than :class:`CodecError` out, and each failure carries a reason code:
oversize, trailing bytes, malformed msgpack, unknown version or type, invalid fields.
"""

from __future__ import annotations

from typing import TypeVar

import msgpack
from pydantic import ValidationError

from schemas.messages import BY_TYPE, Message
from schemas.reasons import QflareError, Reason

WIRE_VERSION = 1
#: Default upper bound on one encoded message (RabbitMQ 4.x refuses bodies over 16 MiB).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

M = TypeVar("M", bound=Message)


class CodecError(QflareError):
    """Bytes that are not a valid message; ``reason`` says why."""


def encode(msg: Message) -> bytes:
    """Encode ``msg`` in the versioned envelope."""
    body = msg.model_dump(mode="python")
    return msgpack.packb({"v": WIRE_VERSION, "t": msg.TYPE, "b": body}, use_bin_type=True)


def encode_fields(cls: type[Message], fields: dict) -> bytes:
    """``encode(cls(**fields))`` without building the model, for a hot path that assembles a
    message from values already valid (its own and the registry's). ``fields`` must hold
    every field of ``cls`` in declaration order, as ``model_dump`` gives them; then the bytes
    are the same (tests/test_codec.py)."""
    return msgpack.packb({"v": WIRE_VERSION, "t": cls.TYPE, "b": fields}, use_bin_type=True)


def decode(
    data: bytes | bytearray | memoryview,
    expected: type[M] | tuple[type[Message], ...] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> M:
    """Decode one message, checking size, framing, version, type and every field."""
    if len(data) > max_bytes:
        raise CodecError(Reason.OVERSIZE, f"{len(data)} bytes > limit {max_bytes}")
    try:
        env = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_bytes, max_str_len=max_bytes, max_array_len=1_000_000, max_map_len=10_000,
        )
    except msgpack.ExtraData:
        raise CodecError(Reason.TRAILING_BYTES, "bytes after the message") from None
    except Exception as exc:  # noqa: BLE001 - any unpack failure is malformed input
        raise CodecError(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(env, dict) or set(env) != {"v", "t", "b"}:
        raise CodecError(Reason.MALFORMED, "not a qflare envelope")
    if env["v"] != WIRE_VERSION:
        raise CodecError(Reason.UNKNOWN_VERSION, f"wire version {env['v']!r} unsupported")
    cls = BY_TYPE.get(env["t"]) if isinstance(env["t"], str) else None
    if cls is None:
        raise CodecError(Reason.UNKNOWN_TYPE, f"unknown message type {env['t']!r}")
    allowed = expected if isinstance(expected, tuple) else (expected,) if expected else None
    if allowed is not None and cls not in allowed:
        names = ", ".join(c.TYPE for c in allowed)
        raise CodecError(Reason.UNKNOWN_TYPE, f"got {cls.TYPE!r}, expected {names}")
    if not isinstance(env["b"], dict):
        raise CodecError(Reason.MALFORMED, "body is not a map")
    try:
        return cls.model_validate(env["b"])  # type: ignore[return-value]
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise CodecError(Reason.INVALID_FIELD, f"{cls.TYPE}.{where}: {err['msg']}") from None


def peek_type(data: bytes) -> str | None:
    """The envelope's type tag without validating the body, or None if unreadable."""
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=True)
        return env.get("t") if isinstance(env, dict) else None
    except Exception:  # noqa: BLE001
        return None
