"""What a peer accepts: allowed algorithms, and exact lengths for every input.

A peer refuses an algorithm its policy does not allow instead of negotiating down
(docs/architecture.md, Cryptography), and every key, ciphertext, seed and signature length is
checked here before it reaches a backend: liboqs silently zero-pads short inputs, and a
padded key is a different key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pqc.errors import MalformedInput, PolicyError, QflareCryptoError
from pqc.ids import KemId, SigId, resolve_kem, resolve_sig

Buffer = bytes | bytearray | memoryview


def require_length(value: object, expected: int | Iterable[int], what: str,
                   error: type[QflareCryptoError] = MalformedInput) -> bytes:
    """``value`` as bytes if it is bytes-like of an allowed length; ``error`` saying why if not."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise error(f"{what} must be bytes, got {type(value).__name__}")
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    size = value.nbytes if isinstance(value, memoryview) else len(value)
    if size not in allowed:
        want = " or ".join(str(n) for n in sorted(allowed))
        raise error(f"{what} must be {want} bytes, got {size}")
    return bytes(value)


@dataclass(frozen=True)
class Policy:
    """The algorithms a party accepts; names and aliases are canonicalised on construction.

    ``Policy()`` allows every algorithm QFLARE knows; configuration narrows it
    (``CryptoSettings.allowed_kems`` / ``allowed_signatures``).
    """

    kems: frozenset[KemId] = field(default_factory=lambda: frozenset(KemId))
    signatures: frozenset[SigId] = field(default_factory=lambda: frozenset(SigId))
    #: Why an algorithm is left out, when there is more to say than "not configured".
    why_not: dict[str, str] = field(default_factory=dict)

    def __init__(self, kems: Iterable[str] | None = None, signatures: Iterable[str] | None = None,
                 why_not: dict[str, str] | None = None) -> None:
        object.__setattr__(self, "kems", frozenset(KemId) if kems is None
                           else frozenset(resolve_kem(k) for k in kems))
        object.__setattr__(self, "signatures", frozenset(SigId) if signatures is None
                           else frozenset(resolve_sig(s) for s in signatures))
        object.__setattr__(self, "why_not", dict(why_not or {}))

    def __hash__(self) -> int:
        return hash((self.kems, self.signatures))

    def check_kem(self, name: str) -> KemId:
        """The canonical id of ``name``; :class:`PolicyError` naming it if not allowed."""
        kem = resolve_kem(name)
        if kem not in self.kems:
            allowed = ", ".join(sorted(self.kems)) or "none"
            why = self.why_not.get(kem.value)
            raise PolicyError(f"KEM {kem.value} is not allowed by policy "
                              + (f"({why})" if why else f"(allowed: {allowed})"))
        return kem

    def check_sig(self, name: str) -> SigId:
        """The canonical id of ``name``; :class:`PolicyError` naming it if not allowed."""
        sig = resolve_sig(name)
        if sig not in self.signatures:
            allowed = ", ".join(sorted(self.signatures)) or "none"
            raise PolicyError(f"signature {sig.value} is not allowed by policy (allowed: {allowed})")
        return sig
