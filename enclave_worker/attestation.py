"""Simulated TEE attestation and sealed storage (docs/architecture.md step 6).

The platform is simulated: a "vendor" ML-DSA key in ``<state>/platform`` stands in for the
CPU's attestation key, and the code measurement is a SHA3-256 over the enclave's source.
The interface is the one a real quote (SGX/TDX/SEV) would fill: a report {measurement,
keys, nonce} signed by a key the coordinator trusts, and keys sealed to the measurement so
only the same code on the same platform can unseal them after a restart.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pqc
from common.attestation import (  # noqa: F401
    PLATFORM_SIG,
    allowed_measurements,
    measurement,
    report_digest,
    trusted_platform_key,
)
from common.settings import Settings
from common.state import private_dir
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import AttestAccept, AttestationReport, AttestRequest, Signed
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.enclave")


def platform_identity(directory: Path, legacy: Path | None = None) -> Identity:
    """The simulated platform's key pair, created once in its own directory (0700).

    ``legacy`` is where older versions kept it (``<state_dir>/platform``, beside the state it
    protects): found there and not yet in ``directory``, it is moved, so the enclave keys it
    sealed still open.
    """
    if legacy is not None and (legacy / "public.json").exists() and not (directory / "public.json").exists():
        private_dir(directory.parent)
        shutil.move(str(legacy), str(directory))
        log.warning("moved the simulated platform key from %s to %s, out of the service state", legacy, directory)
    ident = Identity.load_or_create(directory, PLATFORM_SIG, pqc.ids.DEFAULT_KEM)
    private_dir(directory)
    return ident


def sealing_key(platform: Identity, code: str) -> bytes:
    """Key bound to platform and measurement: other code cannot unseal the enclave's keys."""
    return pqc.hkdf_sha256(platform.sig_sk, b"qflare/v1/seal", code.encode(), 32)


def load_enclave_keys(settings: Settings, platform: Identity, code: str) -> Identity:
    """Unseal the enclave's keys, or generate and seal new ones on first start."""
    directory = settings.state_dir / "enclave" / "keys"
    key = sealing_key(platform, code)
    if (directory / "public.json").exists():
        return Identity.load(directory, passphrase=key)
    ident = Identity.generate(settings.crypto.signature, settings.crypto.kem)
    ident.save(directory, passphrase=key)
    return ident


def attest_request(platform: Identity, enclave: Identity, code: str, challenge: bytes) -> AttestRequest:
    """A report of this code and keys, answering the coordinator's single-use ``challenge``."""
    report = AttestationReport(measurement=code, kem_alg=enclave.kem_alg, kem_pk=enclave.kem_pk,
                               sig_alg=enclave.sig_alg, sig_pk=enclave.sig_pk, nonce=challenge,
                               created_at=time.time())
    signed = signing.sign(report, platform.sig_alg, platform.sig_sk, platform.sig_pk)
    return AttestRequest(report=encode(signed), platform_pk=platform.sig_pk, platform_alg=platform.sig_alg)


def check_accept(signed: Signed, req: AttestRequest, challenge: bytes, coordinator: tuple[str, bytes]) -> AttestAccept:
    """The coordinator's admission, if the pinned coordinator key signed it for exactly this
    report and challenge (else a key that merely answered could become the enclave's master)."""
    alg, pk = coordinator
    if signed.signer != pqc.fingerprint(pk, alg):
        raise QflareError(Reason.BAD_SIGNATURE, "admission not signed by the pinned coordinator key")
    accept = signing.verify(signed, AttestAccept, alg, pk)
    if (accept.coordinator_sig_alg, accept.coordinator_sig_pk) != (alg, pk):
        raise QflareError(Reason.BAD_SIGNATURE, "admission names another coordinator key")
    if accept.report_digest != report_digest(req.report) or accept.challenge != challenge:
        raise QflareError(Reason.BAD_SIGNATURE, "admission is for another report or challenge")
    return accept
