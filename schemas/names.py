"""Names of every exchange, queue and routing key: the one place they are spelled.

All names are prefixed by a configurable namespace so that several deployments (or
tests) can share one broker without touching each other's topology.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Header carrying the codec's reason when a message is dead-lettered.
REASON_HEADER = "x-qflare-reason"
#: Header carrying the human-readable detail of that reason.
DETAIL_HEADER = "x-qflare-detail"


@dataclass(frozen=True)
class Names:
    """Topology names under one namespace, e.g. ``Names("qflare").updates_queue``."""

    namespace: str = "qflare"

    def _n(self, suffix: str) -> str:
        return f"{self.namespace}.{suffix}"

    # exchanges
    @property
    def rpc_exchange(self) -> str:
        """Direct exchange for coordinator requests (enroll, session, attest, rounds)."""
        return self._n("rpc")

    @property
    def updates_exchange(self) -> str:
        """Direct exchange for sealed updates; routing key = ``update.<device id>``."""
        return self._n("updates")

    @property
    def models_exchange(self) -> str:
        """Fanout exchange for signed global models and round announcements."""
        return self._n("models")

    @property
    def events_exchange(self) -> str:
        """Topic exchange for events (``device.enrolled``, ``update.rejected.<reason>``...)."""
        return self._n("events")

    @property
    def dlx(self) -> str:
        """Dead-letter exchange (fanout) for malformed or undeliverable messages."""
        return self._n("dlx")

    @property
    def control_exchange(self) -> str:
        """Direct exchange for coordinator → enclave commands (round open, revocations)."""
        return self._n("control")

    @property
    def operator_exchange(self) -> str:
        """Direct exchange for signed operator requests; only operator broker users may write it."""
        return self._n("operator")

    # queues
    @property
    def operator_queue(self) -> str:
        """The coordinator's queue of signed operator requests (rounds, tokens, devices)."""
        return self._n("coordinator.operator")

    @property
    def coordinator_queue(self) -> str:
        return self._n("coordinator.requests")

    @property
    def updates_queue(self) -> str:
        """Quorum queue the enclave consumes with manual acks."""
        return self._n("enclave.updates")

    @property
    def enclave_control_queue(self) -> str:
        return self._n("enclave.control")

    @property
    def models_stream(self) -> str:
        """Stream holding every global model, for devices returning from offline."""
        return self._n("models.latest")

    @property
    def dead_letter_queue(self) -> str:
        return self._n("dead-letters")

    def private_queue(self, client_id: str, purpose: str, suffix: str) -> str:
        """An exclusive queue a client declares for itself (RPC replies, model feed).

        Prefixed by the client id so a per-device broker user can be allowed exactly its own
        queues (see :func:`broker.users.device_permissions`).
        """
        return self.client_queues_prefix(client_id) + f"{purpose}.{suffix}"

    def client_queues_prefix(self, client_id: str) -> str:
        return self._n(f"client.{client_id}.")

    # routing keys
    @staticmethod
    def update_key(device_id: str) -> str:
        return f"update.{device_id}"

    COORDINATOR_KEY = "coordinator"
    OPERATOR_KEY = "operator"
    ENCLAVE_CONTROL_KEY = "enclave"
