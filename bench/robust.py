"""Poisoning defences against the attack library; ``--write-docs`` updates docs/benchmarks.md."""

import json
import sys

from ops.bench_robust import render, run_bench

if __name__ == "__main__":
    result = run_bench(quick="--quick" in sys.argv, write_docs="--write-docs" in sys.argv,
                       progress=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps(result, indent=2) if "--json" in sys.argv else render(result))
