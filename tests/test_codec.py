"""The wire codec: round trips for every message shape, and every malformed input refused
with its reason code (never another exception)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from schemas.codec import WIRE_VERSION, CodecError, decode, encode
from schemas.messages import (
    BY_TYPE,
    Event,
    GlobalModel,
    Ping,
    RoundResult,
    RoundSpec,
    Signed,
    Update,
    UpdateHeader,
)
from schemas.reasons import Reason

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62),
                    st.floats(allow_nan=False), text)


@given(type_=st.from_regex(r"[a-z]{1,10}(\.[a-z_]{1,10}){0,3}", fullmatch=True), at=st.floats(allow_nan=False),
       detail=st.dictionaries(st.text(min_size=1, max_size=10), scalars, max_size=5),
       round_id=st.none() | st.integers(0, 10**6))
def test_event_round_trips(type_, at, detail, round_id):
    ev = Event(type=type_, at=at, detail=detail, round_id=round_id)
    assert decode(encode(ev), Event) == ev


@given(body=st.binary(max_size=4096), sig=st.binary(min_size=1, max_size=3000))
def test_signed_round_trips(body, sig):
    s = Signed(body=body, alg="ML-DSA-44", signer="ab" * 32, signature=sig)
    assert decode(encode(s), Signed) == s


def test_nested_models_round_trip():
    spec = RoundSpec(round_id=3, deadline=1e9, min_updates=2, expected=["d1", "d2"], epochs=1,
                     lr=0.05, batch_size=16)
    res = RoundResult(round_id=2, accepted=8, rejected={"norm_bound": 2}, accuracy=0.9, seconds=1.5,
                      status="completed")
    gm = GlobalModel(version=2, layout_id="abc", params=b"\x00" * 64, created_at=1.0, result=res,
                     next_round=spec)
    assert decode(encode(gm)) == gm


@pytest.mark.parametrize("raw, reason", [
    (b"\xc1", Reason.MALFORMED),
    (b"", Reason.MALFORMED),
    (msgpack.packb([1, 2, 3]), Reason.MALFORMED),
    (msgpack.packb({"v": 2, "t": "ping", "b": {}}), Reason.UNKNOWN_VERSION),
    (msgpack.packb({"v": WIRE_VERSION, "t": "nope", "b": {}}), Reason.UNKNOWN_TYPE),
    (msgpack.packb({"v": WIRE_VERSION, "t": "ping", "b": []}), Reason.MALFORMED),
    (msgpack.packb({"v": WIRE_VERSION, "t": "ping", "b": {"nonce": "text"}}), Reason.INVALID_FIELD),
    (msgpack.packb({"v": WIRE_VERSION, "t": "ping", "b": {"extra": 1}}), Reason.INVALID_FIELD),
    (encode(Ping()) + b"\x00", Reason.TRAILING_BYTES),
])
def test_malformed_inputs_have_reasons(raw, reason):
    with pytest.raises(CodecError) as exc:
        decode(raw)
    assert exc.value.reason == reason


def test_wrong_type_is_refused_where_another_is_expected():
    with pytest.raises(CodecError) as exc:
        decode(encode(Ping()), Update)
    assert exc.value.reason == Reason.UNKNOWN_TYPE


def test_oversize_is_refused_before_parsing():
    with pytest.raises(CodecError) as exc:
        decode(b"\x00" * 5000, max_bytes=4096)
    assert exc.value.reason == Reason.OVERSIZE


def test_strict_types_do_not_coerce():
    body = {"device_id": "d", "grant": b"g", "round_id": "1", "update_id": "u" * 8, "base_version": 0,
            "num_samples": 1, "timestamp": 0.0, "layout_id": "l", "kem_alg": "ML-KEM-768",
            "enclave_kem_fp": "f" * 16}
    with pytest.raises(CodecError) as exc:
        decode(msgpack.packb({"v": 1, "t": UpdateHeader.TYPE, "b": body}, use_bin_type=True))
    assert exc.value.reason == Reason.INVALID_FIELD
    assert "round_id" in exc.value.detail


@hsettings(max_examples=300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_codec_error(raw):
    try:
        decode(raw)
    except CodecError:
        pass


def test_every_message_type_is_registered_once():
    assert all(cls.TYPE == t for t, cls in BY_TYPE.items())


def _unbounded(tp: object, meta: list[object], where: str) -> list[str]:
    """Every str/bytes/list/dict reachable in ``tp`` that has no maximum length."""
    import types
    import typing

    from annotated_types import MaxLen
    from pydantic.fields import FieldInfo

    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(tp)
        more = [m for x in extra for m in (x.metadata if isinstance(x, FieldInfo) else [x])]
        return _unbounded(base, [*meta, *more], where)
    if origin in (typing.Union, types.UnionType):
        return [p for arg in typing.get_args(tp) for p in _unbounded(arg, list(meta), where)]
    bounded = any(isinstance(m, MaxLen) for m in meta)
    if tp in (str, bytes):
        return [] if bounded else [where]
    if origin in (list, tuple, set, frozenset, dict):
        inner = [p for i, arg in enumerate(typing.get_args(tp)) for p in _unbounded(arg, [], f"{where}[{i}]")]
        return inner + ([] if bounded else [where])
    return []


def test_every_variable_length_field_of_every_message_is_bounded():
    """A peer cannot make a service hold, echo or store an unbounded field (a 1 MiB Ping.nonce)."""
    missing = [p for cls in BY_TYPE.values() for name, f in cls.model_fields.items()
               for p in _unbounded(f.annotation, list(f.metadata), f"{cls.__name__}.{name}")]
    assert missing == [], f"fields without a max_length: {missing}"
    assert _unbounded(str, [], "x") == ["x"]  # the walker itself finds an unbounded field
    with pytest.raises(CodecError) as exc:
        decode(msgpack.packb({"v": WIRE_VERSION, "t": "ping", "b": {"nonce": b"\0" * (1024 * 1024)}}))
    assert exc.value.reason == Reason.INVALID_FIELD


@pytest.mark.parametrize("digest", [None, b"\x07" * 32])
def test_encode_fields_gives_the_bytes_encode_gives(digest):
    """The coordinator's hot path builds grants with encode_fields (no model): the bytes must
    be exactly those of the validated model's encoding, or the enclave and the device would
    see another grant than the one the MAC and the transcript cover."""
    from schemas.codec import encode_fields
    from schemas.messages import GrantMac, SessionGrant

    fields = {"device_id": "dev-1", "session_id": "0123456789abcdef", "sig_alg": "ML-DSA-44", "sig_pk": b"k" * 1312,
              "sig_fp": "a" * 64, "issued_at": 1.5, "not_after": 2.5, "transcript": b"t" * 32, "enclave_digest": digest}
    body = encode_fields(SessionGrant, fields)
    assert body == encode(SessionGrant(**fields))
    assert list(fields) == list(SessionGrant.model_fields)  # every field, in declaration order
    mac = {"body": body, "key_id": b"i" * 16, "tag": b"g" * 32}
    assert encode_fields(GrantMac, mac) == encode(GrantMac(**mac))
    assert list(mac) == list(GrantMac.model_fields)


# --- large updates: payload views instead of copies ---------------------------------------

def _plain(x):
    """``x`` with every view as bytes (what msgpack gives)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x.tobytes() if isinstance(x, memoryview) else x


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                     st.text(max_size=40), st.binary(max_size=300))
_bodies = st.dictionaries(st.sampled_from(["sealed", "header", "update_id", "index", "x", ""]), _scalars, max_size=6)


