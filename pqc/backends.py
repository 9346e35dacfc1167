"""Which backends are installed, found without side effects.

``liboqs-python`` must not be imported blindly: when it cannot find the liboqs shared
library it prints to stdout, counts down, tries to ``git clone`` and build liboqs, and
finally raises ``SystemExit``. So the shared library and the Python package are looked
for first, and only when both exist is ``oqs`` imported, with stdout silenced and every
exception (``SystemExit`` included) caught. The answer is cached for the process.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import importlib
import importlib.util
import io
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger("pqc")

CRYPTOGRAPHY = "cryptography"
LIBOQS = "liboqs"
PURE = "pure"
#: Every backend name; also the order of preference when the caller names none.
BACKENDS: tuple[str, ...] = (CRYPTOGRAPHY, LIBOQS, PURE)


def liboqs_library() -> str | None:
    """Path or soname of a liboqs shared library, or None (no import of ``oqs``)."""
    found = ctypes.util.find_library("oqs")
    if found:
        return found
    roots = [os.environ.get("OQS_INSTALL_PATH"), str(Path.home() / "_oqs")]
    for root in filter(None, roots):
        for lib in ("lib", "lib64"):
            for name in ("liboqs.so", "liboqs.dylib", "oqs.dll"):
                candidate = Path(root) / lib / name
                if candidate.exists():
                    return str(candidate)
    return None


@functools.cache
def load_oqs() -> ModuleType | None:
    """The ``oqs`` module when liboqs and liboqs-python are both present, else None."""
    if importlib.util.find_spec("oqs") is None:
        return None
    library = liboqs_library()
    if library is None:
        log.debug("liboqs-python is installed but no liboqs shared library was found")
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module = importlib.import_module("oqs")
    except BaseException as exc:  # noqa: BLE001 - liboqs-python raises SystemExit
        log.warning("liboqs found at %s but importing oqs failed: %r", library, exc)
        return None
    log.debug("liboqs backend available (%s)", library)
    return module


def liboqs_available() -> bool:
    return load_oqs() is not None


def liboqs_enabled(module: ModuleType, mechanism: str, kind: str) -> bool:
    """Whether the loaded liboqs build enables ``mechanism`` (kind is "kem" or "sig")."""
    getter = "get_enabled_kem_mechanisms" if kind == "kem" else "get_enabled_sig_mechanisms"
    try:
        return mechanism in getattr(module, getter)()
    except Exception:  # noqa: BLE001
        return False
