"""Wall time per named stage, added from any thread: where a pipeline's time goes
(``qflare bench round`` reads the enclave's and the devices').
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time


class Stages:
    """Seconds spent per intake stage, added from worker threads (for ``qflare bench round``).

    The enclave's: verify (grant and device signature), decrypt (KEM + AES-GCM), decode
    (payload into the delta, finiteness and norm), reassembly (a chunk into its update's
    buffer, the running digest), store (segment write), commit (fsync + SQLite commit), ack
    (acks and events). A device's: seal (KEM + AES-GCM) and sign.
    """

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextlib.contextmanager
    def time(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)


def timed(stages: Stages | None, stage: str):
    """``stages.time(stage)``, or nothing when no one counts."""
    return stages.time(stage) if stages is not None else contextlib.nullcontext()
