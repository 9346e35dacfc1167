"""A real-size model through the real broker: 25 M parameters (100 MB) each way.

The update travels as 24 chunks of 4 MiB (the default chunk size), is reassembled and
stored by the enclave, and the new global model comes back in chunks on the fanout (to a
listening device) and from the models stream (to a returning one). Memory flatness in the
number of updates is measured by ``qflare bench large`` (docs/benchmarks.md).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from common import compression
from edge_agent import updates
from edge_agent.fleet import Fleet, Member, verify_model
from edge_agent.models import ModelAssembly, latest_model_messages
from edge_agent.outbox import Outbox
from enclave_worker.service import Enclave
from schemas.codec import decode
from schemas.messages import ModelChunk
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enrolled
from tests.test_rounds import open_round

pytestmark = [pytest.mark.broker, pytest.mark.slow]

N = 25_000_000


async def test_a_100_megabyte_model_makes_the_round_trip_in_chunks(broker, settings, tmp_path):
    s = settings.model_copy(update={"fl": settings.fl.model_copy(update={"evaluate": False})})
    layout = "big-25m"
    async with coordinator(s) as coord:
        enc = Enclave(s, initial=(np.zeros(N, dtype=np.float32), layout))
        await enc.start(attest_timeout=15)
        try:
            events = await EventLog.bind(broker, "update.#", "round.*")
            sender = await enrolled(broker, coord, "sender")
            watcher = await enrolled(broker, coord, "watcher")
            fleet = Fleet(broker, Outbox(tmp_path / "outbox.sqlite3"))
            fleet.add(Member(watcher, np.zeros((1, 64), np.float32), np.zeros(1, np.int64)))
            await fleet.listen()
            await open_round(coord, broker, 1, ["sender"], deadline=300)
            await events.wait("round.opened", timeout=60)

            delta = np.random.default_rng(0).normal(0, 0.01, N).astype(np.float32)
            encoded = compression.encode(delta, "f32", s.chunking.chunk_bytes)
            uid, key, bodies = updates.build_parts(sender, 1, 0, layout, encoded, 100)
            del encoded
            assert len(bodies) == 24 and max(map(len, bodies)) < s.broker.max_message_bytes
            t0 = time.perf_counter()
            fleet.outbox.put(uid, "sender", key, bodies, 1)
            assert await fleet.send(uid, key, bodies)
            del bodies
            done = await events.wait("round.completed", timeout=240)
            assert done[0].detail["accepted"] == 1
            await wait_for(lambda: fleet.latest is not None and fleet.latest.version == 1, timeout=120)
            seconds = time.perf_counter() - t0
            live = np.frombuffer(fleet.latest.params, dtype="<f4")
            np.testing.assert_allclose(live, delta, rtol=1e-6, atol=1e-9)
            assert not enc.chunks.active

            # a device that was away reads the same model, whole, from the stream
            messages = await latest_model_messages(broker)
            signed = verify_model(messages[0], sender)
            assert signed.version == 1 and len(messages) == 1 + len(signed.chunk_digests) == 25
            assembly = ModelAssembly(signed)
            whole = [assembly.add(decode(m, ModelChunk)) for m in messages[1:]][-1]
            np.testing.assert_array_equal(np.frombuffer(whole.params, dtype="<f4"), live)
            print(f"\n100 MB update → enclave → 100 MB model at a device: {seconds:.1f} s")
        finally:
            await enc.stop()
