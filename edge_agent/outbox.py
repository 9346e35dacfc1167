"""The device's durable outbox: an update stays here until the broker confirmed it.

After a reconnect or a restart, pending updates are sent again with the same update id,
which the enclave uses to count each update once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import msgpack


class Outbox:
    def __init__(self, path: Path | str, *, power_safe: bool = True) -> None:
        """``power_safe`` False: a commit survives a crash of the process but not a power loss
        (WAL without an fsync per commit), for simulated devices that share one host's disk
        (``qflare load``): each real device syncs its own storage, in parallel with the others."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=" + ("FULL" if power_safe else "NORMAL"))
        self.db.execute("CREATE TABLE IF NOT EXISTS outbox (update_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, "
                        "routing_key TEXT NOT NULL, body BLOB NOT NULL, round_id INTEGER NOT NULL, "
                        "created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)")
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(outbox)")}
        if "chunked" not in columns:  # outboxes from before chunked updates
            self.db.execute("ALTER TABLE outbox ADD COLUMN chunked INTEGER NOT NULL DEFAULT 0")
        self.lock = threading.Lock()

    def put(self, update_id: str, device_id: str, routing_key: str, body: bytes | list[bytes], round_id: int) -> None:
        """Keep an update until confirmed: one message, or a chunked update's messages in order."""
        chunked = isinstance(body, list)
        blob = msgpack.packb(body, use_bin_type=True) if chunked else body
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO outbox (update_id, device_id, routing_key, body, round_id, "
                            "created_at, attempts, chunked) VALUES (?,?,?,?,?,?,0,?)",
                            (update_id, device_id, routing_key, blob, round_id, time.time(), int(chunked)))

    def attempt(self, update_id: str) -> None:
        with self.lock:
            self.db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE update_id=?", (update_id,))

    def confirmed(self, update_id: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM outbox WHERE update_id=?", (update_id,))

    def is_pending(self, update_id: str) -> bool:
        """Whether ``update_id`` still waits for the broker's confirm (a resend, or a flush, sent it if not)."""
        with self.lock:
            return self.db.execute("SELECT 1 FROM outbox WHERE update_id=?", (update_id,)).fetchone() is not None

    def pending(self, device_id: str | None = None) -> list[tuple[str, str, str, bytes | list[bytes]]]:
        """(update_id, device_id, routing_key, body or chunk bodies) of every unconfirmed update, oldest first."""
        q = "SELECT update_id, device_id, routing_key, body, chunked FROM outbox"
        args: tuple = ()
        if device_id is not None:
            q += " WHERE device_id=?"
            args = (device_id,)
        with self.lock:  # a fleet's worker threads put updates while the loop reads
            rows = self.db.execute(q + " ORDER BY created_at", args).fetchall()
        return [(u, d, k, msgpack.unpackb(b) if chunked else b) for u, d, k, b, chunked in rows]

    def close(self) -> None:
        self.db.close()