@hsettings(max_examples=400, deadline=None)
@given(t=st.sampled_from(["update", "update.chunk", "ping", "nope"]), v=_scalars, body=_bodies,
       cut=st.integers(0, 400), flip=st.integers(0, 400), extra=st.binary(max_size=3))
def test_the_view_decoder_agrees_with_msgpack_or_leaves_it_to_msgpack(t, v, body, cut, flip, extra):
    """Whatever the bytes (well formed, truncated, a bit flipped, trailing junk), the view
    decoder either gives exactly what msgpack gives, or nothing (msgpack then decodes it)."""
    from schemas.codec import _large_envelope

    good = msgpack.packb({"v": v, "t": t, "b": body}, use_bin_type=True)
    flipped = bytearray(good)
    flipped[flip % len(good)] ^= 1 << (flip % 8)
    for data in (good, good[:cut], bytes(flipped), good + extra):
        fast = _large_envelope(data)
        if fast is None:
            continue
        assert _plain(fast) == msgpack.unpackb(data, raw=False, strict_map_key=True)
    if t in ("update", "update.chunk"):
        assert _large_envelope(good) is not None
        assert _plain(_large_envelope(good)) == {"v": v, "t": t, "b": body}


def test_a_large_update_decodes_to_a_view_of_the_body_and_equals_its_message():
    import os

    from schemas.messages import Update, UpdateChunk

    u = Update(header=b"h" * 300, sealed=os.urandom(1 << 20), sig_alg="ML-DSA-65", signature=b"s" * 3309)
    body = encode(u)
    got = decode(body, Update)
    assert isinstance(got.sealed, memoryview) and got.sealed.obj is body  # no copy
    assert isinstance(got.header, bytes) and got == u and encode(got) == body
    chunk = UpdateChunk(update_id="u" * 16, index=1, count=3, sealed=os.urandom(1 << 19))
    assert isinstance(decode(encode(chunk)).sealed, memoryview) and decode(encode(chunk)) == chunk
    small = encode(u.model_copy(update={"sealed": b"tiny"}))
    assert isinstance(decode(small, Update).sealed, bytes)
    with pytest.raises(CodecError) as err:  # errors are msgpack's, as before
        decode(body[:-1], Update)
    assert err.value.reason == Reason.MALFORMED
    with pytest.raises(CodecError) as err:
        decode(body + b"\x00", Update)
    assert err.value.reason == Reason.TRAILING_BYTES
