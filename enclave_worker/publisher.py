"""Signing and publishing global models on the models fanout (docs/architecture.md step 5).

Devices accept a model only with a valid enclave signature; the fanout also feeds the
models stream from which a returning device reads the latest version.
"""

from __future__ import annotations

import time

import numpy as np

from broker.messaging import Publisher
from common.chunks import chunk_sha256, split
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import GlobalModel, ModelChunk, RoundResult, RoundSpec


def build_global_model(identity: Identity, version: int, layout_id: str, params: np.ndarray,
                       result: RoundResult | None = None, next_round: RoundSpec | None = None) -> bytes:
    """The encoded ``Signed(GlobalModel)`` for ``params`` (little-endian float32)."""
    model = GlobalModel(version=version, layout_id=layout_id,
                        params=np.ascontiguousarray(params, dtype="<f4").tobytes(), created_at=time.time(),
                        result=result, next_round=next_round)
    return encode(signing.sign(model, identity.sig_alg, identity.sig_sk, identity.sig_pk))


def build_model_messages(identity: Identity, version: int, layout_id: str, params: np.ndarray, chunk_bytes: int,
                         result: RoundResult | None = None, next_round: RoundSpec | None = None) -> list[bytes]:
    """The messages that carry ``params``: one ``Signed(GlobalModel)`` when they fit one chunk,
    else a signed model naming each chunk's SHA-256, then the ``ModelChunk`` messages."""
    data = np.ascontiguousarray(params, dtype="<f4")
    if data.nbytes <= chunk_bytes:
        return [build_global_model(identity, version, layout_id, data, result, next_round)]
    parts = split(memoryview(data).cast("B"), chunk_bytes)
    model = GlobalModel(version=version, layout_id=layout_id, params=b"", created_at=time.time(), result=result,
                        next_round=next_round, chunk_digests=[chunk_sha256(p) for p in parts])
    signed = encode(signing.sign(model, identity.sig_alg, identity.sig_sk, identity.sig_pk))
    return [signed, *(encode(ModelChunk(version=version, index=i, count=len(parts), data=bytes(p)))
                      for i, p in enumerate(parts))]


def model_messages(signed: bytes, params: np.ndarray, chunk_bytes: int) -> list[bytes]:
    """The messages of an already signed model, to publish it again: the signed model, then
    (when it names chunks) its chunks, cut again from ``params`` the way it was first cut."""
    model = signing.unverified(signed, GlobalModel)
    if not model.chunk_digests:
        return [signed]
    parts = split(memoryview(np.ascontiguousarray(params, dtype="<f4")).cast("B"), chunk_bytes)
    return [signed, *(encode(ModelChunk(version=model.version, index=i, count=len(parts), data=bytes(p)))
                      for i, p in enumerate(parts))]


async def publish_model(publisher: Publisher, messages: bytes | list[bytes], version: int) -> None:
    """Publish on the fanout, in order, each message retried across outages until the broker
    confirms it (a model is never lost; a repeated one is harmless, devices go by version)."""
    for i, body in enumerate([messages] if isinstance(messages, bytes) else messages):
        await publisher.publish_until_confirmed(publisher.names.models_exchange, "", body,
                                                what=f"model v{version} message {i}",
                                                message_id=f"model-{version}" + (f"-{i}" if i else ""),
                                                headers={"x-qflare-version": version})
