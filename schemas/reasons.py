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
    DUPLICATE = "duplicate"
    DECRYPTION_FAILED = "decryption_failed"
    LAYOUT_MISMATCH = "layout_mismatch"
    NORM_BOUND = "norm_bound"
    LOW_COSINE = "low_cosine"
    NON_FINITE = "non_finite"
    # attestation / ops
    MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"
    NO_ENCLAVE = "no_enclave"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class QflareError(Exception):
    """A failure with a reason code; the only exception type replies are built from."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
