"""Signing and verifying messages: the signature covers the encoded body's exact bytes.

Each message type signs under its own context string (FIPS 204 §5.2 ctx), so a signature
made for one kind of message can never be replayed as another.
"""

from __future__ import annotations

from typing import TypeVar

import pqc
from schemas.codec import decode, encode
from schemas.messages import Message, Signed
from schemas.reasons import QflareError, Reason

M = TypeVar("M", bound=Message)


def context_for(type_tag: str) -> bytes:
    """Domain-separation context for signatures over messages of ``type_tag``."""
    return b"qflare/v1/" + type_tag.encode()


def sign(msg: Message, alg: str, sk: bytes, pk: bytes) -> Signed:
    """Encode ``msg`` and sign it; ``signer`` is the fingerprint of ``pk``."""
    body = encode(msg)
    sig = pqc.get_signature(alg).sign(sk, body, context=context_for(msg.TYPE))
    return Signed(body=body, alg=alg, signer=pqc.fingerprint(pk, alg), signature=sig)


def verify(signed: Signed, expected: type[M], alg: str, pk: bytes, max_bytes: int | None = None) -> M:
    """Return the inner message if ``signed`` carries a valid signature by ``pk``.

    Raises :class:`QflareError` with ``bad_signature`` for a wrong key, algorithm or
    signature, and the codec's reason for a malformed body.
    """
    if signed.alg != alg or signed.signer != pqc.fingerprint(pk, alg):
        raise QflareError(Reason.BAD_SIGNATURE, "signed by an unexpected key")
    if not pqc.get_signature(alg).verify(pk, signed.body, signed.signature, context=context_for(expected.TYPE)):
        raise QflareError(Reason.BAD_SIGNATURE, f"{expected.TYPE} signature does not verify")
    return decode(signed.body, expected, **({"max_bytes": max_bytes} if max_bytes else {}))


def unverified(signed: Signed | bytes, expected: type[M]) -> M:
    """The inner message *before* verification, for finding which key must verify it.

    Callers must call :func:`verify` before acting on anything but the signer's identity.
    """
    if isinstance(signed, (bytes, bytearray)):
        signed = decode(signed, Signed)
    return decode(signed.body, expected)

