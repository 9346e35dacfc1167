"""Round segments (enclave_worker/segments.py): direct and buffered records read back exactly,
the fallbacks, and a committed batch surviving kill -9 of the process that wrote it."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import signal

import numpy as np
import pytest

from enclave_worker import segments
from enclave_worker.segments import ALIGN, DIRECT_MIN_BYTES
from enclave_worker.store import EnclaveStore

BIG = DIRECT_MIN_BYTES // 4 + 1000  # floats: above the direct threshold, not a multiple of ALIGN
SMALL = 37


def _vec(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


def _fill(store: EnclaveStore, sizes: list[int]) -> list[np.ndarray]:
    store.open_round(1, b"spec")
    store.begin()
    vecs = [_vec(n, i) for i, n in enumerate(sizes)]
    for i, v in enumerate(vecs):
        store.add_update(1, f"u{i:04d}", f"d{i}", 1, v)
    store.commit()
    return vecs


def test_direct_and_buffered_records_read_back_and_start_aligned(tmp_path):
    store = EnclaveStore(tmp_path / "enclave")
    vecs = _fill(store, [BIG, SMALL, BIG, BIG, SMALL])
    stored = store.round_updates(1)
    assert all(u.offset % ALIGN == 0 for u in stored)
    for u, v in zip(stored, vecs, strict=True):
        assert u.length == v.nbytes
        assert np.array_equal(store.load_delta(u), v)
        assert np.array_equal(store.load_delta(u, 5, 20), v[5:20])
    store.close()


def test_a_record_larger_than_the_staging_buffer_goes_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "STAGING_BYTES", 2 * ALIGN * 16)
    store = EnclaveStore(tmp_path / "enclave")
    vecs = _fill(store, [BIG, BIG + 3])
    for u, v in zip(store.round_updates(1), vecs, strict=True):
        assert np.array_equal(store.load_delta(u), v)
    if store._segments[1].direct_ok:  # (a file system without O_DIRECT stages nothing)
        assert max(len(b) for b in store._staging.buffers) == 2 * ALIGN * 16
    store.close()


def test_o_direct_refused_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    real = os.pwrite

    def refusing(fd, data, offset):  # as a file system without O_DIRECT answers
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(segments.os, "pwrite", refusing)
    store = EnclaveStore(tmp_path / "enclave")
    vecs = _fill(store, [BIG, BIG])
    assert not store._segments[1].direct_ok
    for u, v in zip(store.round_updates(1), vecs, strict=True):
        assert np.array_equal(store.load_delta(u), v)
    store.close()


def test_records_after_an_unaligned_end_start_at_the_next_boundary(tmp_path):
    store = EnclaveStore(tmp_path / "enclave")
    store.open_round(1, b"spec")
    with open(tmp_path / "enclave" / "rounds" / "1.f32", "wb") as fh:
        fh.write(b"x" * 10)  # e.g. written by an older version: no alignment
    v = _vec(BIG, 3)
    store.add_update(1, "u0", "d0", 1, v)
    (u,) = store.round_updates(1)
    assert u.offset == ALIGN and np.array_equal(store.load_delta(u), v)
    store.close()


def test_a_failed_write_fails_its_batch_and_nothing_of_it_is_indexed(tmp_path, monkeypatch):
    store = EnclaveStore(tmp_path / "enclave")
    kept = _fill(store, [BIG])
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments.os, "pwrite", full)
    store.begin()
    store.add_update(1, "lost", "dx", 1, _vec(BIG, 5))
    with pytest.raises(OSError, match="No space"):
        store.commit()
    monkeypatch.setattr(segments.os, "pwrite", real)
    assert [u.update_id for u in store.round_updates(1)] == ["u0000"]
    assert np.array_equal(store.load_delta(store.round_updates(1)[0]), kept[0])
    store.add_update(1, "again", "dx", 1, _vec(BIG, 5))  # the disk has room again
    assert np.array_equal(store.load_delta(store.round_updates(1)[1]), _vec(BIG, 5))
    store.close()


def _add_aligned(store: EnclaveStore, uid: str, v: np.ndarray) -> bool:
    """``v`` added as the enclave adds an opened update: from a pool buffer, written uncopied."""
    buf = store.buffers.take(v.nbytes)
    np.frombuffer(buf.view, dtype="<f4")[:] = v
    return store.add_update(1, uid, "d" + uid, 1, np.frombuffer(buf.view, dtype="<f4"), aligned=buf)


def test_deltas_from_pool_buffers_read_back_with_zeroed_padding_and_the_buffers_come_back(tmp_path):
    store = EnclaveStore(tmp_path / "enclave")
    store.open_round(1, b"spec")
    store.begin()
    stale = store.buffers.take(BIG * 4)
    stale.view[:] = b"\xff" * (BIG * 4)  # a buffer's last use leaves its bytes behind
    big = stale._buf
    stale.release()
    again = store.buffers.take(BIG * 4 - 7 * 4)  # the same padded size: the same buffer, not a new one
    assert again._buf is big
    again.release()
    vecs = {f"a{i}": _vec(n, 10 + i) for i, n in enumerate([BIG, SMALL, BIG, BIG - 7])}
    for uid, v in vecs.items():
        assert _add_aligned(store, uid, v)
    store.commit()
    path = tmp_path / "enclave" / "rounds" / "1.f32"
    raw = path.read_bytes()
    for u in store.round_updates(1):
        assert u.offset % ALIGN == 0 and np.array_equal(store.load_delta(u), vecs[u.update_id])
        end = u.offset + u.length
        assert raw[end:segments.padded(end)] == bytes(segments.padded(end) - end)  # nothing stale written
    assert any(b is big for b in store.buffers._free)  # reused, and back after its write
    store.close()


def test_a_duplicate_from_a_pool_buffer_gives_it_back_unwritten(tmp_path):
    store = EnclaveStore(tmp_path / "enclave")
    store.open_round(1, b"spec")
    assert _add_aligned(store, "u", _vec(BIG, 1))
    free = len(store.buffers._free)
    assert not _add_aligned(store, "u", _vec(BIG, 2))
    assert len(store.buffers._free) == free
    assert np.array_equal(store.load_delta(store.round_updates(1)[0]), _vec(BIG, 1))
    store.close()


def test_pool_buffers_fall_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch):
    real = os.pwrite

    def refusing(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(segments.os, "pwrite", refusing)
    store = EnclaveStore(tmp_path / "enclave")
    store.open_round(1, b"spec")
    vecs = [_vec(BIG, 3), _vec(BIG, 4)]
    for i, v in enumerate(vecs):
        _add_aligned(store, f"u{i}", v)
    assert not store._segments[1].direct_ok
    for u, v in zip(store.round_updates(1), vecs, strict=True):
        assert np.array_equal(store.load_delta(u), v)
    store.close()


def test_the_pool_keeps_at_most_its_bytes_and_a_buffer_is_released_once():
    pool = segments.AlignedPool(keep_bytes=3 * ALIGN)
    bufs = [pool.take(ALIGN) for _ in range(5)]
    assert len({id(b._buf) for b in bufs}) == 5
    bufs[0].release()
    bufs[0].release()  # a second release is a no-op: never two owners of one buffer
    assert len(pool._free) == 1
    for b in bufs[1:]:
        b.release()
    assert len(pool._free) == 3
    a, b = pool.take(ALIGN), pool.take(ALIGN)
    assert a._buf is not b._buf
    pool.close()


def _write_then_die(directory, sizes, pipe) -> None:
    store = EnclaveStore(directory)
    _fill(store, sizes)  # committed: segment fsynced, then the rows
    store.begin()
    store.add_update(1, "late", "dl", 1, _vec(BIG, 99))  # written, never committed
    pipe.send("committed")
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("sizes", [[BIG, BIG, BIG], [SMALL, BIG, SMALL]])
def test_a_committed_batch_survives_kill_9_and_an_uncommitted_update_is_not_there(tmp_path, sizes):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_write_then_die, args=(tmp_path / "enclave", sizes, child))
    proc.start()
    assert parent.recv() == "committed"
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    store = EnclaveStore(tmp_path / "enclave")
    stored = store.round_updates(1)
    assert [u.update_id for u in stored] == [f"u{i:04d}" for i in range(len(sizes))]
    for i, u in enumerate(stored):
        assert np.array_equal(store.load_delta(u), _vec(sizes[i], i))
    # the next record goes after whatever the dead process left at the end
    store.add_update(1, "next", "dn", 1, _vec(BIG, 7))
    nxt = next(u for u in store.round_updates(1) if u.update_id == "next")
    assert np.array_equal(store.load_delta(nxt), _vec(BIG, 7))
    store.close()
