"""The device registry: devices, token hashes, sessions, seen nonces and an audit log.

SQLite by default (WAL, migrations in order); :class:`RegistryStore` is the interface the
PostgreSQL store (:mod:`coordinator.registry_pg`, selected by ``registry_url``) implements
for several coordinators. Tokens are stored only as SHA3-256 hashes, and burning one is a
single conditional UPDATE, so two requests racing with one token cannot both win, even from
two processes. The SQL here is the common dialect of SQLite and PostgreSQL (``?``
placeholders, ``ON CONFLICT``): both stores run the same statements.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from common.state import private_dir, private_file

if TYPE_CHECKING:
    from common.settings import Settings

MIGRATIONS: list[str] = [
    """
    CREATE TABLE devices (
      device_id TEXT PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
      sig_alg TEXT NOT NULL, sig_pk BLOB NOT NULL, sig_fp TEXT NOT NULL,
      kem_alg TEXT NOT NULL, kem_pk BLOB NOT NULL, kem_fp TEXT NOT NULL,
      enrolled_at REAL NOT NULL, rotated_at REAL, revoked_at REAL);
    CREATE TABLE tokens (
      token_hash TEXT PRIMARY KEY, device_id TEXT NOT NULL, created_at REAL NOT NULL,
      expires_at REAL NOT NULL, used_at REAL, revoked_at REAL);
    CREATE TABLE sessions (
      session_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, opened_at REAL NOT NULL, not_after REAL NOT NULL);
    CREATE INDEX sessions_device ON sessions(device_id);
    CREATE TABLE seen_nonces (nonce TEXT PRIMARY KEY, seen_at REAL NOT NULL);
    CREATE INDEX seen_nonces_at ON seen_nonces(seen_at);
    CREATE TABLE audit (
      id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
      device_id TEXT, detail TEXT NOT NULL);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    """,
    # rounds as the coordinator saw them: opened by its plan, closed by the enclave's events
    """
    CREATE TABLE rounds (
      round_id INTEGER PRIMARY KEY, status TEXT NOT NULL, opened_at REAL NOT NULL, deadline REAL NOT NULL,
      min_updates INTEGER NOT NULL, expected INTEGER NOT NULL, closed_at REAL, accepted INTEGER,
      rejected TEXT NOT NULL DEFAULT '{}', accuracy REAL, version INTEGER, reason TEXT);
    """,
    # sessions usable by every coordinator sharing the registry: the session key, wrapped under
    # the coordinator's identity (coordinator/session_keys.py), and the last accepted call
    """
    ALTER TABLE sessions ADD COLUMN wrapped_key BLOB;
    ALTER TABLE sessions ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
    """,
    # handshake kem-v3: each device's enrolment MAC key, wrapped under the coordinator's identity
    # and bound to the signature key it was enrolled with (docs/crypto.md, "kem-v3"); and the
    # sessions whose keys are still kept, by expiry, so forgetting expired keys (done now and
    # then as sessions open) reads only those instead of every session row
    """
    CREATE TABLE device_auth (device_id TEXT PRIMARY KEY, sig_fp TEXT NOT NULL, wrapped_key BLOB NOT NULL);
    CREATE INDEX sessions_key_expiry ON sessions(not_after) WHERE wrapped_key IS NOT NULL;
    """,
]


class RegistryError(Exception):
    """A registry rule was broken; ``reason`` is a reason code (e.g. ``revoked``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Device:
    device_id: str
    status: str
    sig_alg: str
    sig_pk: bytes
    sig_fp: str
    kem_alg: str
    kem_pk: bytes
    kem_fp: str
    enrolled_at: float
    rotated_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class TokenRecord:
    token_hash: str
    device_id: str
    created_at: float
    expires_at: float
    used_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    device_id: str
    opened_at: float
    not_after: float
    wrapped_key: bytes | None = None
    last_seq: int = 0


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    device_id: str | None
    detail: dict


@dataclass(frozen=True)
class RoundRecord:
    round_id: int
    status: str
    opened_at: float
    deadline: float
    min_updates: int
    expected: int
    closed_at: float | None
    accepted: int | None
    rejected: dict
    accuracy: float | None
    version: int | None
    reason: str | None

    @classmethod
    def from_row(cls, row: tuple) -> RoundRecord:
        values = list(row)
        values[8] = json.loads(values[8])
        return cls(*values)


def token_hash(token: str) -> str:
    return hashlib.sha3_256(token.encode()).hexdigest()


class RegistryStore(Protocol):
    """What the coordinator needs from a registry (SQLite here; PostgreSQL later)."""

    def create_token(self, device_id: str, ttl_seconds: float, now: float | None = None) -> str: ...
    def check_token(self, token: str, device_id: str, now: float | None = None) -> str: ...
    def consume_token(self, token: str, device_id: str, now: float | None = None) -> str: ...
    def enroll_device(self, device_id: str, sig_alg: str, sig_pk: bytes, kem_alg: str, kem_pk: bytes,
                      now: float | None = None) -> Device: ...
    def get_device(self, device_id: str) -> Device | None: ...
    def set_device_auth(self, device_id: str, sig_fp: str, wrapped_key: bytes) -> None: ...
    def get_device_auth(self, device_id: str) -> tuple[Device, bytes | None] | None: ...
    def session_inputs(self, device_id: str, meta_key: str) -> tuple[Device, bytes | None, bytes | None] | None: ...
    def device_auth_rows(self) -> list[tuple[str, str, bytes]]: ...
    def revoke_device(self, device_id: str, reason: str, now: float | None = None) -> Device: ...
    def rotate_device_keys(self, device_id: str, sig_alg: str, sig_pk: bytes, kem_alg: str, kem_pk: bytes,
                           now: float | None = None) -> Device: ...
    def record_session(self, session_id: str, device_id: str, not_after: float, now: float | None = None,
                       wrapped_key: bytes | None = None) -> bool: ...
    def record_sessions(self, rows: list[tuple[str, str, float, float, bytes | None]]) -> list[bool]: ...
    def get_session(self, session_id: str) -> SessionRecord | None: ...
    def advance_session(self, session_id: str, seq: int) -> bool: ...
    def claim_identity(self, namespace: str, fingerprint: str) -> str: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def commit_group(self, steps: list[Callable[[], object]]) -> list[object]: ...
    def claim_lease(self, name: str, holder: str, ttl_seconds: float, now: float | None = None) -> bool: ...
    def release_lease(self, name: str, holder: str) -> None: ...
    def remember_nonce(self, nonce: bytes, now: float | None = None, window_seconds: float = 300) -> bool: ...
    def remember_nonce_in_step(self, nonce: bytes, now: float | None = None, window_seconds: float = 300) -> bool: ...
    def audit(self, actor: str, action: str, device_id: str | None = None, **detail: object) -> None: ...
    def get_meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes) -> None: ...


