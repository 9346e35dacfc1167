"""Typed failures of the crypto suite: one class per failure, each with a shared reason code.

Callers catch a class, never match a message. Every class derives from
:class:`QflareCryptoError` and carries ``reason``, the wire reason code as a plain string
(``schemas.reasons.Reason`` holds the same values), so ``pqc`` imports nothing of the project
and a reply or dead-letter header can still carry the reason without a translation table.
"""

from __future__ import annotations


class QflareCryptoError(Exception):
    """Base of every error raised by :mod:`pqc`."""

    default_reason = "internal"

    def __init__(self, detail: str = "", reason: str | None = None) -> None:
        self.reason = str(reason or self.default_reason)
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class InvalidKey(QflareCryptoError, ValueError):
    """A key of the wrong length or encoding, or one a backend refuses (FIPS 203 §7.2 checks)."""

    default_reason = "malformed"


class MalformedInput(QflareCryptoError, ValueError):
    """A ciphertext, seed, context or message of the wrong type or length (never zero-padded)."""

    default_reason = "malformed"


class DecryptionError(QflareCryptoError):
    """A sealed payload that does not open: tampered, truncated, wrong key or wrong aad."""

    default_reason = "decryption_failed"


class PolicyError(QflareCryptoError):
    """An algorithm the local policy does not allow (no silent downgrade)."""

    default_reason = "unsupported_algorithm"


class UnsupportedAlgorithm(QflareCryptoError):
    """An algorithm name nobody knows, or one no installed backend implements."""

    default_reason = "unsupported_algorithm"


class UnsupportedOperation(QflareCryptoError):
    """An operation this backend cannot do (e.g. derandomized encapsulation in OpenSSL)."""

    default_reason = "internal"
