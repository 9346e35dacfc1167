"""Events for other systems: CloudEvents headers, JSON bodies, persistence, a replayable stream,
and an AsyncAPI document that lists every event the services emit (issue 12, item 4)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aio_pika
import pytest

from common.events import PREFIX, attributes, decode_event, envelope, topic_matches
from ops import asyncapi
from schemas.events import EVENTS, spec_for
from schemas.messages import Event

ROOT = Path(__file__).resolve().parent.parent
SERVICE_PACKAGES = ("coordinator", "enclave_worker", "edge_agent", "broker", "ops")


def test_asyncapi_document_is_current(tmp_path):
    copy = tmp_path / "asyncapi.yaml"
    copy.write_text(asyncapi.DOC.read_text())
    assert not asyncapi.update(copy), "docs/asyncapi.yaml is stale: run `python -m ops.asyncapi`"


#: ``event("x.y", ...)``, ``_event(f"{kind}.rejected.{reason}", ...)``, ``"type_": f"update.rejected.{r}"``
EMIT = re.compile(r"""(?:\.event\(\s*|\._event\(\s*|"type_":\s*)(f?)(["'])([^"'\n]+)\2""")
REFUSE = re.compile(r"""\._refuse\(\s*["'](\w+)["']""")


def _sources(*packages: str) -> list[str]:
    return [p.read_text() for pkg in packages for p in (ROOT / pkg).rglob("*.py")]


def _emitted_types() -> set[str]:
    """Every event type a service emits; an f-string's placeholders become ``{x}``.

    A regular-expression scan (CPython 3.11's ``ast`` trips over a deep pytest stack)."""
    found = set()
    for text in _sources(*SERVICE_PACKAGES):
        for is_f, _, literal in EMIT.findall(text):
            found.add(re.sub(r"\{[^}]*\}", "{x}", literal) if is_f else literal)
    return found


def _refusal_kinds() -> set[str]:
    """The ``kind`` of every ``_refuse("kind", ...)`` call: each makes ``<kind>.rejected.<reason>``."""
    return {k for text in _sources("coordinator") for k in REFUSE.findall(text)}


def test_every_event_type_the_services_emit_is_in_the_asyncapi_document():
    doc = asyncapi.DOC.read_text()
    emitted = _emitted_types()
    assert {"round.completed", "update.accepted", "device.enrolled"} <= emitted, emitted  # the scan works
    assert {"enrollment", "session", "attestation", "operator"} <= _refusal_kinds()
    for type_ in emitted:
        if type_.startswith("{x}."):  # the coordinator's f"{kind}.rejected.{reason}": each kind is listed
            kinds = _refusal_kinds()
            assert all(spec_for(type_.replace("{x}", k, 1).replace("{x}", "replay")) for k in kinds), type_
            continue
        spec = spec_for(type_.replace("{x}", "norm_bound"))
        assert spec is not None, f"event {type_!r} is emitted but not in schemas/events.py"
        assert f"address: {spec.key}" in doc


def test_topic_matching_follows_amqp():
    assert topic_matches("update.rejected.*", "update.rejected.norm_bound")
    assert not topic_matches("update.rejected.*", "update.accepted")
    assert topic_matches("#", "round.completed") and topic_matches("round.#", "round")
    assert not topic_matches("round.*", "round")


def test_an_envelope_round_trips_in_both_formats():
    ev = Event(type="round.completed", at=1767225600.5, round_id=3, detail={"accepted": 8, "accuracy": 0.91})
    for fmt in ("json", "msgpack"):
        env = envelope(ev, "/qflare/ns/test", fmt)
        assert decode_event(env.body, env.content_type) == ev
    env = envelope(ev, "/qflare/ns/test", "json")
    assert json.loads(env.body)["detail"] == {"accepted": 8, "accuracy": 0.91}
    assert attributes(env.headers) == {"id": env.id, "source": "/qflare/ns/test", "type": "round.completed",
                                       "specversion": "1.0", "time": "2026-01-01T00:00:00.500000Z"}


@pytest.mark.broker
async def test_events_carry_cloudevents_headers_json_and_persistence(broker):
    q = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
    await q.bind(broker.names.events_exchange, "#")
    await broker.publisher.event("round.completed", round_id=7, version=2, accepted=3, accuracy=0.5, rejected="")
    message = await _get(q)
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    attrs = attributes(message.headers)
    assert set(attrs) >= {"id", "source", "type", "specversion", "time"}
    assert all(k.startswith(PREFIX) for k in message.headers)
    assert attrs["type"] == "round.completed" and attrs["specversion"] == "1.0"
    assert attrs["source"] == f"/qflare/{broker.names.namespace}/pytest" and message.message_id == attrs["id"]
    body = json.loads(message.body)
    assert body["type"] == "round.completed" and body["round_id"] == 7 and body["detail"]["version"] == 2


@pytest.mark.broker
async def test_a_consumer_replays_the_events_stream_from_an_offset(broker):
    for i in range(5):
        await broker.publisher.event("round.opened", round_id=i + 1, deadline=0.0, min_updates=1, expected=0)
    ch = await broker.connection.channel()
    await ch.set_qos(prefetch_count=10)
    stream = await ch.declare_queue(broker.names.events_stream, passive=True)
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def on(message) -> None:
        seen.append((message.headers["x-stream-offset"], decode_event(message.body, message.content_type).round_id))
        await message.ack()
        if len(seen) >= 3:
            done.set()

    offsets: list[int] = []

    async def first(message) -> None:
        offsets.append(message.headers["x-stream-offset"])
        await message.ack()

    tag = await stream.consume(first, arguments={"x-stream-offset": "first"})
    await _until(lambda: len(offsets) >= 5)
    await stream.cancel(tag)
    await stream.consume(on, arguments={"x-stream-offset": offsets[2]})  # replay from the third event
    await asyncio.wait_for(done.wait(), 10)
    assert [r for _, r in seen[:3]] == [3, 4, 5]
    await ch.close()


async def _get(q, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        m = await q.get(fail=False, no_ack=True)
        if m is not None:
            return m
        await asyncio.sleep(0.05)
    raise AssertionError("no event arrived")


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.02)


def test_the_catalogue_names_each_event_once():
    keys = [e.key for e in EVENTS]
    assert len(keys) == len(set(keys))
