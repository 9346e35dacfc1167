"""Throughput of every algorithm on every installed backend, and of sealing.

Figures are operations per second (key generation, encapsulation, decapsulation, signing,
verification) and MB/s (seal, open; 1 MB = 10^6 bytes), each the best of a few timed
batches so one scheduling hiccup does not decide the figure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from common.report import md_table
from pqc.ids import KemId, SigId
from pqc.registry import get_kem, get_signature, kem_backends, sig_backends
from pqc.seal import open_sealed, seal

SEAL_SIZES = (1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)
QUICK_SEAL_SIZES = (1 << 10, 1 << 20)


def _rate(fn: Callable[[], object], min_time: float, repeats: int = 3) -> float:
    """Calls per second: the best of ``repeats`` batches each lasting at least ``min_time``."""
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / n)
    return 1.0 / best


def _kem_rows(min_time: float) -> list[dict[str, Any]]:
    rows = []
    for k in KemId:
        for backend in kem_backends(k):
            kem = get_kem(k, backend)
            pk, sk = kem.generate_keypair()
            ct, _ = kem.encapsulate(pk)
            rows.append({"algorithm": k.value, "backend": backend,
                         "keygen": _rate(kem.generate_keypair, min_time),
                         "encaps": _rate(partial(kem.encapsulate, pk), min_time),
                         "decaps": _rate(partial(kem.decapsulate, sk, ct), min_time)})
    return rows


def _sig_rows(min_time: float) -> list[dict[str, Any]]:
    rows, msg = [], os.urandom(1024)
    for s in SigId:
        for backend in sig_backends(s):
            sig = get_signature(s, backend)
            pk, sk = sig.generate_keypair()
            signature = sig.sign(sk, msg)
            rows.append({"algorithm": s.value, "backend": backend,
                         "keygen": _rate(sig.generate_keypair, min_time),
                         "sign": _rate(partial(sig.sign, sk, msg), min_time),
                         "verify": _rate(partial(sig.verify, pk, msg, signature), min_time)})
    return rows


def _seal_rows(sizes: tuple[int, ...], kems: list[KemId], min_time: float) -> list[dict[str, Any]]:
    rows = []
    for k in kems:
        pk, sk = get_kem(k).generate_keypair()
        for size in sizes:
            data, aad = os.urandom(size), b"bench"
            sealed = seal(k, pk, data, aad)
            rows.append({"algorithm": k.value, "bytes": size,
                         "seal_MBps": size * _rate(partial(seal, k, pk, data, aad), min_time) / 1e6,
                         "open_MBps": size * _rate(partial(open_sealed, sk, sealed, aad), min_time) / 1e6})
    return rows


def run_crypto_bench(quick: bool = False) -> dict[str, Any]:
    """Every figure as a dict (``kem``, ``signature``, ``seal`` lists of rows)."""
    min_time = 0.05 if quick else 0.3
    seal_kems = [KemId.ML_KEM_768] if quick else list(KemId)
    return {"quick": quick,
            "kem": _kem_rows(min_time),
            "signature": _sig_rows(min_time),
            "seal": _seal_rows(QUICK_SEAL_SIZES if quick else SEAL_SIZES, seal_kems, min_time)}


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def render_markdown(result: dict[str, Any]) -> str:
    """The figures as Markdown tables for docs/benchmarks.md."""
    kem = md_table(["KEM", "backend", "keygen/s", "encaps/s", "decaps/s"],
                   [[r["algorithm"], r["backend"], f"{r['keygen']:,.0f}", f"{r['encaps']:,.0f}",
                     f"{r['decaps']:,.0f}"] for r in result["kem"]])
    sig = md_table(["signature", "backend", "keygen/s", "sign/s", "verify/s"],
                   [[r["algorithm"], r["backend"], f"{r['keygen']:,.0f}", f"{r['sign']:,.0f}",
                     f"{r['verify']:,.0f}"] for r in result["signature"]])
    sealed = md_table(["KEM", "payload", "seal MB/s", "open MB/s"],
                      [[r["algorithm"], _size(r["bytes"]), f"{r['seal_MBps']:,.0f}",
                        f"{r['open_MBps']:,.0f}"] for r in result["seal"]])
    mode = " (quick)" if result.get("quick") else ""
    return (f"## Crypto{mode}\n\nKEM operations per second:\n\n{kem}\n\n"
            f"Signature operations per second (1 KiB message):\n\n{sig}\n\n"
            f"Sealing (`pqc.seal` / `pqc.open_sealed`, MB = 10^6 bytes):\n\n{sealed}\n")
