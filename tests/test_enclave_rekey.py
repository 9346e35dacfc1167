"""A new enclave build cannot unseal the old build's keys (sealed to the measurement, as a TEE
seals to MRENCLAVE): it refuses in one line saying what to do; an enclave given new keys is
followed by running devices without a restart."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from common.settings import load_settings
from edge_agent import agent
from edge_agent.storage import save_device
from enclave_worker import attestation
from schemas.reasons import QflareError, Reason
from tests.conftest import wait_for
from tests.services import EventLog, coordinator, enclave, enrolled, start_rounds


def test_keys_sealed_by_other_enclave_code_are_refused_with_what_to_do(tmp_path) -> None:
    s = load_settings(state_dir=tmp_path / "state")
    platform = attestation.platform_identity(tmp_path / "platform")
    made = attestation.load_enclave_keys(s, platform, "a" * 64)
    assert attestation.load_enclave_keys(s, platform, "a" * 64).sig_pk == made.sig_pk  # same build: same keys
    with pytest.raises(QflareError) as err:
        attestation.load_enclave_keys(s, platform, "b" * 64)  # a new build
    assert err.value.reason == Reason.DECRYPTION_FAILED
    assert "sealed by other enclave code" in err.value.detail and "move" in err.value.detail
    assert "enclave.allowed_measurements" in err.value.detail


async def test_a_running_agent_follows_an_enclave_that_got_new_keys(broker, settings, monkeypatch) -> None:
    monkeypatch.setattr(agent, "REKEY_SECONDS", 0.2)
    settings = settings.model_copy(update={"fl": settings.fl.model_copy(update={"min_updates": 1})})
    events = await EventLog.bind(broker, "round.completed", "update.accepted")
    stop = asyncio.Event()
    async with coordinator(settings) as coord:
        async with enclave(settings) as first:
            save_device(settings.state_dir, await enrolled(broker, coord, "cam-1"))
            run = asyncio.create_task(agent.run_agent(settings, "cam-1", 0, 1, stop=stop))
            # enrolled's session, then the agent's (sessions are counted in events, listed in the registry)
            await wait_for(lambda: coord.registry.db.execute(
                "SELECT count(*) FROM sessions WHERE device_id='cam-1'").fetchone()[0] >= 2, 60)
            old_key = first.identity.sig_pk
        shutil.rmtree(settings.state_dir / "enclave" / "keys")  # e.g. moved aside for a new build
        try:
            async with enclave(settings) as second:
                assert second.identity.sig_pk != old_key
                await start_rounds(coord.settings, rounds=1, min_updates=1, deadline_seconds=60,
                                   expected=["cam-1"])
                done = await events.wait("round.completed", timeout=90)
                assert done[0].detail["accepted"] == 1
                assert [e.device_id for e in events.events if e.type == "update.accepted"] == ["cam-1"]
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)
