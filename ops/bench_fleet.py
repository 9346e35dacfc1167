"""A load test with a simulated fleet (``qflare bench fleet``): enrollments through the real
protocol, then rounds, for fleets of increasing size on one machine."""

from __future__ import annotations

import sys
import time

from common.report import md_table, write_section
from common.settings import Settings
from ops.demo import run_demo


async def run_bench(base: Settings, sizes: tuple[int, ...] = (100, 500, 1000), rounds: int = 2,
                    write_docs: bool = False) -> dict:
    results = []
    for n in sizes:
        t0 = time.perf_counter()
        report = await run_demo(base, devices=n, rounds=rounds, deadline=300)
        total = time.perf_counter() - t0
        results.append({"devices": n, "enroll_seconds": round(report.enroll_seconds, 2),
                        "enrollments_per_s": round(n / report.enroll_seconds, 1),
                        "round_seconds": [round(r.seconds, 2) for r in report.rounds],
                        "accepted": [r.accepted for r in report.rounds],
                        "rejected": [sum(r.rejected.values()) for r in report.rounds],
                        "total_seconds": round(total, 1)})
        print(results[-1], file=sys.stderr, flush=True)  # progress; stdout is for --json
    md = ("Coordinator, enclave and all devices in one process (`qflare demo --devices N`): every device\n"
          "generates its keys, enrolls with its own token and opens a session over the broker; each round\n"
          "every device trains on its shard (fleets larger than the data set share shards), seals, signs\n"
          "and publishes. Devices share one connection. With ~8 samples a device, honest updates are noisy\n"
          "and the cosine filter refuses some of them (`low_cosine`): a load test, not a learning setup.\n\n")
    md += md_table(["devices", "enrollment (s)", "enrollments/s", "round seconds", "accepted per round",
                    "rejected per round", "total (s)"],
                   [[r["devices"], r["enroll_seconds"], r["enrollments_per_s"], ", ".join(map(str, r["round_seconds"])),
                     ", ".join(map(str, r["accepted"])), ", ".join(map(str, r["rejected"])), r["total_seconds"]]
                    for r in results])
    if write_docs:
        write_section("fleet", "## Simulated fleets (`qflare bench fleet`)\n\n" + md)
    return {"fleets": results}
