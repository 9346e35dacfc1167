"""A party's long-term key pairs (one signature, one KEM), kept on disk with mode 0600.

Shared by the coordinator, the enclave and devices, so every party stores keys the same
way: private keys through :mod:`pqc.keys`, public keys beside them in JSON with their
algorithm ids.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pqc


@dataclass(frozen=True)
class Identity:
    sig_alg: str
    sig_pk: bytes
    sig_sk: bytes
    kem_alg: str
    kem_pk: bytes
    kem_sk: bytes

    @classmethod
    def generate(cls, sig_alg: str, kem_alg: str) -> Identity:
        spk, ssk = pqc.get_signature(sig_alg).generate_keypair()
        kpk, ksk = pqc.get_kem(kem_alg).generate_keypair()
        return cls(pqc.get_signature(sig_alg).name, spk, ssk, pqc.get_kem(kem_alg).name, kpk, ksk)

    @property
    def sig_fp(self) -> str:
        return pqc.fingerprint(self.sig_pk, self.sig_alg)

    @property
    def kem_fp(self) -> str:
        return pqc.fingerprint(self.kem_pk, self.kem_alg)

    def save(self, directory: Path, passphrase: bytes | None = None) -> None:
        """Write ``sig.key``/``kem.key`` (0600) and ``public.json``; atomic per file."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)  # also when it existed: only the owner enters a key directory
        pqc.keys.save_private_key(directory / "sig.key", self.sig_alg, self.sig_sk, passphrase=passphrase)
        pqc.keys.save_private_key(directory / "kem.key", self.kem_alg, self.kem_sk, passphrase=passphrase)
        pub = {"sig_alg": self.sig_alg, "sig_pk": base64.b64encode(self.sig_pk).decode(),
               "kem_alg": self.kem_alg, "kem_pk": base64.b64encode(self.kem_pk).decode()}
        tmp = directory / "public.json.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(pub, indent=1))
        os.replace(tmp, directory / "public.json")

    @classmethod
    def load(cls, directory: Path, passphrase: bytes | None = None) -> Identity:
        pub = json.loads((directory / "public.json").read_text())
        sig_alg, sig_sk = pqc.keys.load_private_key(directory / "sig.key", passphrase=passphrase)
        kem_alg, kem_sk = pqc.keys.load_private_key(directory / "kem.key", passphrase=passphrase)
        if sig_alg != pub["sig_alg"] or kem_alg != pub["kem_alg"]:
            raise pqc.errors.InvalidKey(f"key files in {directory} disagree with public.json")
        return cls(sig_alg, base64.b64decode(pub["sig_pk"]), sig_sk, kem_alg, base64.b64decode(pub["kem_pk"]), kem_sk)

    @classmethod
    def load_or_create(cls, directory: Path, sig_alg: str, kem_alg: str) -> Identity:
        if (directory / "public.json").exists():
            return cls.load(directory)
        ident = cls.generate(sig_alg, kem_alg)
        ident.save(directory)
        return ident
