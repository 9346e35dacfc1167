"""State at rest (issue 8 item 9): private modes, segments deleted at close, the platform key apart."""

from __future__ import annotations

import logging
import os
import stat
import time

import numpy as np
import pytest

from common.attestation import platform_dir
from enclave_worker.service import Enclave
from enclave_worker.store import EnclaveStore
from schemas.messages import RoundOpen, RoundSpec
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enclave, enrolled


def _modes(root) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        out[dirpath] = stat.S_IMODE(os.stat(dirpath).st_mode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[p] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def _loose(root) -> dict[str, str]:
    """Every path under ``root`` that another user of the host could enter or read."""
    return {p: oct(m) for p, m in _modes(root).items() if m & 0o077}


@pytest.mark.broker
async def test_other_users_cannot_read_the_registry_models_or_decrypted_deltas(broker, settings):
    """The attack: decrypted deltas, models and the registry were 0644 under a 0755 state
    directory, and the simulated platform key that unseals the enclave keys lay beside them."""
    from tests.test_rounds import honest_update

    old = os.umask(0o022)  # the usual umask: files would be world-readable unless made private
    try:
        async with coordinator(settings) as coord, enclave(settings) as enc:
            events = await EventLog.bind(broker, "round.*", "update.accepted")
            devs = [await enrolled(broker, coord, f"d{i}") for i in range(2)]
            spec = RoundSpec(round_id=1, deadline=time.time() + 60, min_updates=2, expected=["d0", "d1"],
                             epochs=1, lr=0.1, batch_size=16)
            await broker.publisher.publish(broker.names.control_exchange, "enclave",
                                           coord._sign(RoundOpen(spec=spec, issued_at=time.time())))
            await events.wait("round.opened")
            _, key, body = honest_update(devs[0], enc, 1, 0)
            await broker.publisher.publish(broker.names.updates_exchange, key, body)
            await events.wait("update.accepted")
            segment = settings.state_dir / "enclave" / "rounds" / "1.f32"
            assert segment.exists() and stat.S_IMODE(segment.stat().st_mode) == 0o600
            assert _loose(settings.state_dir) == {}  # mid-round: deltas on disk, but private
            _, key, body = honest_update(devs[1], enc, 1, 1)
            await broker.publisher.publish(broker.names.updates_exchange, key, body)
            await events.wait("round.completed")
            await wait_for(lambda: not segment.exists())  # closed and recorded: the deltas go
            assert enc.store.round_status(1) == "completed"
    finally:
        os.umask(old)
    assert _loose(settings.state_dir) == {}
    names = {os.path.basename(p) for p in _modes(settings.state_dir)}
    assert {"registry.sqlite3", "enclave.sqlite3", "sig.key", "kem.key"} <= names
    # the platform key is kept apart from every service's state, private too
    pdir = platform_dir(settings)
    assert (pdir / "sig.key").exists() and not pdir.is_relative_to(settings.state_dir.resolve())
    assert not (settings.state_dir / "platform").exists() and _loose(pdir) == {}


def test_a_segment_left_by_a_crash_after_the_close_is_deleted_on_start(tmp_path):
    store = EnclaveStore(tmp_path / "enclave")
    store.open_round(1, b"spec")
    store.add_update(1, "u" * 8, "d", 1, np.ones(4, dtype=np.float32))
    store.db.execute("UPDATE rounds SET status='completed' WHERE round_id=1")  # closed, not yet cleaned
    store.close()
    assert (tmp_path / "enclave" / "rounds" / "1.f32").exists()
    EnclaveStore(tmp_path / "enclave").close()
    assert not (tmp_path / "enclave" / "rounds" / "1.f32").exists()


def test_an_open_round_keeps_its_segment_across_a_restart(tmp_path):
    store = EnclaveStore(tmp_path / "enclave")
    store.open_round(2, b"spec")
    store.add_update(2, "v" * 8, "d", 1, np.ones(4, dtype=np.float32))
    store.close()
    reopened = EnclaveStore(tmp_path / "enclave")
    assert np.array_equal(reopened.load_delta(reopened.round_updates(2)[0]), np.ones(4, dtype=np.float32))
    reopened.close_round(2, "failed", {})
    assert not (tmp_path / "enclave" / "rounds" / "2.f32").exists()
    reopened.close()


def test_a_platform_key_beside_the_state_moves_out_and_still_unseals(settings, caplog):
    from coordinator.service import load_identity

    load_identity(settings)  # the coordinator key the enclave pins
    first = Enclave(settings)
    kem_fp = first.identity.kem_fp
    first.store.close()
    legacy = settings.state_dir / "platform"
    platform_dir(settings).rename(legacy)  # where older versions kept it
    with caplog.at_level(logging.WARNING, logger="qflare.enclave"):
        again = Enclave(settings)
    again.store.close()
    assert again.identity.kem_fp == kem_fp and not legacy.exists()
    assert "out of the service state" in caplog.text


@pytest.mark.broker
async def test_services_say_loudly_that_attestation_is_simulated(broker, settings, caplog):
    with caplog.at_level(logging.WARNING):
        async with coordinator(settings), enclave(settings):
            pass
    lines = [r for r in caplog.records if "ATTESTATION IS SIMULATED" in r.getMessage()]
    assert {r.name for r in lines} == {"qflare.coordinator", "qflare.enclave"}
