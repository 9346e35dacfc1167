"""Simulated fleets of 100, 500 and 1,000 devices; writes docs/benchmarks.md."""

import asyncio
import json

from common.settings import load_settings
from ops.bench_fleet import run_bench
from ops.tuning import tune_allocator

if __name__ == "__main__":
    tune_allocator()
    print(json.dumps(asyncio.run(run_bench(load_settings(), write_docs=True)), indent=2))
