"""Enrollments/s and sessions/s per algorithm suite; writes docs/benchmarks.md."""

import asyncio
import json

from common.settings import load_settings
from ops.bench_handshake import run_bench
from ops.tuning import tune_allocator

if __name__ == "__main__":
    tune_allocator()
    print(json.dumps(asyncio.run(run_bench(load_settings(), write_docs=True)), indent=2))
