"""The enclave's durable state: rounds, accepted updates, revocations and global models.

Deltas are appended to one segment file per round and indexed (offset, length) in SQLite.
A delta's place and its row are taken at once; its bytes are written by one of the store's
writer threads (enclave_worker/segments.py: large records with O_DIRECT) while the caller
goes on. A batch of updates becomes durable at :meth:`EnclaveStore.commit`: it waits for
the batch's writes, fsyncs the segment, then commits the rows, and only then are its
messages acked. A write that failed fails that commit (rolled back, nothing acked). A
crash therefore redelivers at most what was not yet durable, and the update id (primary
key) keeps a redelivered update from counting twice.
A round's segment is deleted once the round is recorded closed. Directories are 0700 and
files 0600 (common/state.py). In a real TEE this directory would be sealed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.stages import Stages, timed
from common.state import private_dir, private_file
from enclave_worker.segments import AlignedBuffer, AlignedPool, Segment, Staging

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
  round_id INTEGER PRIMARY KEY, spec BLOB NOT NULL, status TEXT NOT NULL,
  opened_at REAL NOT NULL, closed_at REAL, result TEXT, rejected TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS updates (
  update_id TEXT PRIMARY KEY, round_id INTEGER NOT NULL, device_id TEXT NOT NULL,
  num_samples INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL, norm REAL NOT NULL,
  at REAL NOT NULL, base_version INTEGER NOT NULL DEFAULT 0, folded INTEGER);
CREATE INDEX IF NOT EXISTS updates_round ON updates(round_id);
CREATE TABLE IF NOT EXISTS revoked (device_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS key_epochs (device_id TEXT PRIMARY KEY, not_before REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reports (digest BLOB PRIMARY KEY, kem_fp TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS models (
  version INTEGER PRIMARY KEY, round_id INTEGER, params BLOB NOT NULL, signed BLOB, created_at REAL NOT NULL);
"""
#: Columns added since the first schema (async rounds): added to an older store at open.
#: ``folded``: the model version an async round's update went into (NULL: still buffered).
ADDED_COLUMNS = {"updates": (("base_version", "INTEGER NOT NULL DEFAULT 0"), ("folded", "INTEGER"))}


#: Segment writes in flight at once (two keep the disk busy while one write waits on it).
WRITERS = 2


@dataclass(frozen=True)
class StoredUpdate:
    update_id: str
    device_id: str
    num_samples: int
    round_id: int
    offset: int
    length: int
    norm: float
    base_version: int = 0


