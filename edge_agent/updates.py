"""Building a sealed, signed update (docs/architecture.md step 4).

The header is the AEAD's associated data, so the enclave can trust every header field it
reads once the payload opens; the device signs header ‖ ciphertext with its long-term key.
"""

from __future__ import annotations

import time
import uuid

import numpy as np

import pqc
from common.updates import signed_parts, update_aad
from edge_agent.client import Device
from schemas import signing
from schemas.codec import encode
from schemas.messages import Update, UpdateHeader
from schemas.names import Names
from schemas.reasons import QflareError, Reason


def build(device: Device, round_id: int, base_version: int, layout_id: str, delta: np.ndarray,
          num_samples: int, update_id: str | None = None) -> tuple[str, str, bytes]:
    """Return (update id, routing key, encoded Update) ready to publish."""
    if device.session is None or device.enclave is None:
        raise QflareError(Reason.NO_ENCLAVE, "open a session (which brings the enclave's keys) first")
    enclave = device.enclave
    update_id = update_id or uuid.uuid4().hex
    header = UpdateHeader(device_id=device.device_id, grant=device.session.grant, round_id=round_id,
                          update_id=update_id, base_version=base_version, num_samples=num_samples,
                          timestamp=time.time(), layout_id=layout_id, kem_alg=enclave.kem_alg,
                          enclave_kem_fp=pqc.fingerprint(enclave.kem_pk, enclave.kem_alg))
    header_bytes = encode(header)
    payload = np.ascontiguousarray(delta, dtype="<f4")
    sealed = pqc.seal(enclave.kem_alg, enclave.kem_pk, memoryview(payload).cast("B"), update_aad(header_bytes))
    ident = device.identity
    signature = pqc.get_signature(ident.sig_alg).sign(ident.sig_sk, signed_parts(header_bytes, sealed),
                                                      context=signing.context_for(Update.TYPE))
    update = Update(header=header_bytes, sealed=sealed, sig_alg=ident.sig_alg, signature=signature)
    return update_id, Names.update_key(device.device_id), encode(update)
