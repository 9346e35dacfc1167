"""Signing and publishing global models on the models fanout (docs/architecture.md step 5).

Devices accept a model only with a valid enclave signature; the fanout also feeds the
models stream from which a returning device reads the latest version.
"""

from __future__ import annotations

import time

import numpy as np

from broker.messaging import Publisher
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import GlobalModel, RoundResult, RoundSpec


def build_global_model(identity: Identity, version: int, layout_id: str, params: np.ndarray,
                       result: RoundResult | None = None, next_round: RoundSpec | None = None) -> bytes:
    """The encoded ``Signed(GlobalModel)`` for ``params`` (little-endian float32)."""
    model = GlobalModel(version=version, layout_id=layout_id,
                        params=np.ascontiguousarray(params, dtype="<f4").tobytes(), created_at=time.time(),
                        result=result, next_round=next_round)
    return encode(signing.sign(model, identity.sig_alg, identity.sig_sk, identity.sig_pk))


async def publish_model(publisher: Publisher, signed_model: bytes, version: int) -> None:
    """Publish on the fanout and wait for the broker's confirm."""
    await publisher.publish(publisher.names.models_exchange, "", signed_model,
                            message_id=f"model-{version}", headers={"x-qflare-version": version})
