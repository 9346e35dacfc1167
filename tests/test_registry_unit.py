"""The registry on its own: tokens, devices, nonces, audit, migrations, sessions; every test
runs against both stores, the SQLite file and PostgreSQL (a database of the test's own)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from coordinator.registry import MIGRATIONS, Registry, RegistryError, token_hash
from coordinator.registry_pg import PG_MIGRATIONS, PgRegistry
from pqc.identity import Identity

IDENT = Identity.generate("ML-DSA-44", "ML-KEM-768")


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path) -> Callable[[], Registry]:
    """Opens a new connection to this test's registry (each call one more, as another
    coordinator process would hold); closed at the end."""
    if request.param == "sqlite":
        target = str(tmp_path / "r.sqlite3")
        make = lambda: Registry(target)
    else:
        url = request.getfixturevalue("pg_url")
        make = lambda: PgRegistry(url)
    opened: list[Registry] = []

    def open_() -> Registry:
        opened.append(make())
        return opened[-1]

    yield open_
    for reg in opened:
        reg.close()


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


def test_only_the_token_hash_is_stored_in_postgresql(pg_url):
    reg = PgRegistry(pg_url)
    token = reg.create_token("d1", 60)
    dump = repr(reg.db.execute("SELECT * FROM tokens").fetchall()) + repr(reg.audit_log())
    reg.close()
    assert token not in dump and token_hash(token) in dump


def test_every_token_outcome(open_store):
    reg = open_store()
    t = reg.create_token("d1", 60, now=1000.0)
    assert reg.check_token("nope", "d1", now=1001.0) == "token_unknown"
    assert reg.check_token(t, "d2", now=1001.0) == "device_mismatch"
    assert reg.check_token(t, "d1", now=1061.0) == "token_expired"
    assert reg.consume_token(t, "d1", now=1001.0) == "ok"
    assert reg.consume_token(t, "d1", now=1002.0) == "token_used"
    revoked = reg.create_token("d3", 60)
    reg.revoke_token(revoked)
    assert reg.check_token(revoked, "d3") == "token_unknown"
    assert [x.device_id for x in reg.list_tokens(include_used=True)] == ["d1", "d3"]


def test_one_token_wins_exactly_once_across_connections(open_store):
    token = open_store().create_token("d1", 60)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)
    stores = [open_store() for _ in range(8)]  # each its own connection, as separate coordinators

    def race(reg: Registry) -> None:
        barrier.wait()
        outcomes.append(reg.consume_token(token, "d1"))

    threads = [threading.Thread(target=race, args=(reg,)) for reg in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["token_used"] * 7


def test_state_survives_reopening_and_migrations_are_idempotent(open_store):
    reg = open_store()
    token = reg.create_token("d1", 60)
    enroll(reg, "d0")
    reg.close()
    reg = open_store()
    assert reg.schema_version == len(MIGRATIONS) == len(PG_MIGRATIONS)
    assert reg.get_device("d0").sig_fp == IDENT.sig_fp
    assert reg.get_device("d0").sig_pk == IDENT.sig_pk
    assert reg.consume_token(token, "d1") == "ok"


def test_revoked_device_cannot_enroll_and_its_sessions_end(open_store):
    reg = open_store()
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
    assert [d.device_id for d in reg.list_devices("revoked")] == ["d1"]


def test_rotation_replaces_keys_and_records_when(open_store):
    reg = open_store()
    enroll(reg, "d1")
    new = Identity.generate("ML-DSA-44", "ML-KEM-768")
    dev = reg.rotate_device_keys("d1", new.sig_alg, new.sig_pk, new.kem_alg, new.kem_pk, now=5.0)
    assert dev.sig_fp == new.sig_fp and dev.rotated_at == 5.0


def test_nonces_are_remembered_within_the_window(open_store):
    reg, other = open_store(), open_store()
    assert reg.remember_nonce(b"n" * 32, now=100.0)
    assert not reg.remember_nonce(b"n" * 32, now=101.0)  # a replay
    assert not other.remember_nonce(b"n" * 32, now=102.0)  # a replay to another coordinator


def test_sessions_are_shared_and_each_call_is_accepted_once(open_store):
    reg, other = open_store(), open_store()
    reg.record_session("s1", "d1", not_after=10**10, wrapped_key=b"k" * 60)
    seen = other.get_session("s1")
    assert seen.wrapped_key == b"k" * 60 and seen.last_seq == 0 and seen.device_id == "d1"
    assert other.advance_session("s1", 1)
    assert not reg.advance_session("s1", 1)  # the same call through another coordinator: refused
    assert not reg.advance_session("s1", 0)
    assert reg.advance_session("s1", 5) and other.get_session("s1").last_seq == 5
    assert not reg.advance_session("ghost", 1)


def test_one_coordinator_identity_per_namespace(open_store):
    reg, other = open_store(), open_store()
    assert reg.claim_identity("ns1", "a" * 64) == "a" * 64
    assert other.claim_identity("ns1", "b" * 64) == "a" * 64  # the first claim stays
    assert other.claim_identity("ns2", "b" * 64) == "b" * 64


def test_audit_log_is_append_only(open_store):
    reg = open_store()
    reg.audit("operator", "something", "d1", why="test")
    assert reg.audit_log(1)[0].detail == {"why": "test"}
    statements = ["DELETE FROM audit", "UPDATE audit SET action='x'"]
    if isinstance(reg, PgRegistry):
        statements.append("TRUNCATE audit")
    for sql in statements:
        with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
            reg.db.execute(sql)
    assert [e.action for e in reg.audit_log()] == ["something"]


def test_rounds_are_recorded_and_their_first_outcome_stays(open_store):
    reg = open_store()
    reg.record_round_opened(1, deadline=100.0, min_updates=2, expected=3, now=10.0)
    reg.record_round_opened(1, deadline=999.0, min_updates=9, expected=9)  # reopened after a restart
    assert reg.record_round_closed(1, "completed", accepted=3, rejected={"norm_bound": 1}, accuracy=0.9, version=1)
    assert not reg.record_round_closed(1, "cancelled")
    r = reg.get_round(1)
    assert (r.status, r.deadline, r.accepted, r.rejected, r.version) == ("completed", 100.0, 3, {"norm_bound": 1}, 1)
    reg.record_round_opened(2, deadline=200.0, min_updates=2, expected=0)
    assert [x.round_id for x in reg.list_rounds(5)] == [2, 1] and reg.get_round(3) is None


def test_meta_round_trips_bytes(open_store):
    reg = open_store()
    reg.set_meta("k", b"\x00\xffv1")
    reg.set_meta("k", b"v2")
    assert reg.get_meta("k") == b"v2" and reg.get_meta("none") is None


def test_a_lease_has_one_holder_until_it_expires(open_store):
    reg, other = open_store(), open_store()
    assert reg.claim_lease("rounds", "a", 10, now=100.0)
    assert not other.claim_lease("rounds", "b", 10, now=105.0)
    assert reg.claim_lease("rounds", "a", 10, now=108.0)  # renewed until 118
    assert not other.claim_lease("rounds", "b", 10, now=115.0)
    assert other.claim_lease("rounds", "b", 10, now=119.0)  # a stopped renewing: b takes over
    reg.release_lease("rounds", "a")  # not a's any more: no effect
    assert not reg.claim_lease("rounds", "a", 10, now=120.0)
    other.release_lease("rounds", "b")
    assert reg.claim_lease("rounds", "a", 10, now=121.0)


def test_expired_sessions_forget_their_keys(open_store):
    reg = open_store()
    reg.record_session("old", "d1", not_after=100.0, now=50.0, wrapped_key=b"k" * 60)
    # now=50 too: record_session now and then forgets expired keys itself (at its ``now``), which
    # at the real time would erase "old" first and make the count below 0 one run in 64
    reg.record_session("new", "d1", not_after=10**10, now=50.0, wrapped_key=b"n" * 60)
    assert reg.forget_expired_session_keys(now=200.0) == 1
    assert reg.get_session("old").wrapped_key is None and reg.get_session("new").wrapped_key == b"n" * 60


def test_the_postgresql_store_connects_again_after_losing_its_connection(pg_url, pg_admin_url):
    reg = PgRegistry(pg_url)
    token = reg.create_token("d1", 60)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:  # as a server restart would
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s AND pid<>pg_backend_pid()",
                      (pg_url.rsplit("/", 1)[1],))
    with pytest.raises(psycopg.OperationalError):
        reg.check_token(token, "d1")  # the statement that finds the connection gone fails ...
    assert reg.consume_token(token, "d1") == "ok"  # ... the next one runs on a new connection
    reg.close()


def test_a_commit_group_keeps_each_steps_outcome(open_store):
    """Group commit (coordinator/service.py: GroupCommit): steps share one commit, a step that
    raises is undone alone, and a token raced inside one group still burns exactly once."""
    reg = open_store()
    a, b = reg.create_token("dev-a", 600), reg.create_token("dev-b", 600)
    ident = Identity.generate("ML-DSA-44", "ML-KEM-768")

    def burn(token: str, device_id: str):
        def step():
            outcome = reg.consume_token(token, device_id)
            if outcome != "ok":
                raise RegistryError(outcome, device_id)
            return reg.enroll_device(device_id, ident.sig_alg, ident.sig_pk, ident.kem_alg, ident.kem_pk)
        return step

    def half_then_fail():
        reg.enroll_device("dev-x", ident.sig_alg, ident.sig_pk, ident.kem_alg, ident.kem_pk)
        raise RuntimeError("after a write")

    out = reg.commit_group([burn(a, "dev-a"), half_then_fail, burn(a, "dev-a"), burn(b, "dev-b")])
    assert out[0].device_id == "dev-a" and out[3].device_id == "dev-b"
    assert isinstance(out[1], RuntimeError) and reg.get_device("dev-x") is None  # its write undone
    assert isinstance(out[2], RegistryError) and out[2].reason == "token_used"
    assert reg.get_device("dev-a") is not None and reg.check_token(b, "dev-b") == "token_used"


def test_session_rows_commit_together_and_a_replayed_id_is_refused(open_store):
    """The session batch (coordinator/service.py: session_rows): one transaction, each row's
    own outcome; an id kept already, in the batch or before it, is refused (kem replay)."""
    reg, other = open_store(), open_store()
    enroll(reg, "d1")
    now = time.time()
    rows = [("s-a", "d1", now + 60, now, b"k1"), ("s-b", "d1", now + 60, now, b"k2"), ("s-a", "d1", now + 60, now, b"k3")]
    assert reg.record_sessions(rows) == [True, True, False]
    assert other.get_session("s-a").wrapped_key == b"k1" and other.get_session("s-b") is not None
    assert other.record_sessions([("s-b", "d1", now + 60, now, None)]) == [False]
    assert reg.record_sessions([]) == []


def test_a_device_auth_key_is_bound_to_its_signature_key(open_store):
    """kem-v3's wrapped MAC key is served only for the signature key it was enrolled with: a
    key rotation (or a re-enrolment with other keys) leaves it behind."""
    reg, other = open_store(), open_store()
    dev = enroll(reg, "d1")
    assert reg.get_device_auth("d1") == (dev, None)
    assert reg.get_device_auth("ghost") is None
    reg.set_meta("m", b"report")  # a session's reads, the enclave report with them, in one statement
    assert reg.session_inputs("d1", "m") == (dev, None, b"report")
    assert reg.session_inputs("d1", "none") == (dev, None, None) and reg.session_inputs("ghost", "m") is None
    reg.set_device_auth("d1", dev.sig_fp, b"wrapped-1")
    assert other.get_device_auth("d1") == (dev, b"wrapped-1")
    reg.set_device_auth("d1", dev.sig_fp, b"wrapped-2")  # a new enrolment's key replaces it
    assert other.device_auth_rows() == [("d1", dev.sig_fp, b"wrapped-2")]
    new = Identity.generate("ML-DSA-44", "ML-KEM-768")
    rotated = reg.rotate_device_keys("d1", new.sig_alg, new.sig_pk, new.kem_alg, new.kem_pk)
    assert other.get_device_auth("d1") == (rotated, None)


def test_an_enrolment_nonce_replayed_with_another_token_is_refused_and_burns_nothing(open_store):
    """The claim's nonce is kept in the enrolment's own step (coordinator/service.py:
    burn_and_enroll): a second claim with the same nonce, in the same group or later, is a
    replay, and its refused step leaves its token unburnt; the first nonce stays kept."""
    reg = open_store()
    a, b, c = (reg.create_token(d, 600) for d in ("dev-a", "dev-b", "dev-c"))
    nonce = b"n" * 32

    def claim(token: str, device_id: str):
        def step():
            if not reg.remember_nonce_in_step(nonce, window_seconds=600):
                raise RegistryError("replay", device_id)
            if reg.consume_token(token, device_id) != "ok":
                raise RegistryError("token_used", device_id)
            return enroll(reg, device_id)
        return step

    out = reg.commit_group([claim(a, "dev-a"), claim(b, "dev-b")])
    assert out[0].device_id == "dev-a"
    assert isinstance(out[1], RegistryError) and out[1].reason == "replay"
    assert reg.check_token(b, "dev-b") == "ok" and reg.get_device("dev-b") is None
    later = reg.commit_group([claim(c, "dev-c")])  # a later group, another connection's view too
    assert isinstance(later[0], RegistryError) and later[0].reason == "replay"
    assert not open_store().remember_nonce(nonce)  # the kept nonce is every coordinator's

