"""Every event the services emit: its routing key, when it is sent, and its fields.

The events exchange is for other systems, so this catalogue is the contract:
``docs/asyncapi.yaml`` is generated from it (``python -m ops.asyncapi``), ``docs/protocol.md``
describes it, and a test fails when a service emits an event type that is not listed here.
Each event's body is the :class:`~schemas.messages.Event` fields (``type``, ``at``,
``device_id``, ``round_id``, ``reason``, ``detail``); ``detail`` holds the fields of the
event's ``Detail`` model below. A ``{reason}`` in a key is one of the reason codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class Detail(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class WithFingerprint(Detail):
    sig_fp: str  # SHA3-256 fingerprint of the device's signature key


class SessionsOpened(Detail):
    count: int  # sessions opened by this coordinator since its last sessions.opened
    kem_v3: int = 0  # of which with handshake kem-v3 (docs/crypto.md)
    kem_v2: int = 0  # of which with handshake kem-v2
    sig_v1: int = 0  # of which with handshake sig-v1
    seconds: float  # the span they were opened in


class Refusal(Detail):
    detail_text: str = ""  # what was wrong, for people (at most 200 characters)


class EnclaveAttested(Detail):
    measurement: str  # SHA3-256 of the enclave's code (hex)
    kem_fp: str  # fingerprint of the enclave's KEM key, to which devices seal updates
    sig_fp: str = ""  # fingerprint of the enclave's signature key, which signs global models
    platform_fp: str = ""  # fingerprint of the platform key that signed the attestation report
    platform: str = ""  # which platform attested: "simulated" until a real TEE quote is checked


class RoundOpened(Detail):
    deadline: float  # Unix time after which the round closes with what it has
    min_updates: int
    expected: int  # how many devices the round waits for (0: any)


class UpdateAccepted(Detail):
    update_id: str
    #: With fl.defend: the device's reputation (0-1, 1 for a new device) and whether it is in
    #: quarantine, as the round's screening will judge this update.
    reputation: float | None = None
    quarantined: bool | None = None


class UpdateRejected(Detail):
    detail_text: str = ""
    update_id: str = ""  # set when a filter refused a stored update at the round's close


class RoundCompleted(Detail):
    version: int  # the new global model's version
    accepted: int
    accuracy: float | None = None  # on the digits test split; None when fl.evaluate is off
    rejected: str = ""  # "reason=count,..." over the whole round, e.g. "norm_bound=2,replay=1"
    metrics: str = ""  # the task's metrics of the new model, "name=value,...", e.g. "accuracy=0.91,loss=0.3"


class ModelPublished(Detail):
    version: int  # the new global model's version
    accepted: int  # updates of the buffer the model aggregates
    accuracy: float | None = None  # the task's accuracy of the new model; None when fl.evaluate is off
    staleness_max: int = 0  # versions between the oldest buffered update's base model and the previous model
    staleness_mean: float = 0.0
    rejected: str = ""  # "reason=count,..." of this buffer, e.g. "low_cosine=1"
    metrics: str = ""  # the task's metrics of the new model, "name=value,..."


class RoundFailed(Detail):
    received: int  # updates stored when the round closed
    accepted: int = 0  # of those, accepted by the screening (fewer than fl.min_accepted: too_few_accepted)


class ShardPartialSent(Detail):
    shard: int  # the shard that sent it (1 .. enclave.shards - 1; shard 0 is the root)
    received: int  # its devices' updates stored for the round
    accepted: int  # of those, accepted by its screening


class ShardRefusal(Detail):
    shard: int = -1  # the shard the partial named (-1: it did not open far enough to say)
    detail_text: str = ""  # what was wrong, for people (at most 200 characters)


class ShardMissing(Detail):
    shard: int  # the shard whose partial had not come when the root closed the round


class UpdateClipped(Detail):
    update_id: str
    claimed: int  # the sample count the device claimed
    weight: int  # the weight it was given: min(claim, fl.sample_cap_multiple x median claim, fl.max_num_samples)


class Quarantined(Detail):
    reputation: float  # the device's reputation (0-1) that fell below fl.quarantine_below


class RootData(Detail):
    samples: int  # how many labelled samples the root data holds


class RoundCancelled(Detail):
    received: int  # updates stored when the round was aborted (none are aggregated)


class RoundStalled(Detail):
    remaining: int  # rounds of the plan after this one
    action: str = ""  # "waiting" (the round open is sent again) or "cancelled" (the plan is dropped)
    waited: float = 0.0  # seconds waited past the deadline


class CoordinatorRotated(Detail):
    old_fp: str
    new_fp: str


class DeadLettered(Detail):
    queue: str  # the queue the refused message came from
    detail_text: str = ""


@dataclass(frozen=True)
class EventSpec:
    key: str  # routing key and event type; "{reason}" stands for a reason code
    summary: str
    detail: type[Detail]
    fields: tuple[str, ...] = ()  # which of device_id, round_id, reason the event sets
    source: str = ""  # which service emits it

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.key).replace(r"\{reason\}", "[a-z_]+") + "$")

    @property
    def binding(self) -> str:
        """The AMQP topic binding that matches this event (``update.rejected.*``)."""
        return self.key.replace("{reason}", "*")


EVENTS: tuple[EventSpec, ...] = (
    EventSpec("device.enrolled", "A device enrolled with a one-time token.", WithFingerprint, ("device_id",),
              "coordinator"),
    EventSpec("device.revoked", "An operator revoked a device; its sessions and updates are refused from now on.",
              WithFingerprint, ("device_id", "reason"), "operator"),
    EventSpec("device.rotated", "A device rotated its keys (signed by the old key).", WithFingerprint,
              ("device_id",), "coordinator"),
    EventSpec("sessions.opened", "Forward-secret sessions were opened: one event per coordinator per "
              "`events.sessions_every_seconds` with the count, not one per session (the registry's sessions "
              "table holds each).", SessionsOpened, (), "coordinator"),
    EventSpec("enrollment.rejected.{reason}", "An enrollment request was refused.", Refusal,
              ("device_id", "reason"), "coordinator"),
    EventSpec("session.rejected.{reason}", "A session request was refused.", Refusal, ("device_id", "reason"),
              "coordinator"),
    EventSpec("rotation.rejected.{reason}", "A device key rotation was refused.", Refusal, ("device_id", "reason"),
              "coordinator"),
    EventSpec("attestation.rejected.{reason}", "An enclave's attestation was refused (`forbidden`: not sent by "
              "an enclave broker user).", Refusal, ("reason",), "coordinator"),
    EventSpec("operator.rejected.{reason}", "A signed operator request was refused (`forbidden`, `not_operator`, "
              "`bad_signature`, `stale`, `replay`, `invalid_field`, ...).", Refusal, ("reason",), "coordinator"),
    EventSpec("enclave.attested", "The coordinator admitted an enclave (measurement allow-listed, platform trusted).",
              EnclaveAttested, (), "coordinator"),
    EventSpec("coordinator.rotated", "The coordinator's keys were rotated (the old key signed the new).",
              CoordinatorRotated, (), "operator"),
    EventSpec("device.quarantined", "The enclave quarantined a device after repeated rejections: its updates are "
              "judged but not aggregated until its reputation recovers.", Quarantined, ("device_id", "round_id"),
              "enclave"),
    EventSpec("enclave.root_data", "The enclave keeps the operator's sealed root data (the clean reference its "
              "defences use).", RootData, (), "enclave"),
    EventSpec("enclave.root_data.rejected.{reason}", "The enclave refused the operator's sealed root data (the "
              "clean reference its defences use).", Refusal, ("reason",), "enclave"),
    EventSpec("round.opened", "The enclave opened a round and announced it on the models fanout.", RoundOpened,
              ("round_id",), "enclave"),
    EventSpec("update.accepted", "The enclave stored a device's update durably.", UpdateAccepted,
              ("device_id", "round_id"), "enclave"),
    EventSpec("update.rejected.{reason}", "The enclave refused an update, at intake or by a filter at the close.",
              UpdateRejected, ("device_id", "round_id", "reason"), "enclave"),
    EventSpec("update.clipped", "A stored update's claimed sample count was over the round's cap; it is "
              "aggregated with the capped weight (docs/security.md, \"Sample counts\").", UpdateClipped,
              ("device_id", "round_id"), "enclave"),
    EventSpec("round.completed", "A round closed: the new global model is signed and published.", RoundCompleted,
              ("round_id",), "enclave"),
    EventSpec("model.published", "An async round's buffer (fl.buffer_size accepted updates, weighed by "
              "1/sqrt(1 + staleness)) passed the filters and made a new global model, signed and published; the "
              "round stays open.", ModelPublished, ("round_id",), "enclave"),
    EventSpec("round.failed", "A round closed with fewer stored updates than its min_updates (at its deadline, or "
              "when the next round opened first; reason `too_few_updates`), or with fewer updates accepted by the "
              "screening than fl.min_accepted (reason `too_few_accepted`). No model is published.", RoundFailed,
              ("round_id", "reason"), "enclave"),
    EventSpec("round.cancelled", "The enclave closed a round at the coordinator's signed `round.abort` (an "
              "operator's cancel, or a dropped plan); reason `cancelled`. No model is published.", RoundCancelled,
              ("round_id", "reason"), "enclave"),
    EventSpec("round.stalled", "No close was heard within a round's deadline plus recovery.stall_report_seconds: "
              "a warning (`action=waiting`, the round open is sent again), then after "
              "recovery.stall_limit_seconds the plan is cancelled (`action=cancelled`); reason `no_enclave`.",
              RoundStalled, ("round_id", "reason"), "coordinator"),
    EventSpec("shard.partial.sent", "Sharded enclaves: a shard closed its part of a round and sent the root its "
              "signed, sealed partial aggregate (docs/scaling.md).", ShardPartialSent, ("round_id",), "enclave"),
    EventSpec("shard.partial.rejected.{reason}", "Sharded enclaves: the root refused a partial (`bad_signature`: "
              "not signed by an admitted enclave key; `replay`: a second one of its shard this round; "
              "`wrong_round`, `stale_base`, `wrong_shard`, ...), or left it out of the model (`outlier`, "
              "`norm_bound`).", ShardRefusal, ("reason",), "enclave"),
    EventSpec("shard.missing", "Sharded enclaves: the root closed a round at its deadline (plus "
              "enclave.partial_wait_seconds) without this shard's partial; the model is made from the others; "
              "reason `missing_shard`.", ShardMissing, ("round_id", "reason"), "enclave"),
    EventSpec("dead_letter.{reason}", "A consumer refused a message and copied it to the dead-letter queue.",
              DeadLettered, ("reason",), "any"),
)


def spec_for(event_type: str) -> EventSpec | None:
    """The catalogue entry whose key matches ``event_type`` (None: not a documented event)."""
    return next((e for e in EVENTS if e.pattern.match(event_type)), None)
