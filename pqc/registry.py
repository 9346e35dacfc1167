"""Which backend implements which algorithm, and the factories callers use.

Preference when no backend is named: ``cryptography`` (OpenSSL, constant-time, FIPS
validated upstream), then ``liboqs``, then ``pure`` (Python + numpy; not constant-time,
see docs/crypto.md). FrodoKEM-640-AES and ML-KEM-512 have no OpenSSL implementation.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

from pqc.backends import BACKENDS, CRYPTOGRAPHY, LIBOQS, PURE, liboqs_enabled, load_oqs
from pqc.errors import UnsupportedAlgorithm
from pqc.ids import ALIASES, KemId, SigId, resolve_kem, resolve_sig
from pqc.kem import CryptographyHybrid, CryptographyMLKEM, DelegatingKem, Kem, LiboqsKem
from pqc.sig import CryptographyMLDSA, LiboqsMLDSA, Signature

log = logging.getLogger("pqc")

_ALIAS_NOTES: dict[str, str] = {
    "Dilithium2": "Dilithium2 is used as ML-DSA-44: FIPS 204 (August 2024) standardised CRYSTALS-"
                  "Dilithium as ML-DSA with changes (domain-separated contexts, a 64-byte tr, "
                  "hedged signing), so Dilithium round-3 signatures do not verify under ML-DSA-44",
}
_noted: set[str] = set()


def note_alias(name: str) -> None:
    """Say once per process that a pre-standard name was mapped to its FIPS algorithm."""
    if name in ALIASES and name not in _noted:
        _noted.add(name)
        log.warning(_ALIAS_NOTES.get(name, f"{name} is used as its FIPS form {ALIASES[name]}"))


def _pure_kem(alg: KemId) -> Kem | None:
    try:
        if alg is KemId.FRODOKEM_640_AES:
            return DelegatingKem(alg, importlib.import_module("pqc.frodo").FrodoKEM640AES())
        if alg in (KemId.ML_KEM_512, KemId.ML_KEM_768, KemId.ML_KEM_1024):
            return DelegatingKem(alg, importlib.import_module("pqc.mlkem_pure").MLKEMPure(alg.value))
    except ImportError:
        return None
    return None


def _liboqs_kem(alg: KemId) -> Kem | None:
    oqs = load_oqs()
    if oqs is None or alg is KemId.ML_KEM_768_X25519 or not liboqs_enabled(oqs, alg.value, "kem"):
        return None
    return LiboqsKem(alg, oqs)


def _cryptography_kem(alg: KemId) -> Kem | None:
    if alg in (KemId.ML_KEM_768, KemId.ML_KEM_1024):
        return CryptographyMLKEM(alg)
    if alg is KemId.ML_KEM_768_X25519:
        return CryptographyHybrid()
    return None


def _liboqs_sig(alg: SigId) -> Signature | None:
    oqs = load_oqs()
    if oqs is None or not liboqs_enabled(oqs, alg.value, "sig"):
        return None
    return LiboqsMLDSA(alg, oqs)


_KEM_FACTORIES: dict[str, Callable[[KemId], Kem | None]] = {
    CRYPTOGRAPHY: _cryptography_kem, LIBOQS: _liboqs_kem, PURE: _pure_kem,
}
_SIG_FACTORIES: dict[str, Callable[[SigId], Signature | None]] = {
    CRYPTOGRAPHY: CryptographyMLDSA, LIBOQS: _liboqs_sig, PURE: lambda alg: None,
}


@functools.cache
def _kem(alg: KemId, backend: str) -> Kem | None:
    return _KEM_FACTORIES[backend](alg)


@functools.cache
def _sig(alg: SigId, backend: str) -> Signature | None:
    return _SIG_FACTORIES[backend](alg)


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise UnsupportedAlgorithm(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def kem_backends(name: str) -> list[str]:
    """Installed backends implementing KEM ``name``, most preferred first."""
    alg = resolve_kem(name)
    return [b for b in BACKENDS if _kem(alg, b) is not None]


def pure_only(name: str) -> bool:
    """Whether KEM ``name`` is served here only by the pure-Python backend (not constant time)."""
    return kem_backends(name) == [PURE]


def sig_backends(name: str) -> list[str]:
    """Installed backends implementing signature ``name``, most preferred first."""
    alg = resolve_sig(name)
    return [b for b in BACKENDS if _sig(alg, b) is not None]


def get_kem(name: str, backend: str | None = None) -> Kem:
    """The KEM ``name`` (or an alias) under ``backend``, or the most preferred installed one."""
    _check_backend(backend)
    alg = resolve_kem(name)
    note_alias(name)
    for b in (backend,) if backend else BACKENDS:
        kem = _kem(alg, b)
        if kem is not None:
            return kem
    where = f"backend {backend}" if backend else "any installed backend"
    raise UnsupportedAlgorithm(f"{alg.value} is not available in {where} "
                               f"(available: {', '.join(kem_backends(alg)) or 'none'})")


def get_signature(name: str, backend: str | None = None) -> Signature:
    """The signature scheme ``name`` (or an alias such as Dilithium2) under ``backend``."""
    _check_backend(backend)
    alg = resolve_sig(name)
    note_alias(name)
    for b in (backend,) if backend else BACKENDS:
        sig = _sig(alg, b)
        if sig is not None:
            return sig
    where = f"backend {backend}" if backend else "any installed backend"
    raise UnsupportedAlgorithm(f"{alg.value} is not available in {where} "
                               f"(available: {', '.join(sig_backends(alg)) or 'none'})")
