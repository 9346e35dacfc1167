"""Updates/s through the enclave, sealed vs plaintext, latency, memory; writes docs/benchmarks.md."""

import asyncio
import json
import sys

from common.settings import load_settings
from ops.bench_round import run_bench
from ops.tuning import tune_allocator

if __name__ == "__main__":
    tune_allocator()
    print(json.dumps(asyncio.run(run_bench(load_settings(), quick="--quick" in sys.argv, write_docs=True)), indent=2))