class EnclaveStore:
    def __init__(self, directory: Path) -> None:
        self.dir = private_dir(directory)
        db_path = private_file(directory / "enclave.sqlite3")  # models and the round index, 0600
        self.db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns:
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        self.lock = threading.RLock()
        self._segments: dict[int, Segment] = {}  # round id -> open segment
        self._staging = Staging()  # the aligned buffer direct writes go through
        #: Aligned buffers a delta can be opened into and written from with no copy (:meth:`add_update`).
        self.buffers = AlignedPool()
        self._writer = ThreadPoolExecutor(WRITERS, thread_name_prefix="qflare-segment-writer")
        self._writes: list[Future] = []  # of the open batch
        #: Counts the segment writes' time as ``store`` when set (the enclave's stages).
        self.stages: Stages | None = None
        private_dir(self.dir / "rounds")
        self._drop_closed_segments()

    def close(self) -> None:
        self.wait_writes()
        self._writer.shutdown(wait=True)
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        self._staging.close()
        self.buffers.close()
        self.db.close()

    def _segment_path(self, round_id: int) -> Path:
        return self.dir / "rounds" / f"{round_id}.f32"

    def _segment(self, round_id: int) -> Segment:
        if round_id not in self._segments:
            self._segments[round_id] = Segment(self._segment_path(round_id), self._staging)
        return self._segments[round_id]

    def begin(self) -> None:
        """Open a batch: writes until :meth:`commit` become durable together (one fsync)."""
        with self.lock:
            if not self.db.in_transaction:
                self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """Make the batch durable: the segments' bytes first (written, then fsynced), then the
        rows that point to them. If a write failed, the batch is rolled back and this raises."""
        with self.lock:
            writes, self._writes = self._writes, []
            wait(writes)
            failed = next((f.exception() for f in writes if f.exception() is not None), None)
            if failed is not None:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise failed
            for seg in self._segments.values():
                seg.sync()
            if self.db.in_transaction:
                self.db.execute("COMMIT")

    def wait_writes(self) -> None:
        """Wait for the writes in flight (their errors are raised by :meth:`commit`)."""
        wait(list(self._writes))

    def _write(self, seg: Segment, data: memoryview, offset: int) -> None:
        with timed(self.stages, "store"):
            seg.write(data, offset)

    def _write_aligned(self, seg: Segment, buf: AlignedBuffer, offset: int) -> None:
        try:
            with timed(self.stages, "store"):
                seg.write_aligned(buf, offset)
        finally:
            buf.release()

    # rounds
    def open_round(self, round_id: int, spec: bytes) -> bool:
        """Record an open round; False if that round id was already known."""
        with self.lock:
            cur = self.db.execute("INSERT OR IGNORE INTO rounds(round_id, spec, status, opened_at) VALUES (?,?,?,?)",
                                  (round_id, spec, "open", time.time()))
            return cur.rowcount == 1

    def round_status(self, round_id: int) -> str | None:
        row = self.db.execute("SELECT status FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        return row[0] if row else None

    def open_rounds(self) -> list[tuple[int, bytes]]:
        return self.db.execute("SELECT round_id, spec FROM rounds WHERE status='open' ORDER BY round_id").fetchall()

    def close_round(self, round_id: int, status: str, result: dict) -> None:
        """Record how the round ended, then delete its segment: its decrypted deltas are no
        longer needed once the outcome (and any model it made) is recorded."""
        with self.lock:
            self.db.execute("UPDATE rounds SET status=?, closed_at=?, result=? WHERE round_id=?",
                            (status, time.time(), json.dumps(result), round_id))
            if self.db.in_transaction:
                self.commit()  # the close must be durable before the deltas go
            self._drop_segment(round_id)

    def _drop_segment(self, round_id: int) -> None:
        self.wait_writes()
        seg = self._segments.pop(round_id, None)
        if seg is not None:
            seg.close()
        self._segment_path(round_id).unlink(missing_ok=True)

    def _drop_closed_segments(self) -> None:
        """Segments left by a crash between recording a round closed and deleting them."""
        for path in (self.dir / "rounds").glob("*.f32"):
            status = self.round_status(int(path.stem)) if path.stem.isdigit() else "closed"
            if status != "open":
                path.unlink(missing_ok=True)

    def closed_round(self, round_id: int) -> tuple[dict, int | None]:
        """(stored round result, version of the (last) model it produced, if any)."""
        row = self.db.execute("SELECT result FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        model = self.db.execute("SELECT MAX(version) FROM models WHERE round_id=?", (round_id,)).fetchone()
        return json.loads(row[0]), model[0] if model else None

    def count_rejection(self, round_id: int, reason: str) -> None:
        with self.lock:
            row = self.db.execute("SELECT rejected FROM rounds WHERE round_id=?", (round_id,)).fetchone()
            if row is None:
                return
            rejected = json.loads(row[0])
            rejected[reason] = rejected.get(reason, 0) + 1
            self.db.execute("UPDATE rounds SET rejected=? WHERE round_id=?", (json.dumps(rejected), round_id))

    def rejections(self, round_id: int) -> dict[str, int]:
        row = self.db.execute("SELECT rejected FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    # updates
    def has_update(self, update_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM updates WHERE update_id=?", (update_id,)).fetchone() is not None

    def add_update(self, round_id: int, update_id: str, device_id: str, num_samples: int, delta: np.ndarray,
                   norm: float | None = None, base_version: int = 0, aligned: AlignedBuffer | None = None) -> bool:
        """Index the delta and queue its write to the round's segment; durable at :meth:`commit`.

        The row is always written inside a transaction, so it never becomes durable before
        the bytes it points to. Outside a batch this commits at once. False if the id was
        already stored. ``delta`` must not change until the commit (the enclave never reuses it).
        ``aligned``: the buffer ``delta`` lives in (from :attr:`buffers`), written from directly
        and released once written (or at once, if nothing is written).
        """
        with self.lock:
            if self.has_update(update_id):
                if aligned is not None:
                    aligned.release()
                return False
            data = memoryview(np.ascontiguousarray(delta, dtype="<f4")).cast("B")
            seg = self._segment(round_id)
            offset = seg.reserve(data.nbytes)
            if norm is None:
                norm = float(np.linalg.norm(np.asarray(delta, dtype=np.float64)))
            in_batch = self.db.in_transaction
            if not in_batch:
                self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO updates(update_id, round_id, device_id, num_samples, offset, length, norm, "
                            "at, base_version) VALUES (?,?,?,?,?,?,?,?,?)",
                            (update_id, round_id, device_id, num_samples, offset, data.nbytes, norm, time.time(),
                             base_version))
            if aligned is not None and aligned.nbytes == data.nbytes:  # the writer releases it
                self._writes.append(self._writer.submit(self._write_aligned, seg, aligned, offset))
            else:
                self._writes.append(self._writer.submit(self._write, seg, data, offset))
            if not in_batch:
                self.commit()
            return True

    def round_updates(self, round_id: int) -> list[StoredUpdate]:
        rows = self.db.execute("SELECT update_id, device_id, num_samples, round_id, offset, length, norm, base_version "
                               "FROM updates WHERE round_id=? ORDER BY at", (round_id,)).fetchall()
        return [StoredUpdate(*r) for r in rows]

    def buffered_updates(self, round_id: int) -> list[StoredUpdate]:
        """An async round's accepted updates not yet folded into a model, oldest first."""
        rows = self.db.execute("SELECT update_id, device_id, num_samples, round_id, offset, length, norm, base_version "
                               "FROM updates WHERE round_id=? AND folded IS NULL ORDER BY at, rowid",
                               (round_id,)).fetchall()
        return [StoredUpdate(*r) for r in rows]

    def fold(self, update_ids: list[str], version: int) -> None:
        """Record that these buffered updates went into model ``version`` (in the caller's batch)."""
        with self.lock:
            self.db.executemany("UPDATE updates SET folded=? WHERE update_id=?", [(version, u) for u in update_ids])

    def folded_count(self, round_id: int) -> int:
        """How many of an async round's updates went into a model (-1: judged and dropped)."""
        return self.db.execute("SELECT COUNT(*) FROM updates WHERE round_id=? AND folded > 0",
                               (round_id,)).fetchone()[0]

    def versions_of_round(self, round_id: int) -> list[int]:
        """The model versions a round produced (several for an async round), in order."""
        return [r[0] for r in self.db.execute("SELECT version FROM models WHERE round_id=? ORDER BY version",
                                              (round_id,))]

    def in_buffer(self, round_id: int, device_id: str) -> bool:
        """Whether the device has an update in the async round's buffer (not yet folded)."""
        return self.db.execute("SELECT 1 FROM updates WHERE round_id=? AND device_id=? AND folded IS NULL",
                               (round_id, device_id)).fetchone() is not None

    def sent_on_base(self, round_id: int, device_id: str, base_version: int) -> bool:
        """Whether the device already has an update on this base version in the round (async)."""
        return self.db.execute("SELECT 1 FROM updates WHERE round_id=? AND device_id=? AND base_version=?",
                               (round_id, device_id, base_version)).fetchone() is not None

    def devices_in_round(self, round_id: int) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT device_id FROM updates WHERE round_id=?", (round_id,))}

    def load_delta(self, update: StoredUpdate, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One update's delta (or its elements [start, stop)), read on demand (rounds are
        streamed, never loaded whole)."""
        if self._writes:
            self.wait_writes()
        n = update.length // 4
        stop = n if stop is None else min(stop, n)
        return np.fromfile(self._segment_path(update.round_id), dtype="<f4", count=max(0, stop - start),
                           offset=update.offset + 4 * start)

    # revocations
    def revoke(self, device_id: str, at: float) -> None:
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO revoked VALUES (?,?)", (device_id, at))

    def revoked(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT device_id FROM revoked")}

    def round_opened_at(self, round_id: int) -> float | None:
        row = self.db.execute("SELECT opened_at FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return row[0] if row else None

    def set_key_epoch(self, device_id: str, not_before: float) -> None:
        """Grants issued to ``device_id`` before ``not_before`` are refused from now on (never lowered)."""
        with self.lock:
            self.db.execute("INSERT INTO key_epochs VALUES (?,?) ON CONFLICT(device_id) DO UPDATE SET "
                            "not_before = max(not_before, excluded.not_before)", (device_id, not_before))

    def key_epochs(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT device_id, not_before FROM key_epochs"))

    def add_report(self, digest: bytes, kem_fp: str) -> None:
        """Remember a report of ours the coordinator admitted: grants naming it are for us."""
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO reports VALUES (?,?,?)", (digest, kem_fp, time.time()))

    def reports(self, kem_fp: str) -> set[bytes]:
        """Digests of the admitted reports of the KEM key ``kem_fp`` (this enclave's keys)."""
        return {r[0] for r in self.db.execute("SELECT digest FROM reports WHERE kem_fp = ?", (kem_fp,))}

    # models
    def save_model(self, version: int, round_id: int | None, params: np.ndarray, signed: bytes | None) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO models VALUES (?,?,?,?,?)",
                            (version, round_id, np.ascontiguousarray(params, dtype="<f4").tobytes(), signed,
                             time.time()))

    def model(self, version: int) -> tuple[np.ndarray, bytes | None] | None:
        """(parameters, the signed model message as published) of ``version``."""
        row = self.db.execute("SELECT params, signed FROM models WHERE version=?", (version,)).fetchone()
        return (np.frombuffer(row[0], dtype="<f4").copy(), row[1]) if row else None

    def has_model(self, version: int) -> bool:
        """Whether this enclave made (and so published) model ``version``."""
        return self.db.execute("SELECT 1 FROM models WHERE version=?", (version,)).fetchone() is not None

    def latest_model(self) -> tuple[int, np.ndarray] | None:
        row = self.db.execute("SELECT version, params FROM models ORDER BY version DESC LIMIT 1").fetchone()
        return (row[0], np.frombuffer(row[1], dtype="<f4").copy()) if row else None
