"""QFLARE's post-quantum crypto suite: the small, safe surface the rest of QFLARE calls.

    kem = pqc.get_kem("ML-KEM-768")            # FIPS 203
    sig = pqc.get_signature("ML-DSA-44")       # FIPS 204 ("Dilithium2" maps here)
    blob = pqc.seal("ML-KEM-768", pk, data, aad)   # HPKE, RFC 9180
    data = pqc.open_sealed(sk, blob, aad, policy)

Algorithm names live in :mod:`pqc.ids`, sizes in :mod:`pqc.params`; see docs/crypto.md.
"""

from pqc import errors, keys
from pqc.ids import ALIASES, DEFAULT_KEM, DEFAULT_SIG, KemId, SigId
from pqc.kem import Kem
from pqc.keys import fingerprint, load_private_key, save_private_key
from pqc.policy import Policy
from pqc.registry import get_kem, get_signature, kem_backends, sig_backends
from pqc.seal import hkdf_sha256, open_sealed, open_sealed_into, plaintext_size, seal
from pqc.sig import Signature
from pqc.stream import StreamOpener, StreamSealer, stream_opener, stream_sealer

__all__ = [
    "ALIASES",
    "DEFAULT_KEM",
    "DEFAULT_SIG",
    "Kem",
    "KemId",
    "Policy",
    "SigId",
    "Signature",
    "errors",
    "fingerprint",
    "get_kem",
    "get_signature",
    "hkdf_sha256",
    "kem_backends",
    "keys",
    "load_private_key",
    "open_sealed",
    "open_sealed_into",
    "plaintext_size",
    "save_private_key",
    "seal",
    "sig_backends",
    "stream_opener",
    "stream_sealer",
    "StreamOpener",
    "StreamSealer",
]
