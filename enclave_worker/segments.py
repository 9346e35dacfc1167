"""A round's segment file: decrypted deltas written at reserved offsets, durable at :meth:`Segment.sync`.

Appending 4 MB to a new file through the page cache cost 3.8 ms of CPU here (page
allocation, copying, then writeback by the kernel), most of the enclave's own work on a
1M-parameter update. Large records are therefore written with ``O_DIRECT`` from one
reused, page-aligned staging buffer: one memcpy (by numpy, which lets go of the GIL, so the
event loop goes on receiving meanwhile), then the disk DMAs the bytes (0.1 ms of CPU and
~1.8 ms of wall time for 4 MB, with the GIL released). Every record starts at a
multiple of :data:`ALIGN` (the index keeps its true length), so direct and buffered writes
share a file. Small records go through the page cache, where one fsync per batch is
cheaper than one device write each. A one-message float32 update skips even the memcpy: the
enclave opens it straight into an :class:`AlignedBuffer` of the store's :class:`AlignedPool`
(``pqc.open_sealed_into``) and :meth:`Segment.write_aligned` writes from that buffer.

A record's place is reserved first (:meth:`Segment.reserve`, under the store's lock, so
its index row can be written at once) and its bytes written afterwards, by one of the store's
writer threads (:meth:`Segment.write`), while the enclave goes on with the next update.

Durability does not change: ``O_DIRECT`` alone promises nothing about a volatile device
cache or the file's size, so :meth:`Segment.sync` still fsyncs the file; the store waits
for the writes, fsyncs, and only then commits the SQLite rows that index them, and the
enclave acks only after that. Where ``O_DIRECT`` is refused (tmpfs, some network file
systems) every write goes through the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from common.state import open_private_fd

#: Record alignment and O_DIRECT granularity (the largest logical block size in common use).
ALIGN = 4096
#: Records at least this large are written with O_DIRECT.
DIRECT_MIN_BYTES = 256 * 1024
#: Most bytes staged at once: larger records are written in pieces of this size (aligned).
STAGING_BYTES = 8 * 1024 * 1024
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Most bytes of free :class:`AlignedPool` buffers kept for reuse (16 updates of 1M parameters).
POOL_BYTES = 64 * 1024 * 1024


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class Staging:
    """A page-aligned buffer per writer thread, grown on demand and reused (no page faults
    after the first)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.buffers: list[mmap.mmap] = []

    def view(self, nbytes: int) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = mmap.mmap(-1, padded(max(nbytes, ALIGN)))
            with self._lock:
                if getattr(self._local, "buf", None) is not None:
                    self.buffers.remove(self._local.buf)
                    _close(self._local.buf)
                self.buffers.append(buf)
            self._local.buf = buf
        return memoryview(buf)[:nbytes]

    def close(self) -> None:
        with self._lock:
            for buf in self.buffers:
                _close(buf)
            self.buffers.clear()


