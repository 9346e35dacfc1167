"""Which algorithms a service accepts on the live path, given what is installed here.

An algorithm that only the pure-Python backend serves (FrodoKEM-640-AES or ML-KEM-512
without liboqs) is not constant time (docs/crypto.md, "Limits of the pure backend"), so it
is left out of every live policy unless ``crypto.allow_pure_backends`` says otherwise, and a
party refuses to start when its own configured KEM is such an algorithm.
"""

from __future__ import annotations

import logging

import pqc
from common.settings import CryptoSettings
from pqc.registry import pure_only
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.crypto")


def pure_only_refusal(kem: str) -> str:
    """The one line saying why a pure-only KEM is refused, and what to do about it."""
    return (f"{kem} is served here only by the pure-Python backend, which is not constant time; "
            "install liboqs (pip install 'qflare[oqs]') or set crypto.allow_pure_backends: true")


def live_policy(crypto: CryptoSettings) -> pqc.Policy:
    """The configured allow-lists, minus pure-only KEMs unless they are explicitly allowed."""
    kems = list(crypto.allowed_kems)
    why_not: dict[str, str] = {}
    if not crypto.allow_pure_backends:
        for kem in [k for k in kems if pure_only(k)]:
            kems.remove(kem)
            why_not[kem] = pure_only_refusal(kem)
    return pqc.Policy(kems=kems, signatures=crypto.allowed_signatures, why_not=why_not)


def require_live_kem(crypto: CryptoSettings) -> None:
    """Refuse to run a party whose own KEM only the pure backend serves, unless allowed."""
    if pure_only(crypto.kem):
        if not crypto.allow_pure_backends:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, f"crypto.kem: {pure_only_refusal(crypto.kem)}")
        log.warning("crypto.kem %s runs on the pure-Python backend (not constant time), "
                    "as crypto.allow_pure_backends allows", crypto.kem)
