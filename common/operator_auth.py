"""Who may steer the system as operator: one pure rule for the coordinator and the enclave.

An operator request counts only if a pinned operator key signed it and its clock is inside the
freshness window. The coordinator applies it to every operator request (and adds a nonce check,
which needs its registry); the enclave applies it again, with its own pins, to root data the
coordinator forwards, so a coordinator key alone cannot choose the enclave's reference.
"""

from __future__ import annotations

from typing import TypeVar

import pqc
from common import handshake
from schemas import signing
from schemas.messages import OperatorRequest, Signed
from schemas.reasons import QflareError, Reason

R = TypeVar("R", bound=OperatorRequest)


def authenticate(signed: Signed, types: type[R] | tuple[type[R], ...], pinned: set[str], freshness_seconds: float,
                 now: float) -> R:
    """The request inside ``signed`` if a pinned operator key signed it and it is fresh (no effects)."""
    req = signing.unverified(signed, types)
    fp = pqc.fingerprint(req.operator_pk, req.operator_alg)
    if not pinned:
        raise QflareError(Reason.NOT_OPERATOR, "no operator key is pinned (operator.pinned_fingerprints)")
    if fp not in pinned or signed.signer != fp:
        raise QflareError(Reason.NOT_OPERATOR, f"key {fp[:16]} is not a pinned operator key")
    signing.verify(signed, type(req), req.operator_alg, req.operator_pk)
    if not handshake.is_fresh(req.issued_at, now, freshness_seconds):
        raise QflareError(Reason.STALE, "operator request outside the freshness window")
    return req