class AlignedBuffer:
    """A page-aligned buffer of one delta's bytes, taken from an :class:`AlignedPool`: the
    enclave opens an update straight into it and the store writes it to disk from it, with
    no staging copy. :meth:`release` gives it back once the write is done (or the update
    refused); one never released is simply freed with its last reference."""

    __slots__ = ("_buf", "_pool", "nbytes")

    def __init__(self, buf: mmap.mmap, nbytes: int, pool: AlignedPool) -> None:
        self._buf, self.nbytes, self._pool = buf, nbytes, pool

    @property
    def view(self) -> memoryview:
        """The delta's bytes (``nbytes``)."""
        return memoryview(self._buf)[:self.nbytes]

    def padded_view(self) -> memoryview:
        """The bytes up to the next :data:`ALIGN`, the tail zeroed: what an O_DIRECT write takes."""
        size = padded(self.nbytes)
        self._buf[self.nbytes:size] = bytes(size - self.nbytes)
        return memoryview(self._buf)[:size]

    def release(self) -> None:
        """Back to the pool: the caller holds no view of it any more."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._give(self._buf)


class AlignedPool:
    """Reused page-aligned buffers (no page faults and no zero-fill after the first use), at
    most :data:`POOL_BYTES` of them kept free. Taken and released from any thread."""

    def __init__(self, keep_bytes: int | None = None) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._keep = POOL_BYTES if keep_bytes is None else keep_bytes

    def take(self, nbytes: int) -> AlignedBuffer:
        size = padded(max(nbytes, 1))
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) == size:
                    return AlignedBuffer(self._free.pop(i), nbytes, self)
        return AlignedBuffer(mmap.mmap(-1, size), nbytes, self)

    def _give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if sum(map(len, self._free)) + len(buf) <= self._keep:
                self._free.append(buf)
                return
        _close(buf)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for buf in free:
            _close(buf)


def _close(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a view outlives its write (e.g. in a kept traceback): freed with it
        pass


class Segment:
    """Record file of one round. :meth:`reserve` is called under the store's lock; each
    reserved record is then written once by :meth:`write` (by the store's writer threads,
    at once: records never overlap)."""

    def __init__(self, path: Path, staging: Staging) -> None:
        self.path = path
        self._staging = staging
        self._fd = open_private_fd(path)
        self._direct_fd: int | None = None
        #: False once O_DIRECT was refused here: page cache only.
        self.direct_ok = bool(_O_DIRECT)
        # After whatever is there, aligned: a crash may have left bytes past the last indexed
        # record (never committed), and a file from an older version may end unaligned.
        self._end = padded(os.fstat(self._fd).st_size)

    def reserve(self, nbytes: int) -> int:
        """The offset of the next record of ``nbytes`` (aligned; the room is padded)."""
        offset, self._end = self._end, self._end + padded(nbytes)
        return offset

    def write(self, data: memoryview, offset: int) -> None:
        """Write a reserved record. Durable only after :meth:`sync`."""
        nbytes = data.nbytes
        if self.direct_ok and nbytes >= DIRECT_MIN_BYTES and self._write_direct(data, offset):
            return
        _pwrite_all(self._fd, data, offset)
        size = padded(nbytes)
        if size > nbytes:
            _pwrite_all(self._fd, memoryview(bytes(size - nbytes)), offset + nbytes)

    def write_aligned(self, buf: AlignedBuffer, offset: int) -> None:
        """Write a reserved record from an aligned buffer: large ones straight to disk with
        O_DIRECT (no staging copy), else as :meth:`write`."""
        if not (self.direct_ok and buf.nbytes >= DIRECT_MIN_BYTES and self._direct()):
            self.write(buf.view, offset)
            return
        data = buf.padded_view()
        try:
            _pwrite_all(self._direct_fd, data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct_ok = False  # the file system wants other alignment, or none
            _pwrite_all(self._fd, data, offset)
        finally:
            data.release()

    def _direct(self) -> bool:
        """The O_DIRECT descriptor is open (False, and direct writes off, where it is refused)."""
        if self._direct_fd is None:
            try:
                self._direct_fd = open_private_fd(self.path, _O_DIRECT)
            except OSError:
                self.direct_ok = False
                return False
        return True

    def _write_direct(self, data: memoryview, offset: int) -> bool:
        if not self._direct():
            return False
        for start in range(0, data.nbytes, STAGING_BYTES):  # a 100 MB delta: 13 pieces, 8 MiB held
            piece = data[start:start + STAGING_BYTES]
            size = padded(piece.nbytes)
            out = self._staging.view(size)
            try:
                _stage(out, piece)
                try:
                    _pwrite_all(self._direct_fd, out, offset + start)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct_ok = False  # the file system wants other alignment, or none
                    _pwrite_all(self._fd, out, offset + start)  # through the page cache instead
            finally:
                out.release()
        return True

    def sync(self) -> None:
        """Make every written record durable (fsync covers the file whichever fd wrote it)."""
        os.fsync(self._fd)

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._direct_fd = None


def _stage(out: memoryview, piece: memoryview) -> None:
    """``piece`` into the start of ``out``, the rest zeroed. numpy copies without the GIL (a
    memoryview assignment holds it for the whole 4 MB), and its view of ``out`` is gone on
    return, so ``out`` can be released."""
    staged = np.frombuffer(out, dtype=np.uint8)
    try:
        np.copyto(staged[:piece.nbytes], np.frombuffer(piece, dtype=np.uint8))
        staged[piece.nbytes:] = 0
    finally:
        del staged


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)