class Registry:
    """SQLite implementation of :class:`RegistryStore`."""

    #: How :meth:`transaction` begins: take SQLite's write lock at once (no upgrade deadlock).
    BEGIN = "BEGIN IMMEDIATE"
    #: Session rows per INSERT of :meth:`record_sessions` (5 parameters each: well under
    #: SQLite's 32766 and PostgreSQL's 65535 bound parameters).
    SESSION_ROWS_PER_STATEMENT = 200
    #: WAL pages after which a commit on the handshake-rate connection checkpoints (SQLite: 1000).
    FAST_CHECKPOINT_PAGES = 4000

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            private_file(Path(path))  # 0600 before SQLite opens it (its -wal/-shm follow the mode)
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.lock = threading.RLock()
        if path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # tokens and devices survive a power loss
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        # Sessions and seen nonces are written at handshake rate; on this second connection a
        # commit survives a process crash but not a power loss (WAL, synchronous=NORMAL).
        # Losing the newest of them on power loss only shortens replay memory within the
        # freshness window, which the timestamp check still bounds.
        if path == ":memory:":
            self.fast = self.db
        else:
            self.fast = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self.fast.execute("PRAGMA synchronous=NORMAL")
            # Session rows land on random pages of three indexes: a checkpoint every 16 MB of WAL
            # instead of every 4 MB writes each page back (and fsyncs) about 4x less often
            # (about 5 µs of a session row's 25-30 µs here).
            self.fast.execute(f"PRAGMA wal_autocheckpoint={self.FAST_CHECKPOINT_PAGES}")
        for conn in {self.db, self.fast}:
            conn.execute("PRAGMA secure_delete=ON")  # an erased session key leaves no page behind

    def _migrate(self) -> None:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = self.db.execute("SELECT version FROM schema_version").fetchone()
                current = row[0] if row else 0
                for version, sql in enumerate(MIGRATIONS[current:], start=current + 1):
                    for stmt in _statements(sql):
                        self.db.execute(stmt)
                    self.db.execute("DELETE FROM schema_version")
                    self.db.execute("INSERT INTO schema_version VALUES (?)", (version,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Statements on ``db`` inside commit together or not at all (e.g. a token's burn and
        the enrolment it pays for: a coordinator killed between them leaves neither)."""
        with self.lock:
            self.db.execute(self.BEGIN)
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def commit_group(self, steps: list[Callable[[], object]]) -> list[object]:
        """Run each step (statements on ``db``) in its own savepoint, all in one transaction.

        One commit, so one fsync, for the steps of many concurrent requests (group commit,
        coordinator/service.py: GroupCommit). A step that raises is undone alone and its
        exception is returned in its place; the others commit together or not at all.
        """
        out: list[object] = []
        with self.transaction():
            for i, step in enumerate(steps):
                self.db.execute(f"SAVEPOINT step{i}")
                try:
                    out.append(step())
                except Exception as exc:  # noqa: BLE001 - handed back to its own request
                    self.db.execute(f"ROLLBACK TO SAVEPOINT step{i}")
                    out.append(exc)
                self.db.execute(f"RELEASE SAVEPOINT step{i}")
        return out

    def close(self) -> None:
        if self.fast is not self.db:
            self.fast.close()
        self.db.close()

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT version FROM schema_version").fetchone()[0]

    # --- tokens --------------------------------------------------------------------------

    def create_token(self, device_id: str, ttl_seconds: float, now: float | None = None) -> str:
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.db.execute("INSERT INTO tokens VALUES (?,?,?,?,NULL,NULL)",
                            (token_hash(token), device_id, now, now + ttl_seconds))
        self.audit("operator", "token.created", device_id, expires_at=now + ttl_seconds)
        return token

    def list_tokens(self, include_used: bool = False) -> list[TokenRecord]:
        q = "SELECT * FROM tokens" + ("" if include_used else " WHERE used_at IS NULL AND revoked_at IS NULL")
        return [TokenRecord(*r) for r in self.db.execute(q + " ORDER BY created_at")]

    def revoke_token(self, token_or_hash_prefix: str, now: float | None = None) -> TokenRecord:
        now = time.time() if now is None else now
        h = token_hash(token_or_hash_prefix)
        with self.lock:
            rows = self.db.execute("SELECT * FROM tokens WHERE token_hash=? OR token_hash LIKE ?",
                                   (h, token_or_hash_prefix + "%") if len(token_or_hash_prefix) >= 8 else (h, h)
                                   ).fetchall()
            if len(rows) != 1:
                raise RegistryError("token_unknown", "no single token matches")
            self.db.execute("UPDATE tokens SET revoked_at=? WHERE token_hash=?", (now, rows[0][0]))
        self.audit("operator", "token.revoked", rows[0][1])
        return TokenRecord(*rows[0])

    def _why(self, h: str, device_id: str, now: float) -> str:
        row = self.db.execute("SELECT device_id, expires_at, used_at, revoked_at FROM tokens WHERE token_hash=?",
                              (h,)).fetchone()
        if row is None or row[3] is not None:
            return "token_unknown"  # a revoked token is as good as none
        if row[2] is not None:
            return "token_used"
        if row[1] <= now:
            return "token_expired"
        if row[0] != device_id:
            return "device_mismatch"
        return "ok"

    def check_token(self, token: str, device_id: str, now: float | None = None) -> str:
        """Would :meth:`consume_token` succeed? (No burn: checked before expensive crypto.)"""
        return self._why(token_hash(token), device_id, time.time() if now is None else now)

    def consume_token(self, token: str, device_id: str, now: float | None = None) -> str:
        """Check and burn in one statement: exactly one of racing callers gets ``ok``."""
        now = time.time() if now is None else now
        h = token_hash(token)
        with self.lock:
            cur = self.db.execute(
                "UPDATE tokens SET used_at=? WHERE token_hash=? AND used_at IS NULL AND revoked_at IS NULL "
                "AND expires_at>? AND device_id=?", (now, h, now, device_id))
            if cur.rowcount == 1:
                return "ok"
            return self._why(h, device_id, now)

    # --- devices -------------------------------------------------------------------------

    def enroll_device(self, device_id: str, sig_alg: str, sig_pk: bytes, kem_alg: str, kem_pk: bytes,
                      now: float | None = None) -> Device:
        import pqc

        now = time.time() if now is None else now
        with self.lock:
            existing = self.get_device(device_id)
            if existing is not None and existing.status == "revoked":
                raise RegistryError("revoked", device_id)
            self.db.execute(
                "INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?,NULL,NULL) ON CONFLICT(device_id) DO UPDATE SET "
                "sig_alg=excluded.sig_alg, sig_pk=excluded.sig_pk, sig_fp=excluded.sig_fp, kem_alg=excluded.kem_alg, "
                "kem_pk=excluded.kem_pk, kem_fp=excluded.kem_fp, enrolled_at=excluded.enrolled_at",
                (device_id, "active", sig_alg, sig_pk, pqc.fingerprint(sig_pk, sig_alg), kem_alg, kem_pk,
                 pqc.fingerprint(kem_pk, kem_alg), now))
            if existing is not None:  # re-enrolled: the old key's sessions end here
                self._end_sessions(device_id, now)
        self.audit("coordinator", "device.enrolled", device_id)
        return self.get_device(device_id)  # type: ignore[return-value]

    def get_device(self, device_id: str) -> Device | None:
        row = self.db.execute("SELECT * FROM devices WHERE device_id=?", (device_id,)).fetchone()
        return Device(*row) if row else None

    def set_device_auth(self, device_id: str, sig_fp: str, wrapped_key: bytes) -> None:
        """Keep the device's kem-v3 MAC key (wrapped: coordinator/session_keys.py) for the
        signature key ``sig_fp``; it replaces any earlier one."""
        with self.lock:
            self.db.execute("INSERT INTO device_auth VALUES (?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
                            "sig_fp=excluded.sig_fp, wrapped_key=excluded.wrapped_key",
                            (device_id, sig_fp, wrapped_key))

    def get_device_auth(self, device_id: str) -> tuple[Device, bytes | None] | None:
        """The device and its wrapped kem-v3 key, in one statement; the key is None unless it
        was kept for the device's current signature key (a key rotation leaves it behind)."""
        found = self.session_inputs(device_id, "")
        return None if found is None else found[:2]

    def session_inputs(self, device_id: str, meta_key: str) -> tuple[Device, bytes | None, bytes | None] | None:
        """:meth:`get_device_auth` and the meta value ``meta_key`` (the admitted enclave's
        report, for a kem-v3 session's grant) in one statement: one registry read a session."""
        row = self.db.execute("SELECT d.*, a.wrapped_key, (SELECT value FROM meta WHERE key=?) FROM devices d "
                              "LEFT JOIN device_auth a ON a.device_id=d.device_id AND a.sig_fp=d.sig_fp "
                              "WHERE d.device_id=?", (meta_key, device_id)).fetchone()
        if row is None:
            return None
        return Device(*row[:-2]), *(bytes(v) if v is not None else None for v in row[-2:])

    def device_auth_rows(self) -> list[tuple[str, str, bytes]]:
        """Every kept ``(device_id, sig_fp, wrapped key)``: a coordinator key rotation re-wraps them."""
        return [(r[0], r[1], bytes(r[2])) for r in self.db.execute("SELECT * FROM device_auth ORDER BY device_id")]

    def list_devices(self, status: str | None = None) -> list[Device]:
        q, args = "SELECT * FROM devices", ()
        if status:
            q, args = q + " WHERE status=?", (status,)
        return [Device(*r) for r in self.db.execute(q + " ORDER BY device_id", args)]

    def revoke_device(self, device_id: str, reason: str, now: float | None = None) -> Device:
        now = time.time() if now is None else now
        with self.lock:
            if self.get_device(device_id) is None:
                raise KeyError(device_id)
            self.db.execute("UPDATE devices SET status='revoked', revoked_at=COALESCE(revoked_at, ?) "
                            "WHERE device_id=?", (now, device_id))
            self._end_sessions(device_id, now)
        self.audit("operator", "device.revoked", device_id, reason=reason)
        return self.get_device(device_id)  # type: ignore[return-value]

    def _end_sessions(self, device_id: str, now: float) -> None:
        self.db.execute("UPDATE sessions SET not_after=? WHERE device_id=? AND not_after>?", (now, device_id, now))

    def rotate_device_keys(self, device_id: str, sig_alg: str, sig_pk: bytes, kem_alg: str, kem_pk: bytes,
                           now: float | None = None) -> Device:
        import pqc

        now = time.time() if now is None else now
        with self.lock:
            cur = self.db.execute(
                "UPDATE devices SET sig_alg=?, sig_pk=?, sig_fp=?, kem_alg=?, kem_pk=?, kem_fp=?, rotated_at=? "
                "WHERE device_id=? AND status='active'",
                (sig_alg, sig_pk, pqc.fingerprint(sig_pk, sig_alg), kem_alg, kem_pk, pqc.fingerprint(kem_pk, kem_alg),
                 now, device_id))
            if cur.rowcount != 1:
                raise RegistryError("revoked", device_id)
            self._end_sessions(device_id, now)  # the rotated-out key's sessions end with it
        self.audit("device", "device.rotated", device_id)
        return self.get_device(device_id)  # type: ignore[return-value]

    # --- sessions and nonces -------------------------------------------------------------

    def record_session(self, session_id: str, device_id: str, not_after: float, now: float | None = None,
                       wrapped_key: bytes | None = None) -> bool:
        """Keep a new session; False (and nothing changed) when ``session_id`` exists already:
        handshake kem-v2 derives the id from the request's nonce, so this is its replay check."""
        now = time.time() if now is None else now
        with self.lock:
            cur = self.fast.execute("INSERT INTO sessions VALUES (?,?,?,?,?,0) ON CONFLICT DO NOTHING",
                                    (session_id, device_id, now, not_after, wrapped_key))
            if secrets.randbelow(64) == 0:  # now and then: expired sessions' keys are forgotten
                self.forget_expired_session_keys(now)
            return cur.rowcount == 1

    def record_sessions(self, rows: list[tuple[str, str, float, float, bytes | None]]) -> list[bool]:
        """:meth:`record_session` for many ``(session_id, device_id, not_after, now, wrapped_key)``
        rows in one transaction (one commit instead of one per session: coordinator/service.py,
        SessionRows); each row's own outcome, False for an id kept already (a replay)."""
        if not rows:
            return []
        new: set[str] = set()
        with self.lock:
            self.fast.execute("BEGIN")
            try:
                for i in range(0, len(rows), self.SESSION_ROWS_PER_STATEMENT):  # one statement per chunk
                    chunk = rows[i:i + self.SESSION_ROWS_PER_STATEMENT]
                    args = [v for sid, dev, not_after, now, key in chunk for v in (sid, dev, now, not_after, key)]
                    cur = self.fast.execute("INSERT INTO sessions VALUES " + ",".join(["(?,?,?,?,?,0)"] * len(chunk))
                                            + " ON CONFLICT DO NOTHING RETURNING session_id", args)
                    new.update(r[0] for r in cur.fetchall())
                self.fast.execute("COMMIT")
            except BaseException:
                self.fast.execute("ROLLBACK")
                raise
            if secrets.randbelow(64) < len(rows):  # as often per session as record_session does
                self.forget_expired_session_keys(rows[-1][3])
        out: list[bool] = []
        for sid, *_ in rows:  # a second row with one id (a replay within the batch) is not new
            out.append(sid in new)
            new.discard(sid)
        return out

    def forget_expired_session_keys(self, now: float | None = None) -> int:
        """Erase the wrapped keys of expired (and revoked) sessions: forward secrecy for them
        even against a later theft of the coordinator's keys and the registry together."""
        now = time.time() if now is None else now
        with self.lock:
            return self.fast.execute("UPDATE sessions SET wrapped_key=NULL WHERE not_after<? AND wrapped_key IS NOT NULL",
                                     (now,)).rowcount

    def advance_session(self, session_id: str, seq: int) -> bool:
        """Accept call ``seq`` of a session once: one conditional UPDATE, so of two coordinators
        handed the same call (a replay, a redelivery) exactly one answers it."""
        with self.lock:
            cur = self.fast.execute("UPDATE sessions SET last_seq=? WHERE session_id=? AND last_seq<?",
                                    (seq, session_id, seq))
            return cur.rowcount == 1

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self.db.execute("SELECT * FROM sessions WHERE session_id=?", (session_id,)).fetchone()
        return SessionRecord(*row) if row else None

    def session_active(self, session_id: str, now: float | None = None) -> bool:
        s = self.get_session(session_id)
        return s is not None and (time.time() if now is None else now) < s.not_after

    def remember_nonce(self, nonce: bytes, now: float | None = None, window_seconds: float = 300) -> bool:
        """False if ``nonce`` was seen within the window (a replay); prunes older nonces."""
        now = time.time() if now is None else now
        with self.lock:
            self.fast.execute("BEGIN")
            try:
                new = self._note_nonce(self.fast, nonce, now, window_seconds)
                self.fast.execute("COMMIT")
            except BaseException:
                self.fast.execute("ROLLBACK")
                raise
            return new

    def remember_nonce_in_step(self, nonce: bytes, now: float | None = None, window_seconds: float = 300) -> bool:
        """:meth:`remember_nonce` inside the caller's transaction on ``db`` (a step of
        :meth:`commit_group`): the nonce is kept exactly when the step commits, with no
        commit of its own (an enrolment's claim nonce, with the token burn it goes with)."""
        with self.lock:
            return self._note_nonce(self.db, nonce, time.time() if now is None else now, window_seconds)

    @staticmethod
    def _note_nonce(conn, nonce: bytes, now: float, window_seconds: float) -> bool:
        if secrets.randbelow(64) == 0:  # prune now and then, not on every handshake
            conn.execute("DELETE FROM seen_nonces WHERE seen_at < ?", (now - window_seconds,))
        cur = conn.execute("INSERT INTO seen_nonces VALUES (?,?) ON CONFLICT DO NOTHING", (nonce.hex(), now))
        return cur.rowcount == 1

    # --- rounds ----------------------------------------------------------------------------

    def record_round_opened(self, round_id: int, deadline: float, min_updates: int, expected: int,
                            now: float | None = None) -> None:
        """A round the plan opened (again, after a restart: the record is kept as it was)."""
        now = time.time() if now is None else now
        with self.lock:
            self.db.execute("INSERT INTO rounds(round_id, status, opened_at, deadline, min_updates, expected)"
                            " VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                            (round_id, "open", now, deadline, min_updates, expected))

    def record_round_closed(self, round_id: int, status: str, *, accepted: int | None = None,
                            rejected: dict[str, int] | None = None, accuracy: float | None = None,
                            version: int | None = None, reason: str | None = None,
                            now: float | None = None) -> bool:
        """Record how an open round ended; False if it was not open (the first word stays)."""
        now = time.time() if now is None else now
        with self.lock:
            cur = self.db.execute(
                "UPDATE rounds SET status=?, closed_at=?, accepted=?, rejected=?, accuracy=?, version=?, reason=? "
                "WHERE round_id=? AND status='open'",
                (status, now, accepted, json.dumps(rejected or {}), accuracy, version, reason, round_id))
            return cur.rowcount == 1

    def list_rounds(self, limit: int = 20) -> list[RoundRecord]:
        rows = self.db.execute("SELECT * FROM rounds ORDER BY round_id DESC LIMIT ?", (limit,)).fetchall()
        return [RoundRecord.from_row(r) for r in rows]

    def get_round(self, round_id: int) -> RoundRecord | None:
        row = self.db.execute("SELECT * FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        return RoundRecord.from_row(row) if row else None

    # --- audit and meta ------------------------------------------------------------------

    def audit(self, actor: str, action: str, device_id: str | None = None, **detail: object) -> None:
        with self.lock:
            self.db.execute("INSERT INTO audit(at, actor, action, device_id, detail) VALUES (?,?,?,?,?)",
                            (time.time(), actor, action, device_id, json.dumps(detail, default=str)))

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        rows = self.db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def set_meta(self, key: str, value: bytes) -> None:
        with self.lock:
            self.db.execute("INSERT INTO meta VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                            (key, value))

    def get_meta(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def claim_identity(self, namespace: str, fingerprint: str) -> str:
        """Record ``fingerprint`` as the coordinator identity of ``namespace`` unless one is
        recorded already; the one recorded (the first claimant's, in one statement)."""
        key = identity_meta_key(namespace)
        with self.lock:
            self.db.execute("INSERT INTO meta VALUES (?,?) ON CONFLICT DO NOTHING", (key, fingerprint.encode()))
        return (self.get_meta(key) or b"").decode()

    def claim_lease(self, name: str, holder: str, ttl_seconds: float, now: float | None = None) -> bool:
        """Take or renew the lease ``name`` for ``holder`` (one statement: of coordinators
        claiming together, one gets it); False while another holds it unexpired."""
        now = time.time() if now is None else now
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO leases VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, "
                "expires_at=excluded.expires_at WHERE leases.holder=excluded.holder OR leases.expires_at<?",
                (name, holder, now + ttl_seconds, now))
            return cur.rowcount == 1

    def release_lease(self, name: str, holder: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM leases WHERE name=? AND holder=?", (name, holder))

    def describe(self) -> str:
        """Where the registry lives, for logs (never a password)."""
        return self.path


def identity_meta_key(namespace: str) -> str:
    """The meta key holding the fingerprint of ``namespace``'s coordinator identity."""
    return f"coordinator_identity:{namespace}"


def open_registry(settings: Settings) -> Registry:
    """The registry ``settings`` select: PostgreSQL for a ``registry_url``, else the SQLite file."""
    if settings.registry_url:
        from coordinator.registry_pg import PgRegistry

        return PgRegistry(settings.registry_url)
    if not settings.registry_file.parent.exists():
        private_dir(settings.registry_file.parent)
    return Registry(str(settings.registry_file))


def _statements(sql: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    out, buf = [], []
    for line in sql.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.upper().endswith("END;")):
            out.append(text)
            buf = []
    return out
