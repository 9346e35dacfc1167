"""Prometheus metrics: every metric QFLARE exports is defined here, once.

Conventions (prometheus.io/docs/practices/naming): base units in the name (``_seconds``,
``_bytes``), counters end in ``_total``, latencies are histograms. Each service exports only
what it can know: the coordinator's registry holds enrollment and session figures, the
enclave's holds updates, rounds and the model; both hold the broker plumbing's counters.
``qflare coordinator run`` / ``qflare enclave run`` serve them at ``/metrics`` on
``coordinator.http_port`` / ``enclave.http_port`` (see :mod:`common.health`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: Latency buckets (seconds) for handshakes and update intake: 1 ms .. 10 s.
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Buckets for closing a round (screen, aggregate, evaluate, sign, publish): 10 ms .. 5 min.
ROUND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# broker plumbing (both services)
DEAD_LETTERED = Counter("qflare_dead_lettered_total", "Messages dead-lettered, by queue and reason",
                        ["queue", "reason"], registry=None)
HANDLED = Counter("qflare_messages_handled_total", "Messages handled, by queue", ["queue"], registry=None)

# coordinator
ENROLLMENTS = Counter("qflare_enrollments_total", "Enrollment requests by outcome", ["outcome"], registry=None)
SESSIONS = Counter("qflare_sessions_total", "Session requests by outcome", ["outcome"], registry=None)
HANDSHAKE_SECONDS = Histogram("qflare_handshake_duration_seconds",
                              "Time the coordinator spends answering an enrollment or session request",
                              ["kind"], buckets=FAST_BUCKETS, registry=None)

# enclave
UPDATES = Counter("qflare_updates_total", "Updates by their verdict at intake (accepted: stored; or a rejection "
                  "reason), each counted once", ["outcome"], registry=None)
#: Stored (intake-accepted) updates the round's close then left out: a filter, quarantine, revoked.
CLOSE_REFUSED = Counter("qflare_updates_refused_at_close_total",
                        "Stored updates the round's close left out, by reason", ["reason"], registry=None)
INTAKE_SECONDS = Histogram("qflare_update_intake_duration_seconds",
                           "Time from an update's delivery to its verdict (verify, open, store)",
                           buckets=FAST_BUCKETS, registry=None)
ROUNDS = Counter("qflare_rounds_total", "Rounds closed by status", ["status"], registry=None)
ROUND_SECONDS = Histogram("qflare_round_close_duration_seconds",
                          "Time to screen, aggregate, evaluate, sign and publish a round",
                          buckets=ROUND_BUCKETS, registry=None)


class LatestModel(Collector):
    """The enclave's latest global model: exported only once known (no made-up 0.0)."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.accuracy: float | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.version is not None:
            yield GaugeMetricFamily("qflare_model_version", "Version of the latest global model",
                                    value=self.version)
        if self.accuracy is not None:
            yield GaugeMetricFamily("qflare_model_accuracy_ratio",
                                    "Test accuracy (0-1) of the latest global model on the task's test data",
                                    value=self.accuracy)


MODEL = LatestModel()


def _registry(*collectors: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    for c in (*collectors, DEAD_LETTERED, HANDLED):
        reg.register(c)
    ProcessCollector(registry=reg)
    return reg


#: What ``qflare coordinator run`` exports.
COORDINATOR = _registry(ENROLLMENTS, SESSIONS, HANDSHAKE_SECONDS)
#: What ``qflare enclave run`` exports.
ENCLAVE = _registry(UPDATES, CLOSE_REFUSED, INTAKE_SECONDS, ROUNDS, ROUND_SECONDS, MODEL)
