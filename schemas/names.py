"""Names of every exchange, queue and routing key: the one place they are spelled.

All names are prefixed by a configurable namespace so that several deployments (or
tests) can share one broker without touching each other's topology.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Header carrying the codec's reason when a message is dead-lettered.
REASON_HEADER = "x-qflare-reason"
#: Header carrying the human-readable detail of that reason.
DETAIL_HEADER = "x-qflare-detail"
#: Header carrying a dead-lettered body's size before it was cut.
BODY_BYTES_HEADER = "x-qflare-body-bytes"
#: RabbitMQ's direct reply-to pseudo-queue: the only address RPC replies go to.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


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

    def shard_queue(self, shard: int, what: str) -> str:
        """Shard ``shard``'s own queue of ``what`` (``updates``, ``control``, ``models``, ``peers``) when
        the enclave is sharded (docs/scaling.md); shard 0 uses the single enclave's queues."""
        return self._n(f"enclave.shard.{shard}.{what}")

    @property
    def shard_queues_pattern(self) -> str:
        """A regex of every shard queue (broker permissions)."""
        return re.escape(self._n("enclave.shard.")) + r"[0-9]+\.(updates|control|models|peers)"

    @property
    def partials_queue(self) -> str:
        """The root enclave's queue of sealed shard partials (routing key ``PARTIALS_KEY`` on the rpc exchange)."""
        return self._n("enclave.partials")

    @property
    def models_stream(self) -> str:
        """Stream holding every global model, for devices returning from offline."""
        return self._n("models.latest")

    @property
    def events_stream(self) -> str:
        """Stream bound to the events exchange (``#``): consumers replay events from an offset."""
        return self._n("events.log")

    @property
    def dead_letter_queue(self) -> str:
        return self._n("dead-letters")

    @property
    def topology_exchanges(self) -> tuple[str, ...]:
        """Every exchange of the namespace (the operator's included)."""
        return (self.rpc_exchange, self.updates_exchange, self.models_exchange, self.events_exchange, self.dlx,
                self.control_exchange, self.operator_exchange)

    @property
    def topology_queues(self) -> tuple[str, ...]:  # the sharded enclave's: shard_queue, partials_queue
        """Every durable queue of the namespace (the operator queue included)."""
        return (self.coordinator_queue, self.operator_queue, self.updates_queue, self.enclave_control_queue,
                self.models_stream, self.events_stream, self.dead_letter_queue)

    def private_queue(self, client_id: str, purpose: str, suffix: str) -> str:
        """An exclusive queue a client declares for itself (its model feed, its events).

        Prefixed by the client id so a per-device broker user can be allowed exactly its own
        queues (see :func:`broker.users.device_permissions`).
        """
        return self.client_queues_prefix(client_id) + f"{purpose}.{suffix}"

    def client_queues_prefix(self, client_id: str) -> str:
        """``<ns>.client.<id>:``, ending in a character no device id contains, so device
        ``D``'s prefix never covers device ``D.x``'s queues."""
        return self._n(f"client.{client_id}:")

    @property
    def client_queues_pattern(self) -> str:
        """Regex of every client queue of this namespace (the client queue policies')."""
        return "^" + re.escape(self._n("client."))

    @property
    def client_queues_policy(self) -> str:
        """Policy bounding classic and quorum client queues (bytes, idle expiry)."""
        return self._n("client-queues")

    @property
    def client_streams_policy(self) -> str:
        """Policy bounding any stream a client declares (streams ignore a policy with ``expires``)."""
        return self._n("client-streams")

    # broker users (docs/security.md, Broker identities)
    def service_user(self, role: str) -> str:
        """``qflare.<ns>.<role>`` for the coordinator, enclave and operator."""
        return f"qflare.{self._n(role)}"

    def device_user(self, device_id: str) -> str:
        """``qflare.<ns>.device.<id>``: a namespace has no dot, a role is not ``device``,
        so no device id names a service user or another namespace's user."""
        return f"qflare.{self._n('device')}.{device_id}"

    # routing keys
    @staticmethod
    def update_key(device_id: str, shard: int | None = None) -> str:
        """``update.<id>``; to enclave shard ``shard`` (docs/scaling.md) ``shard.<shard>.<id>``,
        a first word the single updates queue's ``update.#`` binding does not match."""
        return f"update.{device_id}" if shard is None else f"{Names.SHARD_UPDATE_WORD}.{shard}.{device_id}"

    @staticmethod
    def shard_updates_binding(shard: int) -> str:
        """What shard ``shard``'s updates queue is bound to: its own devices' keys only."""
        return f"{Names.SHARD_UPDATE_WORD}.{shard}.#"

    @staticmethod
    def routed_device(routing_key: str | None) -> str | None:
        """The device id an updates routing key names (None: no dot, so none; ``""`` when a
        key names an empty one, which then matches no signed device id)."""
        if not routing_key or "." not in routing_key:
            return None
        word, rest = routing_key.split(".", 1)
        if word == Names.SHARD_UPDATE_WORD:
            return rest.split(".", 1)[1] if "." in rest else ""
        return rest

    #: First word of an update's routing key when the enclave is sharded (``shard.<i>.<id>``).
    SHARD_UPDATE_WORD = "shard"

    COORDINATOR_KEY = "coordinator"
    OPERATOR_KEY = "operator"
    ENCLAVE_CONTROL_KEY = "enclave"
    #: Sealed shard partials to the root enclave, on the rpc exchange (docs/scaling.md).
    PARTIALS_KEY = "enclave.partials"
    #: Each shard's admission to the other shards, on the rpc exchange (schemas.messages.PeerAdmission).
    PEERS_KEY = "enclave.peers"
