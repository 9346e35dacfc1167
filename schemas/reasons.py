"""Reason codes: one enum shared by typed errors, replies, events and dead-letter headers."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # wire / codec
    MALFORMED = "malformed"
    OVERSIZE = "oversize"
    TRAILING_BYTES = "trailing_bytes"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    # enrollment
    TOKEN_UNKNOWN = "token_unknown"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    DEVICE_MISMATCH = "device_mismatch"
    BAD_SIGNATURE = "bad_signature"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    RATE_LIMITED = "rate_limited"
    REVOKED = "revoked"
    # sessions
    NOT_ENROLLED = "not_enrolled"
    STALE = "stale"
    REPLAY = "replay"
    SESSION_UNKNOWN = "session_unknown"
    SESSION_EXPIRED = "session_expired"
    # updates
    BAD_GRANT = "bad_grant"
    GRANT_EXPIRED = "grant_expired"
    WRONG_ROUND = "wrong_round"
    DECRYPTION_FAILED = "decryption_failed"
    LAYOUT_MISMATCH = "layout_mismatch"
    NORM_BOUND = "norm_bound"
    LOW_COSINE = "low_cosine"
    NON_FINITE = "non_finite"
    CHUNK_SEQUENCE = "chunk_sequence"
    INCOMPLETE = "incomplete"
    BUSY = "busy"
    TASK_FAILED = "task_failed"
    OUTLIER = "outlier"
    QUARANTINED = "quarantined"
    TOO_FEW_UPDATES = "too_few_updates"
    UNKNOWN_BASE = "unknown_base"
    TOO_STALE = "too_stale"
    TOO_FEW_ACCEPTED = "too_few_accepted"
    STALE_BASE = "stale_base"
    SUPERSEDED = "superseded"
    WRONG_SHARD = "wrong_shard"
    MISSING_SHARD = "missing_shard"
    # attestation / ops
    MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"
    NO_ENCLAVE = "no_enclave"
    NOT_OPERATOR = "not_operator"
    NO_ROUND = "no_round"
    IDENTITY_CONFLICT = "identity_conflict"
    TIMEOUT = "timeout"
    FORBIDDEN = "forbidden"
    INTERNAL = "internal"


#: What each reason means, for people and for systems consuming events (docs/protocol.md).
DESCRIPTIONS: dict[Reason, str] = {
    Reason.MALFORMED: "not msgpack, not a QFLARE envelope, or a sealed part that does not open",
    Reason.OVERSIZE: "larger than broker.max_message_bytes",
    Reason.TRAILING_BYTES: "bytes after the end of the message",
    Reason.UNKNOWN_VERSION: "wire version this peer does not speak",
    Reason.UNKNOWN_TYPE: "unknown message type, or a type this queue does not accept",
    Reason.INVALID_FIELD: "a field missing, unknown, of the wrong type or out of range",
    Reason.TOKEN_UNKNOWN: "no such token (or it was revoked)",
    Reason.TOKEN_EXPIRED: "the token's lifetime has passed",
    Reason.TOKEN_USED: "the token was already used: tokens work once",
    Reason.DEVICE_MISMATCH: "the token, routing key or sealed claim names another device",
    Reason.BAD_SIGNATURE: "a signature does not verify, or is by an unexpected key",
    Reason.UNSUPPORTED_ALGORITHM: "an algorithm the policy does not allow, or a key this peer does not hold",
    Reason.RATE_LIMITED: "too many requests; retry later",
    Reason.REVOKED: "the device is revoked",
    Reason.NOT_ENROLLED: "the device is not enrolled",
    Reason.STALE: "timestamp outside the freshness window (clock skew or a delayed replay)",
    Reason.REPLAY: "seen before: a nonce, an update id, a call sequence number, a second update this round, "
                   "or (async rounds) a second one on the same base version or in the same buffer",
    Reason.SESSION_UNKNOWN: "no such session (the coordinator restarted?): open a new one",
    Reason.SESSION_EXPIRED: "the session has expired: open a new one",
    Reason.BAD_GRANT: "the session grant is missing, forged, or for another device",
    Reason.GRANT_EXPIRED: "the session grant has expired",
    Reason.WRONG_ROUND: "the update is for a round that is not open",
    Reason.DECRYPTION_FAILED: "the sealed payload does not open with this enclave's key",
    Reason.LAYOUT_MISMATCH: "the parameter vector does not match the model's layout",
    Reason.NORM_BOUND: "update norm over the bound (scaled or boosted update)",
    Reason.LOW_COSINE: "update points away from the round's reference: the enclave's root-data update, "
                       "else the updates' robust centre (e.g. sign-flipped, inner-product manipulation)",
    Reason.OUTLIER: "update far from the round's other updates (distance test: e.g. a backdoor or noise)",
    Reason.QUARANTINED: "the device's reputation fell below fl.quarantine_below after repeated rejections; "
                        "its updates are judged but not aggregated until it recovers",
    Reason.NON_FINITE: "NaN or infinity in the update",
    Reason.CHUNK_SEQUENCE: "a chunk out of order, repeated, of another update or stream, or with no update begun",
    Reason.INCOMPLETE: "a chunked update's remaining chunks did not arrive in time (truncated)",
    Reason.BUSY: "the enclave is reassembling as many chunked updates as it allows (the update was refused), or "
                 "`coordinator rotate-keys` found a coordinator still running",
    Reason.TASK_FAILED: "the task's own code (its data, training or evaluation) failed; nothing was sent",
    Reason.TOO_FEW_UPDATES: "a round closed with fewer stored updates than its min_updates (round.failed)",
    Reason.UNKNOWN_BASE: "the update names a base model version this enclave never published",
    Reason.TOO_STALE: "async rounds: the update's base model is more than max_staleness versions behind the "
                      "current one",
    Reason.TOO_FEW_ACCEPTED: "a round's screening left fewer accepted updates than fl.min_accepted, so no single "
                             "device could set the model (round.failed)",
    Reason.STALE_BASE: "the update was trained on another model version than the open round's",
    Reason.SUPERSEDED: "signed under a key or grant the device has since replaced (key rotation or re-enrollment)",
    Reason.WRONG_SHARD: "sharded enclaves: an update (or a partial) that is not this shard's: its device id "
                        "hashes to another shard (common/shards.py), or a partial names a shard not in the round",
    Reason.MISSING_SHARD: "sharded enclaves: the root closed a round at its deadline without every shard's "
                          "partial; the model is made from the shards that sent one",
    Reason.MEASUREMENT_NOT_ALLOWED: "enclave code measurement not on the allow-list",
    Reason.NO_ENCLAVE: "no attested enclave is available",
    Reason.NOT_OPERATOR: "an operator request not signed by an operator key the coordinator pins",
    Reason.NO_ROUND: "no such round, or no round plan is running",
    Reason.IDENTITY_CONFLICT: "a coordinator with another identity already serves this namespace (docs/scaling.md)",
    Reason.TIMEOUT: "no reply in time",
    Reason.FORBIDDEN: "the broker-verified user that sent it may not: another role's request, or another device's id",
    Reason.INTERNAL: "a bug on the receiving side; the message was dead-lettered",
}
assert set(DESCRIPTIONS) == set(Reason), "every reason needs a description"


class QflareError(Exception):
    """A failure with a reason code; the only exception type replies are built from."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


def as_qflare_error(exc: Exception) -> QflareError:
    """The same failure as a :class:`QflareError`; crypto errors carry the reason as a string."""
    if isinstance(exc, QflareError):
        return exc
    try:
        reason = Reason(getattr(exc, "reason", Reason.INTERNAL))
    except ValueError:
        reason = Reason.INTERNAL
    return QflareError(reason, getattr(exc, "detail", "") or type(exc).__name__)
