"""State at rest: directories only their owner can enter (0700), files only it can read (0600).

The registry, the enclave store, round segments (decrypted deltas) and models are written
through these helpers, so nothing a service keeps is readable by other users of the host,
whatever the umask. SQLite creates its ``-wal``/``-shm`` files with the database file's own
mode, so creating the database file 0600 first covers them too.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists with mode 0600 (created empty if missing); returns it.

    Its directory is made 0700 too when it does not exist yet.
    """
    path = Path(path)
    if not path.parent.exists():
        private_dir(path.parent)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
    os.chmod(path, FILE_MODE)
    return path


def open_private_append(path: Path):
    """``open(path, "ab")`` for a file created 0600 (round segments hold decrypted deltas)."""
    return os.fdopen(open_private_fd(path, os.O_APPEND), "ab")


def open_private_fd(path: Path, flags: int = 0) -> int:
    """A write descriptor on ``path``, created 0600, with extra ``flags`` (e.g. O_APPEND)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd
