"""The strict msgpack wire codec and its versioned envelope.

Wire form: a msgpack map ``{"v": 1, "t": <type>, "b": <body map>}``. Decoding never lets an
exception other than :class:`CodecError` out, and each failure carries a reason code:
oversize, trailing bytes, malformed msgpack, unknown version or type, invalid fields.
"""

from __future__ import annotations

import functools
import struct
from typing import TypeVar

import msgpack
from pydantic import ValidationError

from schemas.messages import BY_TYPE, Message, keep_view
from schemas.reasons import QflareError, Reason

WIRE_VERSION = 1
#: Default upper bound on one encoded message (RabbitMQ 4.x refuses bodies over 16 MiB).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Most entries of one decoded map.
MAX_MAP_LEN = 10_000

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
    env = _large_envelope(data) if len(data) >= VIEW_MIN_BYTES and isinstance(data, bytes) else None
    if env is not None:
        return _validated(env, expected)
    try:
        env = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_bytes, max_str_len=max_bytes, max_array_len=1_000_000, max_map_len=MAX_MAP_LEN,
        )
    except msgpack.ExtraData:
        raise CodecError(Reason.TRAILING_BYTES, "bytes after the message") from None
    except Exception as exc:  # noqa: BLE001 - any unpack failure is malformed input
        raise CodecError(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    return _validated(env, expected)


def _validated(env: object, expected: type[M] | tuple[type[Message], ...] | None) -> M:
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


#: Messages at least this large may be decoded by :func:`_large_envelope`.
VIEW_MIN_BYTES = 256 * 1024


@functools.cache
def _view_fields(cls: type[Message]) -> frozenset[str]:
    """The fields of ``cls`` that take a view of the body (``Payload``), none for most messages."""
    return frozenset(name for name, f in cls.model_fields.items()
                     if any(getattr(m, "func", None) is keep_view for m in f.metadata))


#: msgpack's fixed-width numbers by their first byte (uint, int, float32/64; big-endian).
_FIXED = {code: struct.Struct(fmt) for code, fmt in {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b",
                                                     0xD1: ">h", 0xD2: ">i", 0xD3: ">q", 0xCA: ">f",
                                                     0xCB: ">d"}.items()}
_Fail = object()  # anything unexpected: msgpack decodes the message instead, and says what is wrong


def _large_envelope(data: bytes) -> dict | None:
    """The envelope of a large update with its ``Payload`` fields as views of ``data``, not copies.

    msgpack copies every bin into new bytes: 4 MB per update, on the enclave's event loop,
    before it is even checked. This reads only the one shape such messages have (a map of
    ``v``, ``t`` and a body map of scalars) and answers None for anything else, or anything
    wrong (truncated, trailing bytes, bad UTF-8, over a limit), so that msgpack decodes it and
    the error, if any, is exactly msgpack's. tests/test_codec.py checks both agree.
    """
    view = memoryview(data)
    pos, n = 0, len(data)

    def header(fix: range, codes: dict[int, str]) -> int | None:
        """The length in the header at ``pos`` (a fix* code in ``fix``, or one of ``codes``)."""
        nonlocal pos
        if pos >= n:
            return None
        b = data[pos]
        if b in fix:
            pos += 1
            return b - fix.start
        fmt = codes.get(b)
        if fmt is None:
            return None
        size = struct.calcsize(fmt)
        if pos + 1 + size > n:
            return None
        (length,) = struct.unpack_from(fmt, data, pos + 1)
        pos += 1 + size
        return length

    def scalar(as_view: bool) -> object:
        nonlocal pos
        if pos >= n:
            return _Fail
        b = data[pos]
        if b <= 0x7F:
            pos += 1
            return b
        if b >= 0xE0:
            pos += 1
            return b - 0x100
        if b == 0xC0:
            pos += 1
            return None
        if b in (0xC2, 0xC3):
            pos += 1
            return b == 0xC3
        if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
            length = header(range(0xA0, 0xC0), {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"})
            if length is None or pos + length > n:
                return _Fail
            try:
                text = data[pos:pos + length].decode("utf-8")
            except UnicodeDecodeError:
                return _Fail
            pos += length
            return text
        if b in (0xC4, 0xC5, 0xC6):
            length = header(range(0), {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"})
            if length is None or pos + length > n:
                return _Fail
            value = view[pos:pos + length] if as_view else data[pos:pos + length]
            pos += length
            return value
        fmt = _FIXED.get(b)
        if fmt is None or pos + 1 + fmt.size > n:
            return _Fail  # containers, ext types: not this shape
        (value,) = fmt.unpack_from(data, pos + 1)
        pos += 1 + fmt.size
        return value

    map_codes = {0xDE: ">H", 0xDF: ">I"}
    if header(range(0x80, 0x90), map_codes) != 3:
        return None
    env: dict = {}
    cls: type[Message] | None = None
    for _ in range(3):
        key = scalar(False)
        if key == "b":
            if cls is None:
                return None  # "t" first, as encode() writes it
            count = header(range(0x80, 0x90), map_codes)
            if count is None or count > MAX_MAP_LEN:
                return None
            fields, body = _view_fields(cls), {}
            for _ in range(count):
                name = scalar(False)
                if not isinstance(name, str):
                    return None
                value = scalar(name in fields)
                if value is _Fail:
                    return None
                body[name] = value
            env["b"] = body
        elif key in ("v", "t"):
            value = scalar(False)
            if value is _Fail:
                return None
            env[key] = value
            if key == "t":
                cls = BY_TYPE.get(value) if isinstance(value, str) else None
                if cls is None or not _view_fields(cls):
                    return None
        else:
            return None
    return env if pos == n and len(env) == 3 else None
