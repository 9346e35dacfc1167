"""The registry on its own: tokens, devices, nonces, audit, migrations (SQLite files)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from coordinator.registry import MIGRATIONS, Registry, RegistryError
from pqc.identity import Identity

IDENT = Identity.generate("ML-DSA-44", "ML-KEM-768")


def enroll(reg: Registry, device_id: str):
    return reg.enroll_device(device_id, IDENT.sig_alg, IDENT.sig_pk, IDENT.kem_alg, IDENT.kem_pk)


def test_only_the_token_hash_is_stored(tmp_path):
    path = tmp_path / "r.sqlite3"
    reg = Registry(str(path))
    token = reg.create_token("d1", 60)
    reg.close()
    assert token.encode() not in path.read_bytes()
    for wal in tmp_path.glob("*-wal"):
        assert token.encode() not in wal.read_bytes()


def test_every_token_outcome(tmp_path):
    reg = Registry(str(tmp_path / "r.sqlite3"))
    t = reg.create_token("d1", 60, now=1000.0)
    assert reg.check_token("nope", "d1", now=1001.0) == "token_unknown"
    assert reg.check_token(t, "d2", now=1001.0) == "device_mismatch"
    assert reg.check_token(t, "d1", now=1061.0) == "token_expired"
    assert reg.consume_token(t, "d1", now=1001.0) == "ok"
    assert reg.consume_token(t, "d1", now=1002.0) == "token_used"
    revoked = reg.create_token("d3", 60)
    reg.revoke_token(revoked)
    assert reg.check_token(revoked, "d3") == "token_unknown"


def test_one_token_wins_exactly_once_across_connections(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    token = Registry(path).create_token("d1", 60)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        reg = Registry(path)  # each thread its own connection, as separate coordinators would
        barrier.wait()
        outcomes.append(reg.consume_token(token, "d1"))
        reg.close()

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["token_used"] * 7


def test_state_survives_reopening_and_migrations_are_idempotent(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    reg = Registry(path)
    token = reg.create_token("d1", 60)
    enroll(reg, "d0")
    reg.close()
    reg = Registry(path)
    assert reg.schema_version == len(MIGRATIONS)
    assert reg.get_device("d0").sig_fp == IDENT.sig_fp
    assert reg.consume_token(token, "d1") == "ok"


def test_revoked_device_cannot_enroll_and_its_sessions_end(tmp_path):
    reg = Registry(str(tmp_path / "r.sqlite3"))
    enroll(reg, "d1")
    reg.record_session("s" * 16, "d1", not_after=10**10)
    assert reg.session_active("s" * 16)
    reg.revoke_device("d1", "stolen")
    assert not reg.session_active("s" * 16)
    with pytest.raises(RegistryError):
        enroll(reg, "d1")
    with pytest.raises(RegistryError):
        reg.rotate_device_keys("d1", IDENT.sig_alg, IDENT.sig_pk, IDENT.kem_alg, IDENT.kem_pk)
    with pytest.raises(KeyError):
        reg.revoke_device("ghost", "x")


def test_rotation_replaces_keys_and_records_when(tmp_path):
    reg = Registry(str(tmp_path / "r.sqlite3"))
    enroll(reg, "d1")
    new = Identity.generate("ML-DSA-44", "ML-KEM-768")
    dev = reg.rotate_device_keys("d1", new.sig_alg, new.sig_pk, new.kem_alg, new.kem_pk, now=5.0)
    assert dev.sig_fp == new.sig_fp and dev.rotated_at == 5.0


def test_nonces_are_remembered_within_the_window(tmp_path):
    reg = Registry(str(tmp_path / "r.sqlite3"))
    assert reg.remember_nonce(b"n" * 32, now=100.0)
    assert not reg.remember_nonce(b"n" * 32, now=101.0)  # a replay


def test_audit_log_is_append_only(tmp_path):
    reg = Registry(str(tmp_path / "r.sqlite3"))
    reg.audit("operator", "something", "d1", why="test")
    assert reg.audit_log(1)[0].detail == {"why": "test"}
    for sql in ("DELETE FROM audit", "UPDATE audit SET action='x'"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            reg.db.execute(sql)


def test_rounds_are_recorded_and_their_first_outcome_stays(tmp_path):
    reg = Registry(str(tmp_path / "r.sqlite3"))
    reg.record_round_opened(1, deadline=100.0, min_updates=2, expected=3, now=10.0)
    reg.record_round_opened(1, deadline=999.0, min_updates=9, expected=9)  # reopened after a restart
    assert reg.record_round_closed(1, "completed", accepted=3, rejected={"norm_bound": 1}, accuracy=0.9, version=1)
    assert not reg.record_round_closed(1, "cancelled")
    r = reg.get_round(1)
    assert (r.status, r.deadline, r.accepted, r.rejected, r.version) == ("completed", 100.0, 3, {"norm_bound": 1}, 1)
    reg.record_round_opened(2, deadline=200.0, min_updates=2, expected=0)
    assert [x.round_id for x in reg.list_rounds(5)] == [2, 1] and reg.get_round(3) is None
