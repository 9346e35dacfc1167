"""Prometheus metrics: every metric QFLARE exports is defined here, once.

``qflare coordinator run`` and ``qflare enclave run`` serve them over HTTP when
``metrics_port`` is set (``QFLARE_METRICS_PORT``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

DEAD_LETTERED = Counter("qflare_dead_lettered_total", "Messages dead-lettered", ["queue", "reason"])
HANDLED = Counter("qflare_messages_handled_total", "Messages handled", ["queue"])
ENROLLMENTS = Counter("qflare_enrollments_total", "Enrollment requests by outcome", ["outcome"])
SESSIONS = Counter("qflare_sessions_total", "Session requests by outcome", ["outcome"])
UPDATES = Counter("qflare_updates_total", "Updates by outcome (accepted or a rejection reason)", ["outcome"])
ROUNDS = Counter("qflare_rounds_total", "Rounds closed by status", ["status"])
ROUND_SECONDS = Histogram("qflare_round_close_seconds", "Time to screen, aggregate and publish a round")
ACCURACY = Gauge("qflare_model_accuracy", "Test accuracy of the latest global model")
MODEL_VERSION = Gauge("qflare_model_version", "Version of the latest global model")


def serve(port: int | None) -> None:
    """Expose /metrics on ``port`` (no-op when None)."""
    if port:
        start_http_server(port)
