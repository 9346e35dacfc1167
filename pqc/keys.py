"""Keys at rest and their fingerprints.

File format (UTF-8 JSON, one object)::

    {"format": "qflare-key", "version": 1, "kind": "private" | "public", "alg": "<id>",
     "key": "<base64>"}                                      # plaintext private or public key
    {"format": "qflare-key", "version": 1, "kind": "private", "alg": "<id>",
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": "<base64>"},
     "aead": {"name": "AES-256-GCM", "nonce": "<base64>"}, "ciphertext": "<base64>"}

With a passphrase the key is AES-256-GCM encrypted under scrypt(passphrase) (RFC 7914),
the associated data being the JSON of every other field, so the algorithm id cannot be
swapped. Private key files are written atomically with mode 0600.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pqc.errors import DecryptionError, InvalidKey, MalformedInput, UnsupportedAlgorithm
from pqc.ids import KemId, SigId, resolve_kem, resolve_sig
from pqc.params import KEM_PARAMS, SIG_PARAMS
from pqc.policy import require_length

log = logging.getLogger("pqc")

FORMAT = "qflare-key"
VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
FINGERPRINT_LABEL = b"QFLARE key fingerprint v1\x00"


def canonical_alg(alg: str) -> KemId | SigId:
    """The KEM or signature id ``alg`` names (aliases resolved)."""
    try:
        return resolve_kem(alg)
    except UnsupportedAlgorithm:
        pass
    try:
        return resolve_sig(alg)
    except UnsupportedAlgorithm:
        raise UnsupportedAlgorithm(f"unknown algorithm {alg!r}") from None


def public_key_size(alg: KemId | SigId) -> int:
    return KEM_PARAMS[alg].public_key if isinstance(alg, KemId) else SIG_PARAMS[alg].public_key


def secret_key_sizes(alg: KemId | SigId) -> tuple[int, ...]:
    """Accepted secret-key lengths: the seed form (OpenSSL) and the expanded form (liboqs, pure)."""
    if isinstance(alg, KemId):
        p = KEM_PARAMS[alg]
        return (p.keypair_coins, p.expanded_secret_key)
    s = SIG_PARAMS[alg]
    return (s.seed, s.expanded_secret_key)


def fingerprint(public_key: bytes, alg: str) -> str:
    """SHA3-256 hex of label ‖ canonical algorithm id ‖ 0x00 ‖ public key.

    The algorithm is hashed in so one key byte string can never be mistaken for a key of
    another algorithm; aliases (Dilithium2) give the same fingerprint as their FIPS name.
    Cached: handshakes fingerprint the same few keys over and over.
    """
    return _fingerprint(bytes(public_key), alg)


@functools.lru_cache(maxsize=4096)
def _fingerprint(public_key: bytes, alg: str) -> str:
    canon = canonical_alg(alg)
    pk = require_length(public_key, public_key_size(canon), f"{canon.value} public key", InvalidKey)
    return hashlib.sha3_256(FINGERPRINT_LABEL + canon.value.encode() + b"\x00" + pk).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise MalformedInput(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise MalformedInput(f"{what} is not valid base64") from None


def encode_public_key(alg: str, public_key: bytes) -> str:
    """A public key with its algorithm id, as one line of JSON."""
    canon = canonical_alg(alg)
    pk = require_length(public_key, public_key_size(canon), f"{canon.value} public key", InvalidKey)
    return json.dumps({"format": FORMAT, "version": VERSION, "kind": "public",
                       "alg": canon.value, "key": _b64(pk)})


def _parse(text: str | bytes, kind: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise InvalidKey("key file is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidKey("not a qflare key file")
    if doc.get("version") != VERSION:
        raise InvalidKey(f"key file version {doc.get('version')!r} is not supported")
    if doc.get("kind") != kind:
        raise InvalidKey(f"expected a {kind} key, got {doc.get('kind')!r}")
    return doc


def decode_public_key(text: str | bytes) -> tuple[str, bytes]:
    """``(alg, public_key)`` from :func:`encode_public_key` output, lengths checked."""
    doc = _parse(text, "public")
    canon = canonical_alg(str(doc.get("alg")))
    pk = require_length(_unb64(doc.get("key"), "key"), public_key_size(canon),
                        f"{canon.value} public key", InvalidKey)
    return canon.value, pk


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _aad(doc: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "ciphertext"}, sort_keys=True).encode()


def encode_private_key(alg: str, secret_key: bytes, passphrase: bytes | None = None) -> str:
    """A private key with its algorithm id as JSON; encrypted when a passphrase is given."""
    canon = canonical_alg(alg)
    sk = require_length(secret_key, secret_key_sizes(canon), f"{canon.value} secret key", InvalidKey)
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": "private", "alg": canon.value}
    if passphrase is None:
        doc["key"] = _b64(sk)
        return json.dumps(doc)
    salt, nonce = os.urandom(16), os.urandom(12)
    doc["kdf"] = {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)}
    doc["aead"] = {"name": "AES-256-GCM", "nonce": _b64(nonce)}
    key = _scrypt(bytes(passphrase), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    doc["ciphertext"] = _b64(AESGCM(key).encrypt(nonce, sk, _aad(doc)))
    return json.dumps(doc)


def decode_private_key(text: str | bytes, passphrase: bytes | None = None) -> tuple[str, bytes]:
    """``(alg, secret_key)``; DecryptionError for a wrong passphrase or a tampered file."""
    doc = _parse(text, "private")
    canon = canonical_alg(str(doc.get("alg")))
    if "ciphertext" in doc:
        if passphrase is None:
            raise InvalidKey("private key is encrypted; a passphrase is required")
        kdf, aead = doc.get("kdf") or {}, doc.get("aead") or {}
        if kdf.get("name") != "scrypt" or aead.get("name") != "AES-256-GCM":
            raise InvalidKey("private key uses an unknown KDF or cipher")
        try:
            key = _scrypt(bytes(passphrase), _unb64(kdf.get("salt"), "salt"),
                          int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
            sk = AESGCM(key).decrypt(_unb64(aead.get("nonce"), "nonce"),
                                     _unb64(doc["ciphertext"], "ciphertext"), _aad(doc))
        except (KeyError, TypeError, ValueError, MalformedInput):
            raise InvalidKey("encrypted private key is malformed") from None
        except Exception:  # noqa: BLE001 - InvalidTag: wrong passphrase or tampering
            raise DecryptionError("wrong passphrase or tampered private key file") from None
    else:
        sk = _unb64(doc.get("key"), "key")
    sk = require_length(sk, secret_key_sizes(canon), f"{canon.value} secret key", InvalidKey)
    return canon.value, sk


def save_private_key(path: str | os.PathLike[str], alg: str, sk: bytes,
                     passphrase: bytes | None = None) -> Path:
    """Write the key atomically with mode 0600 (temporary file, fsync, rename)."""
    target = Path(path)
    text = encode_private_key(alg, sk, passphrase)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> tuple[str, bytes]:
    """``(alg, secret_key)`` from :func:`save_private_key`; warns if others can read the file."""
    target = Path(path)
    mode = target.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("private key %s has mode %o; it should be 0600", target, mode)
    return decode_private_key(target.read_text(), passphrase)
