"""A real-size model's round trip (``qflare bench large``): 25 M parameters, 100 MB each way.

The enclave runs in its own process on a zero model of 25 M float32 parameters. Each of k
devices sends a 100 MB update (24 chunks of 4 MiB, sealed as one stream, one signature);
the enclave reassembles, stores and aggregates them and publishes the new model in chunks,
which a listening device receives and checks against the signed digests. Reported: seconds
from the first chunk published to the whole model at the device, and the enclave's peak
RSS for several k: it grows until ``chunking.max_in_progress`` updates are reassembled at
once, then stays flat (memory is O(max_in_progress × model), not O(updates)).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from broker.client import BrokerClient
from common import compression
from common.chunks import max_update_chunks
from common.events import decode_event
from common.report import md_table, write_section
from common.settings import Settings
from coordinator.service import META_ENCLAVE_REPORT, Coordinator
from edge_agent import client, updates
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from ops.bench_round import _enclave_process, _settings, _teardown
from schemas.codec import CodecError, encode
from schemas.messages import Event, RoundOpen, RoundSpec

PARAMS = 25_000_000


async def _one(base: Settings, d: int, k: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="qflare-bench-large-"))
    settings = _settings(base, root / "state")
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(
        update={"max_message_bytes": base.broker.max_message_bytes, "prefetch": base.broker.prefetch}),
        # a round of k updates, even k = 1 (the default run's first): fl.min_accepted's floor of 3
        # guards real rounds against one device setting the model, not this measurement
        "fl": settings.fl.model_copy(update={"min_accepted": 1})})
    coord = Coordinator(settings)
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_enclave_process, args=(settings.model_dump(mode="json"), d, stop, out))
    b: BrokerClient | None = None
    try:
        await coord.start()
        child.start()
        b = await BrokerClient.open(settings, name="bench-large")
        events: list[Event] = []
        q = await b.channel.declare_queue(exclusive=True, auto_delete=True)
        await q.bind(b.names.events_exchange, "round.*")

        async def on(message) -> None:
            try:
                events.append(decode_event(message.body, message.content_type))
            except CodecError:
                pass

        await q.consume(on, no_ack=True)
        while coord.registry.get_meta(META_ENCLAVE_REPORT) is None:
            await asyncio.sleep(0.05)
        rpc = await b.rpc()
        devices = []
        for i in range(k + 1):  # the last one only listens
            token = coord.registry.create_token(f"big{i}", 600)
            dev = await client.enroll(rpc, b.names, f"big{i}", token, coord.identity.sig_fp,
                                      keys_message=encode(coord.keys_message),  # as its token file carries it
                                      sig_alg=settings.crypto.signature, kem_alg=settings.crypto.kem)
            await client.open_session(rpc, b.names, dev)
            devices.append(dev)
        fleet = Fleet(b, Outbox(root / "outbox.sqlite3"))
        fleet.add(Member(devices[-1], np.zeros((1, 64), np.float32), np.zeros(1, np.int64)))
        await fleet.listen()
        spec = RoundSpec(round_id=1, deadline=time.time() + 900, min_updates=k,
                         expected=[x.device_id for x in devices[:k]], epochs=1, lr=0.1, batch_size=16)
        await b.publisher.publish(b.names.control_exchange, "enclave",
                                  coord._sign(RoundOpen(spec=spec, issued_at=time.time())))
        while fleet.latest is None:  # model 0, itself 100 MB in chunks
            await asyncio.sleep(0.05)
        rng = np.random.default_rng(0)
        build_s = 0.0
        t0 = time.perf_counter()
        for dev in devices[:k]:
            delta = rng.normal(0, 0.01, d).astype(np.float32)
            tb = time.perf_counter()
            uid, key, bodies = updates.build_parts(dev, 1, 0, f"bench-{d}",
                                                   compression.encode(delta, "f32", settings.chunking.chunk_bytes), 100)
            build_s += time.perf_counter() - tb
            del delta
            assert await fleet.send(uid, key, bodies)
            del bodies
        while fleet.latest.version < 1:
            if any(e.type == "round.failed" for e in events):
                raise RuntimeError("the round failed")
            await asyncio.sleep(0.05)
        round_trip = time.perf_counter() - t0 - build_s
        stop.set()
        rss, stages, _ = await asyncio.to_thread(out.get, True, 120)
        model_mib = 4 * d / 2**20
        return {"params": d, "updates": k, "chunks_per_update": max_update_chunks(d, settings.chunking.chunk_bytes),
                "build_s_per_update": round(build_s / k, 2), "round_trip_s": round(round_trip, 1),
                "enclave_peak_rss_mib": round(rss, 1), "rss_in_models": round(rss / model_mib, 2),
                "stage_ms_per_update": {s: round(v / k * 1e3, 1) for s, v in sorted(stages.items())}}
    finally:
        await _teardown(stop, [child], b, coord, root, join_seconds=60)


async def run_bench(base: Settings, counts: tuple[int, ...] = (1, 3), write_docs: bool = False) -> dict:
    results = []
    for k in counts:
        results.append(await _one(base, PARAMS, k))
        print(results[-1], file=sys.stderr, flush=True)
    if write_docs:
        md = ("The enclave in its own process on a 25 M-parameter model (100 MB of float32); k devices each send a\n"
              "100 MB update as 24 chunks of 4 MiB (one KEM encapsulation, one ML-DSA-44 signature each); the\n"
              "enclave reassembles, stores, aggregates and publishes the new model in 24 chunks, which a\n"
              "listening device receives and checks against the signed digests. Round trip: first chunk\n"
              "published → whole new model at the device (building the updates excluded). Enclave peak RSS\n"
              "in MiB and in model sizes: it may grow until `chunking.max_in_progress` (4) updates are\n"
              "reassembled at once (one 100 MB buffer each, their chunks in the prefetch window), then\n"
              "stays flat: O(max_in_progress × model), not O(updates).\n\n")
        md += md_table(["parameters", "updates", "chunks per update", "build s per update", "round trip s",
                        "enclave peak RSS MiB", "RSS / model size"],
                       [[f"{r['params']:,}", r["updates"], r["chunks_per_update"], r["build_s_per_update"],
                         r["round_trip_s"], r["enclave_peak_rss_mib"], r["rss_in_models"]] for r in results])
        write_section("large", "## A 100 MB model's round trip (`qflare bench large`)\n\n" + md)
    return {"cases": results}
