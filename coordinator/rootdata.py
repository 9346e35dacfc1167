"""Root data sent with the coordinator's own key, on the coordinator's host (the demo's path).

The data is sealed (ML-KEM HPKE) to the KEM key in the enclave's attestation report the
coordinator admitted, and signed with the coordinator's key, which the enclave already trusts
for control messages: no device can send, read or replace root data. It travels on the
enclave's control queue; the enclave keeps it, still sealed, in its state directory. An
operator on its own host uses ``qflare enclave root-data`` instead, over the operator plane
(``ops.operator_client.OperatorClient.send_root_data``), signed by the operator key.
"""

from __future__ import annotations

import time

import numpy as np

from broker.client import BrokerClient
from common import rootdata
from common.settings import Settings
from coordinator.registry import Registry
from coordinator.service import META_ENCLAVE_REPORT, load_identity
from schemas import signing
from schemas.messages import RootData, Signed
from schemas.names import Names
from schemas.reasons import QflareError, Reason


def seal_root_data(settings: Settings, x: np.ndarray, y: np.ndarray, *, registry: Registry | None = None,
                   identity=None) -> Signed:
    """The signed :class:`RootData` for the currently attested enclave (no I/O on the broker)."""
    own = registry is None
    registry = registry or Registry(str(settings.registry_file))
    try:
        raw = registry.get_meta(META_ENCLAVE_REPORT)
    finally:
        if own:
            registry.close()
    if raw is None:
        raise QflareError(Reason.NO_ENCLAVE, "no attested enclave yet: start `qflare enclave run` first")
    kem_fp, sealed = rootdata.seal_to(raw, x, y)
    identity = identity or load_identity(settings)
    msg = RootData(kem_fp=kem_fp, sealed=sealed, n_samples=int(len(y)), issued_at=time.time())
    return signing.sign(msg, identity.sig_alg, identity.sig_sk, identity.sig_pk)


async def send_root_data(settings: Settings, x: np.ndarray, y: np.ndarray, *, broker: BrokerClient | None = None,
                         registry: Registry | None = None, identity=None) -> str:
    """Seal, sign and publish root data to the enclave; returns the enclave KEM fingerprint."""
    signed = seal_root_data(settings, x, y, registry=registry, identity=identity)
    own = broker is None
    broker = broker or await BrokerClient.open(settings, name="qflare-root-data")
    try:
        await broker.publisher.publish(broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY, signed)
    finally:
        if own:
            await broker.close()
    return signing.unverified(signed, RootData).kem_fp
