"""Sync rounds against async (FedBuff) on an intermittent fleet; ``--write-docs`` updates docs/benchmarks.md."""

import asyncio
import json
import sys

from common.settings import load_settings
from ops.bench_intermittent import run_bench

if __name__ == "__main__":
    result = asyncio.run(run_bench(load_settings(), write_docs="--write-docs" in sys.argv))
    print(json.dumps(result, indent=2))
