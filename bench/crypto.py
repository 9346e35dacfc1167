"""Benchmark the crypto suite and record the figures in docs/benchmarks.md.

    python bench/crypto.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json

from common.report import write_section
from ops.bench_crypto import render_markdown, run_crypto_bench
from ops.tuning import tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and shorter timings")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = run_crypto_bench(quick=args.quick)
    md = render_markdown(result)
    write_section("crypto", md)
    print(json.dumps(result, indent=1) if args.json else md)


if __name__ == "__main__":
    tune_allocator()
    main()
