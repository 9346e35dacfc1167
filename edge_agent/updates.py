"""Building a sealed, signed update (docs/architecture.md step 4).

The header is the AEAD's associated data, so the enclave can trust every header field it
reads once the payload opens; the device signs header ‖ ciphertext with its long-term key.
A delta larger than one chunk is sealed as a stream of chunks (common/chunks.py): one KEM
encapsulation, one signature, the header bound into every chunk.
"""

from __future__ import annotations

import time
import uuid

import numpy as np

import pqc
from common.chunks import ChunkDigest, chunk_aad, chunked_signed_parts, header_digest, stream_info
from common.compression import Encoded
from common.shards import update_key
from common.stages import Stages, timed
from common.updates import signed_parts, update_aad
from edge_agent.client import Device
from schemas import signing
from schemas.codec import encode
from schemas.messages import Update, UpdateChunk, UpdateHeader
from schemas.reasons import QflareError, Reason


def build(device: Device, round_id: int, base_version: int, layout_id: str, delta: np.ndarray,
          num_samples: int, update_id: str | None = None, stages: Stages | None = None,
          shards: int = 1) -> tuple[str, str, bytes]:
    """Return (update id, routing key, encoded Update) of a float32 ``delta`` in one message."""
    payload = np.ascontiguousarray(delta, dtype="<f4").tobytes()
    update_id, key, bodies = build_parts(device, round_id, base_version, layout_id, Encoded("f32", 0, [payload]),
                                         num_samples, update_id, stages, shards)
    return update_id, key, bodies[0]


def build_parts(device: Device, round_id: int, base_version: int, layout_id: str, encoded: Encoded,
                num_samples: int, update_id: str | None = None,
                stages: Stages | None = None, shards: int = 1) -> tuple[str, str, list[bytes]]:
    """Return (update id, routing key, messages to publish in order): one ``Update`` when the
    encoded delta is one chunk, else ``UpdateChunk`` messages sealed as one stream. ``stages``
    (if given) counts the time spent sealing and signing. ``shards`` is ``enclave.shards``: the
    key then names the device's shard (``common.shards.update_key``)."""
    if device.session is None or device.enclave is None:
        raise QflareError(Reason.NO_ENCLAVE, "open a session (which brings the enclave's keys) first")
    enclave = device.enclave
    update_id = update_id or uuid.uuid4().hex
    count = len(encoded.chunks)
    header = UpdateHeader(device_id=device.device_id, grant=device.session.grant, round_id=round_id,
                          update_id=update_id, base_version=base_version, num_samples=num_samples,
                          timestamp=time.time(), layout_id=layout_id, kem_alg=enclave.kem_alg,
                          enclave_kem_fp=pqc.fingerprint(enclave.kem_pk, enclave.kem_alg),
                          encoding=encoded.encoding, chunks=count, chunk_elems=encoded.chunk_elems)
    header_bytes = encode(header)
    ident = device.identity
    sig = pqc.get_signature(ident.sig_alg)
    key = update_key(device.device_id, shards)
    if count == 1:
        with timed(stages, "seal"):
            sealed = pqc.seal(enclave.kem_alg, enclave.kem_pk, encoded.chunks[0], update_aad(header_bytes))
        with timed(stages, "sign"):
            signature = sig.sign(ident.sig_sk, signed_parts(header_bytes, sealed),
                                 context=signing.context_for(Update.TYPE))
        update = Update(header=header_bytes, sealed=sealed, sig_alg=ident.sig_alg, signature=signature)
        return update_id, key, [encode(update)]
    with timed(stages, "seal"):
        sealer = pqc.stream_sealer(enclave.kem_alg, enclave.kem_pk, count, stream_info(header_bytes))
    header_sha = header_digest(header_bytes)
    digest = ChunkDigest(sealer.enc)
    bodies: list[bytes] = []
    for i, part in enumerate(encoded.chunks):
        with timed(stages, "seal"):
            sealed = sealer.seal(i, part, chunk_aad(header_sha, update_id, i, count))
            digest.add(sealed)
        first = i == 0
        if i < count - 1:
            bodies.append(encode(UpdateChunk(update_id=update_id, index=i, count=count,
                                             header=header_bytes if first else None,
                                             enc=sealer.enc if first else None, sealed=sealed)))
    with timed(stages, "sign"):
        signature = sig.sign(ident.sig_sk, chunked_signed_parts(header_bytes, digest.digest()),
                             context=signing.context_for(UpdateChunk.TYPE))
    bodies.append(encode(UpdateChunk(update_id=update_id, index=count - 1, count=count, sealed=sealed,
                                     sig_alg=ident.sig_alg, signature=signature)))
    return update_id, key, bodies
