"""Typed failures of the crypto suite: one class per failure, each with a shared reason code.

Callers catch a class, never match a message. Every class derives from
:class:`QflareCryptoError`, itself a :class:`schemas.reasons.QflareError`, so a reply or
dead-letter header can carry ``exc.reason`` without a translation table.
"""

from __future__ import annotations

from schemas.reasons import QflareError, Reason


class QflareCryptoError(QflareError):
    """Base of every error raised by :mod:`pqc`."""

    default_reason = Reason.INTERNAL

    def __init__(self, detail: str = "", reason: Reason | None = None) -> None:
        super().__init__(reason or self.default_reason, detail)


class InvalidKey(QflareCryptoError, ValueError):
    """A key of the wrong length or encoding, or one a backend refuses (FIPS 203 §7.2 checks)."""

    default_reason = Reason.MALFORMED


class MalformedInput(QflareCryptoError, ValueError):
    """A ciphertext, seed, context or message of the wrong type or length (never zero-padded)."""

    default_reason = Reason.MALFORMED


class DecryptionError(QflareCryptoError):
    """A sealed payload that does not open: tampered, truncated, wrong key or wrong aad."""

    default_reason = Reason.DECRYPTION_FAILED


class PolicyError(QflareCryptoError):
    """An algorithm the local policy does not allow (no silent downgrade)."""

    default_reason = Reason.UNSUPPORTED_ALGORITHM


class UnsupportedAlgorithm(QflareCryptoError):
    """An algorithm name nobody knows, or one no installed backend implements."""

    default_reason = Reason.UNSUPPORTED_ALGORITHM


class UnsupportedOperation(QflareCryptoError):
    """An operation this backend cannot do (e.g. derandomized encapsulation in OpenSSL)."""

    default_reason = Reason.INTERNAL
