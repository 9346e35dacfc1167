"""The registry in PostgreSQL, for several coordinators (and hosts) sharing one registry.

Same interface, same statements and same rules as the SQLite store (it subclasses it): only
the connection, the schema's types and the migrations' locking differ. Tokens are stored as
hashes, the burn is one conditional UPDATE (row locks make exactly one of racing
coordinators win), and the audit table refuses UPDATE and DELETE by trigger, in the database
itself. Migrations run under an advisory lock, so coordinators starting together migrate once.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit, urlunsplit

import psycopg

from coordinator.registry import Registry

#: PostgreSQL's text of :data:`coordinator.registry.MIGRATIONS`, version for version.
PG_MIGRATIONS: list[str] = [
    """
    CREATE TABLE devices (
      device_id TEXT PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
      sig_alg TEXT NOT NULL, sig_pk BYTEA NOT NULL, sig_fp TEXT NOT NULL,
      kem_alg TEXT NOT NULL, kem_pk BYTEA NOT NULL, kem_fp TEXT NOT NULL,
      enrolled_at DOUBLE PRECISION NOT NULL, rotated_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION);
    CREATE TABLE tokens (
      token_hash TEXT PRIMARY KEY, device_id TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
      expires_at DOUBLE PRECISION NOT NULL, used_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION);
    CREATE TABLE sessions (
      session_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, opened_at DOUBLE PRECISION NOT NULL,
      not_after DOUBLE PRECISION NOT NULL);
    CREATE INDEX sessions_device ON sessions(device_id);
    CREATE TABLE seen_nonces (nonce TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL);
    CREATE INDEX seen_nonces_at ON seen_nonces(seen_at);
    CREATE TABLE audit (
      id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
      action TEXT NOT NULL, device_id TEXT, detail TEXT NOT NULL);
    CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN RAISE EXCEPTION 'audit is append-only'; END $$;
    CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
      FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
      FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
    """,
    """
    CREATE TABLE rounds (
      round_id BIGINT PRIMARY KEY, status TEXT NOT NULL, opened_at DOUBLE PRECISION NOT NULL,
      deadline DOUBLE PRECISION NOT NULL, min_updates INTEGER NOT NULL, expected INTEGER NOT NULL,
      closed_at DOUBLE PRECISION, accepted INTEGER, rejected TEXT NOT NULL DEFAULT '{}',
      accuracy DOUBLE PRECISION, version BIGINT, reason TEXT);
    """,
    """
    ALTER TABLE sessions ADD COLUMN wrapped_key BYTEA;
    ALTER TABLE sessions ADD COLUMN last_seq BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL);
    """,
    """
    CREATE TABLE device_auth (device_id TEXT PRIMARY KEY, sig_fp TEXT NOT NULL, wrapped_key BYTEA NOT NULL);
    CREATE INDEX sessions_key_expiry ON sessions(not_after) WHERE wrapped_key IS NOT NULL;
    """,
]
#: pg_advisory_xact_lock key held while migrating (any constant of our own).
MIGRATION_LOCK = 0x51F1A2E


class _Connection:
    """A psycopg connection that takes the registry's ``?`` placeholders (autocommit, as the
    SQLite store runs: each statement commits, explicit BEGIN/COMMIT where one is needed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, args: tuple | list = ()) -> psycopg.Cursor:
        if self.conn.broken:
            # The server restarted or dropped us: the statement that saw it failed (its request
            # was refused, never half-applied twice); connect again for this one. Never inside
            # an explicit transaction: it died with the connection, so BEGIN must come first.
            if sql not in ("COMMIT", "ROLLBACK"):
                self.conn = psycopg.connect(self.url, autocommit=True)
        return self.conn.execute(sql.replace("?", "%s"), tuple(args))  # type: ignore[arg-type]

    def close(self) -> None:
        self.conn.close()


class PgRegistry(Registry):
    """PostgreSQL implementation of :class:`coordinator.registry.RegistryStore`."""

    BEGIN = "BEGIN"  # READ COMMITTED: a racing burn waits on the row lock, then finds it used

    def __init__(self, url: str) -> None:
        self.path = redact(url)
        self.db = _Connection(url)
        self.fast = self.db  # one durable connection: PostgreSQL's commit is already cheap enough
        self.lock = threading.RLock()
        self._migrate()

    def _migrate(self) -> None:
        with self.lock, self.db.conn.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self.db.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            for version, sql in enumerate(PG_MIGRATIONS[current:], start=current + 1):
                self.db.conn.execute(sql)  # type: ignore[arg-type]  (several statements: no parameters)
                self.db.execute("DELETE FROM schema_version")
                self.db.execute("INSERT INTO schema_version VALUES (?)", (version,))


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
