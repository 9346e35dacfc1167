"""The running services' own consumers: refused messages are dead-lettered with a reason and
the service goes on serving (issue: foundation, "done when")."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from schemas.codec import encode
from schemas.messages import Event, Ping, Pong
from schemas.names import REASON_HEADER, Names
from tests.services import EventLog, coordinator, enclave, enrolled
from tests.test_broker import drain_dead_letters
from tests.test_rounds import honest_update, open_round, publish

pytestmark = pytest.mark.broker

BAD = [
    (b"\xc1\xc1 not msgpack", "malformed"),
    (encode(Event(type="x", at=0.0)), "unknown_type"),
    (msgpack.packb({"v": 7, "t": "update", "b": {}}), "unknown_version"),
]


async def test_coordinator_and_enclave_survive_bad_messages_on_every_queue(broker, settings):
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(update={"max_message_bytes": 65536})})
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "update.accepted")
        names = broker.names
        oversize = b"\x00" * 70000
        targets = [(names.rpc_exchange, Names.COORDINATOR_KEY), (names.updates_exchange, "update.x"),
                   (names.control_exchange, Names.ENCLAVE_CONTROL_KEY)]
        for exchange, key in targets:
            for body, _ in BAD + [(oversize, "oversize")]:
                await broker.publisher.publish(exchange, key, body)
        dead = await drain_dead_letters(broker, 4 * len(targets))
        by_queue: dict[str, list[str]] = {}
        for m in dead:
            by_queue.setdefault(m.headers["x-qflare-queue"], []).append(m.headers[REASON_HEADER])
        expected = sorted([r for _, r in BAD] + ["oversize"])
        assert {q: sorted(r) for q, r in by_queue.items()} == {
            names.coordinator_queue: expected, names.updates_queue: expected, names.enclave_control_queue: expected}
        # each service still does its job
        rpc = await broker.rpc()
        pong = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, Ping(nonce=b"after"), Pong, 5)
        assert pong.nonce == b"after"
        dev = await enrolled(broker, coord, "still-works")
        await open_round(coord, broker, 1, ["still-works"])
        await asyncio.sleep(0.3)
        _, key, body = honest_update(dev, enc, 1)
        await publish(broker, key, body)
        await events.wait("update.accepted")


async def test_metrics_count_outcomes(broker, settings):
    from common.metrics import COORDINATOR as REGISTRY  # the coordinator's own registry

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_ok = value("qflare_enrollments_total", outcome="ok")
    before_bad = value("qflare_enrollments_total", outcome="token_unknown")
    async with coordinator(settings) as coord:
        await enrolled(broker, coord, "metered", session=False)
        from schemas.reasons import QflareError
        from tests.test_enrollment import enroll
        with pytest.raises(QflareError):
            await enroll(broker, coord, "metered-2", "no-such-token")
    assert value("qflare_enrollments_total", outcome="ok") == before_ok + 1
    assert value("qflare_enrollments_total", outcome="token_unknown") == before_bad + 1
