"""Update format rules both the device and the enclave follow: associated data and signed parts.

One module, below both parties, so the bytes a device seals and signs are by construction
the bytes the enclave checks.
"""

from __future__ import annotations

import hashlib


def update_aad(header_bytes: bytes) -> bytes:
    """Associated data of a sealed update: its encoded header, under a label."""
    return b"qflare/v1/update\0" + header_bytes


#: Digest of the ciphertext inside the signed message. SHA-256 (SHA-NI: 1.6 GB/s here) rather
#: than hashing megabytes through ML-DSA's SHAKE256 (0.48 GB/s): hash-then-sign with a
#: collision-resistant hash binds the signature to the ciphertext all the same.
CIPHERTEXT_DIGEST = "sha256"


def signed_parts(update_header: bytes, sealed: bytes) -> list[bytes]:
    """What the device signs: the header and a SHA-256 digest of the ciphertext."""
    return [update_header, hashlib.new(CIPHERTEXT_DIGEST, sealed).digest()]
