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
