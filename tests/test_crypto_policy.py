"""Pure-Python backends on the live path: refused unless a setting allows them (issue 8 item 11)."""

from __future__ import annotations

import pytest

from common import crypto_policy
from common.settings import CryptoSettings
from coordinator.service import Coordinator
from edge_agent import client
from pqc.errors import PolicyError
from schemas.reasons import QflareError, Reason
from tests.services import coordinator, enrolled

FRODO = "FrodoKEM-640-AES"


@pytest.fixture
def frodo_pure_only(monkeypatch):
    """FrodoKEM served by the pure backend alone, as on a machine without liboqs."""
    monkeypatch.setattr(crypto_policy, "pure_only", lambda kem: kem == FRODO)


def test_live_policy_leaves_out_pure_only_kems_unless_allowed(frodo_pure_only):
    policy = crypto_policy.live_policy(CryptoSettings())
    with pytest.raises(PolicyError, match="allow_pure_backends"):
        policy.check_kem(FRODO)
    policy.check_kem("ML-KEM-768")
    crypto_policy.live_policy(CryptoSettings(allow_pure_backends=True)).check_kem(FRODO)


def test_a_service_whose_own_kem_is_pure_only_refuses_to_start(frodo_pure_only, settings):
    s = settings.model_copy(update={"crypto": CryptoSettings(kem=FRODO)})
    with pytest.raises(QflareError) as exc:
        Coordinator(s)
    assert exc.value.reason == Reason.UNSUPPORTED_ALGORITHM and "allow_pure_backends" in exc.value.detail


@pytest.mark.broker
async def test_a_device_cannot_put_the_pure_frodokem_on_the_session_path(frodo_pure_only, broker, settings):
    """The attack: FrodoKEM-640-AES ran on the live session path through the pure backend,
    whose sampler was not data-independent. By default a session asking for a pure-only
    KEM is refused with the reason and what to do; with the setting it works."""
    async with coordinator(settings) as coord:
        dev = await enrolled(broker, coord, "frodo-dev", session=False)
        rpc = await broker.rpc()
        with pytest.raises(QflareError) as exc:
            await client.open_session(rpc, broker.names, dev, kem_alg=FRODO)
        assert exc.value.reason == Reason.UNSUPPORTED_ALGORITHM and "allow_pure_backends" in exc.value.detail
    allowed = settings.model_copy(update={"crypto": CryptoSettings(allow_pure_backends=True)})
    async with coordinator(allowed) as coord:
        rpc = await broker.rpc()
        assert (await client.open_session(rpc, broker.names, dev, kem_alg=FRODO)).session_id
