"""Operator requests (issue 8 item 2): signed by a pinned operator key, fresh, single-use,
bounded by settings, on the operator exchange; replies signed by the coordinator."""

from __future__ import annotations

import time

import msgpack
import pytest

from common.settings import load_settings
from coordinator.operator import check_round_start
from coordinator.service import META_CURRENT, META_PLAN, META_ROUND
from edge_agent import client
from ops.operator_client import OperatorClient
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import (
    DeviceListRequest,
    DeviceRevoke,
    DeviceRevoked,
    DeviceTable,
    RoundCancel,
    RoundCancelled,
    RoundListRequest,
    RoundOpen,
    RoundSpec,
    RoundStart,
    RoundStarted,
    RoundStatusRequest,
    RoundTable,
    Signed,
    TokenCreate,
    TokenCreated,
)
from schemas.names import Names
from schemas.reasons import QflareError, Reason
from tests.services import (
    EventLog,
    coordinator,
    enclave,
    enrolled,
    operator_call,
    start_rounds,
    with_operator,
)

pytestmark = pytest.mark.broker


def signed_request(ident: Identity, request_type, issued_at: float | None = None, **fields) -> tuple[object, Signed]:
    """A request signed by ``ident`` as an operator would sign it (for attacks the CLI never makes)."""
    import secrets

    req = request_type(operator_alg=ident.sig_alg, operator_pk=ident.sig_pk, nonce=secrets.token_bytes(32),
                       issued_at=time.time() if issued_at is None else issued_at, **fields)
    return req, signing.sign(req, ident.sig_alg, ident.sig_sk, ident.sig_pk)


async def to_operator_queue(broker, signed: Signed, reply_type):
    rpc = await broker.rpc()
    return await rpc.call(broker.names.operator_exchange, Names.OPERATOR_KEY, signed, reply_type, 10)


async def expect(coro, reason: Reason) -> QflareError:
    with pytest.raises(QflareError) as exc:
        await coro
    assert exc.value.reason == reason, exc.value
    return exc.value


async def test_a_device_cannot_start_a_round_naming_itself_the_only_expected_device(broker, settings):
    """The attack: a device sent round.start (min_updates=1, expected=[itself]) to the RPC
    queue and got the enclave to sign a model it alone chose. Now round.start is no RPC
    request at all, and on the operator queue the device's own key is not an operator's."""
    async with coordinator(settings) as coord:
        events = await EventLog.bind(broker, "round.*", "operator.rejected.#")
        mallory = await enrolled(broker, coord, "mallory")
        fields = dict(rounds=1, min_updates=1, deadline_seconds=5, expected=["mallory"])
        _, signed = signed_request(mallory.identity, RoundStart, **fields)
        req = signing.unverified(signed, RoundStart)
        rpc = await broker.rpc()
        # on the RPC queue devices may write: not a request it serves, signed or not
        await expect(rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, req, RoundStarted, 10),
                     Reason.UNKNOWN_TYPE)
        await expect(rpc.call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, signed, RoundStarted, 10),
                     Reason.UNKNOWN_TYPE)
        # on the operator queue: a device key is no pinned operator key
        await expect(to_operator_queue(broker, signed, Signed), Reason.NOT_OPERATOR)
        await events.wait("operator.rejected.not_operator")
        assert coord.registry.list_rounds() == [] and not coord.registry.get_meta(META_PLAN)
        assert coord.running_plan() is None and "round.opened" not in events.types()


async def test_an_operator_request_signed_by_an_unpinned_key_is_refused(broker, settings, tmp_path):
    async with coordinator(settings) as coord:
        await enrolled(broker, coord, "cam", session=False)
        stranger = Identity.generate("ML-DSA-44", "ML-KEM-768")
        _, signed = signed_request(stranger, DeviceRevoke, device_id="cam")
        err = await expect(to_operator_queue(broker, signed, Signed), Reason.NOT_OPERATOR)
        assert "not a pinned operator key" in err.detail
        # a pinned key's fingerprint on another key's signature is refused too
        pinned = Identity.load(coord.settings.state_dir / "operator")
        req, _ = signed_request(pinned, DeviceRevoke, device_id="cam")
        forged = signing.sign(req, stranger.sig_alg, stranger.sig_sk, stranger.sig_pk)
        forged = forged.model_copy(update={"signer": pinned.sig_fp})
        await expect(to_operator_queue(broker, forged, Signed), Reason.BAD_SIGNATURE)
        assert coord.registry.get_device("cam").status == "active"
    # a coordinator that pins nothing obeys nobody
    bare = settings.model_copy(update={"state_dir": tmp_path / "bare"})
    async with coordinator(bare) as coord:
        coord.operator_desk.pinned.clear()
        _, signed = signed_request(pinned, RoundListRequest)
        err = await expect(to_operator_queue(broker, signed, Signed), Reason.NOT_OPERATOR)
        assert "pinned_fingerprints" in err.detail


async def test_a_replayed_operator_request_is_refused(broker, settings):
    async with coordinator(settings) as coord:
        operator = Identity.load(coord.settings.state_dir / "operator")
        for i in range(2):
            await enrolled(broker, coord, f"d{i}", session=False)
        _, start = signed_request(operator, RoundStart, rounds=2, min_updates=2, deadline_seconds=600,
                                  expected=["d0", "d1"])
        reply = await to_operator_queue(broker, start, Signed)
        assert signing.verify(reply, RoundStarted, coord.identity.sig_alg, coord.identity.sig_pk).round_id == 1
        await operator_call(coord.settings, RoundCancel, RoundCancelled)
        # the same signed bytes again, after the cancel made room for a plan: refused
        await expect(to_operator_queue(broker, start, Signed), Reason.REPLAY)
        assert coord.running_plan() is None
        # a genuine request kept back past the freshness window
        _, old = signed_request(operator, RoundStart, issued_at=time.time() - 3600, rounds=2, min_updates=2,
                                deadline_seconds=600, expected=["d0", "d1"])
        await expect(to_operator_queue(broker, old, Signed), Reason.STALE)
        assert coord.running_plan() is None


def test_round_start_fields_are_bounded_by_the_settings():
    s = load_settings(fl={"min_updates": 2}, operator={"max_rounds": 10, "max_deadline_seconds": 600,
                                                       "max_epochs": 5, "max_lr": 0.5, "max_batch_size": 64})
    status = {"a": "active", "b": "active", "gone": "revoked"}.get
    ok = dict(operator_alg="ML-DSA-44", operator_pk=b"k", nonce=b"n" * 16, issued_at=0.0, rounds=10,
              min_updates=2, deadline_seconds=600, expected=["a", "b"], epochs=5, lr=0.5, batch_size=64)
    check_round_start(RoundStart(**ok), s, status)
    bad = [({"rounds": 11}, "max_rounds"), ({"deadline_seconds": 601}, "max_deadline_seconds"),
           ({"min_updates": 1}, "fl.min_updates"), ({"epochs": 6}, "max_epochs"), ({"lr": 0.6}, "max_lr"),
           ({"batch_size": 65}, "max_batch_size"), ({"expected": ["a", "a"]}, "twice"),
           ({"min_updates": 3}, "expected devices")]
    for change, words in bad:
        with pytest.raises(QflareError) as exc:
            check_round_start(RoundStart(**{**ok, **change}), s, status)
        assert exc.value.reason == Reason.INVALID_FIELD and words in exc.value.detail, change
    for device, reason in (("ghost", Reason.NOT_ENROLLED), ("gone", Reason.REVOKED)):
        with pytest.raises(QflareError) as exc:
            check_round_start(RoundStart(**{**ok, "expected": ["a", device]}), s, status)
        assert exc.value.reason == reason


async def test_a_huge_round_plan_is_refused_and_a_stored_one_does_not_survive_a_restart(broker, settings):
    """The attack: rounds=10000, deadline_seconds=1e9 wedged the round driver, and the plan
    survived a coordinator restart. Now such a request is refused, and a plan an older
    version stored is dropped at start and its open round cancelled at the enclave."""
    from tests.test_rounds import enclave_after_coordinator

    async with enclave_after_coordinator(settings) as get_enclave:
        async with coordinator(settings) as coord:
            operator = Identity.load(coord.settings.state_dir / "operator")
            huge = RoundStart.model_construct(operator_alg=operator.sig_alg, operator_pk=operator.sig_pk,
                                              nonce=b"h" * 32, issued_at=time.time(), rounds=10_000, min_updates=2,
                                              deadline_seconds=1e9, expected=[], epochs=1, lr=0.1, batch_size=16)
            signed = signing.sign(huge, operator.sig_alg, operator.sig_sk, operator.sig_pk)
            await expect(to_operator_queue(broker, signed, Signed), Reason.INVALID_FIELD)  # the wire bounds
            err = await expect(start_rounds(coord.settings, rounds=101, min_updates=2, deadline_seconds=60),
                               Reason.INVALID_FIELD)
            assert "operator.max_rounds" in err.detail  # the settings' bounds
            await expect(start_rounds(coord.settings, rounds=2, min_updates=2, deadline_seconds=3601),
                         Reason.INVALID_FIELD)
            assert coord.running_plan() is None
            # what an older coordinator left behind: the huge plan, its first round open
            enc = await get_enclave()
            events = await EventLog.bind(broker, "round.*")
            spec = RoundSpec(round_id=1, deadline=time.time() + 1e9, min_updates=2, epochs=1, lr=0.1, batch_size=16)
            await broker.publisher.publish(broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY,
                                           coord._sign(RoundOpen(spec=spec, issued_at=time.time())))
            await events.wait("round.opened")
            old_request = msgpack.packb({"v": 1, "t": "round.start", "b": {
                "rounds": 10_000, "min_updates": 1, "deadline_seconds": 1e9, "expected": [], "epochs": 1,
                "lr": 0.1, "batch_size": 16}})
            coord.registry.set_meta(META_PLAN, msgpack.packb({"req": old_request, "first": 1}))
            coord.registry.set_meta(META_CURRENT, encode(spec))
            coord.registry.set_meta(META_ROUND, b"1")
        async with coordinator(settings) as again:
            await events.wait("round.cancelled")
            assert enc.store.round_status(1) == "cancelled" and enc.round is None
            assert again.running_plan() is None and not again.registry.get_meta(META_PLAN)
            assert any(e.action == "round.plan.dropped" for e in again.registry.audit_log())
            # and the operator can run rounds again at once
            started = await start_rounds(again.settings, rounds=1, min_updates=2, deadline_seconds=600)
            assert started.round_id == 2
            await operator_call(again.settings, RoundCancel, RoundCancelled)


async def test_a_round_cancel_really_stops_the_plan(broker, settings):
    async with coordinator(settings) as coord, enclave(settings) as enc:
        events = await EventLog.bind(broker, "round.*")
        for i in range(2):
            await enrolled(broker, coord, f"d{i}", session=False)
        started = await start_rounds(coord.settings, rounds=3, min_updates=2, deadline_seconds=600,
                                     expected=["d0", "d1"])
        assert (started.round_id, started.last_round_id) == (1, 3)
        await events.wait("round.opened")
        table = await operator_call(coord.settings, RoundStatusRequest, RoundTable)
        assert table.rounds[0].status == "open" and table.plan.last_round_id == 3
        done = await operator_call(coord.settings, RoundCancel, RoundCancelled, reason="wrong data")
        assert (done.round_id, done.skipped) == (1, 2)
        cancelled = await events.wait("round.cancelled")
        assert cancelled[0].round_id == 1
        # the enclave closed it at the coordinator's signed word: no model, no open round
        assert enc.store.round_status(1) == "cancelled" and enc.round is None and enc.version == 0
        assert coord.running_plan() is None and not coord.registry.get_meta(META_PLAN)
        table = await operator_call(coord.settings, RoundListRequest, RoundTable)
        assert [(r.round_id, r.status) for r in table.rounds] == [(1, "cancelled")] and table.plan is None
        await expect(operator_call(coord.settings, RoundCancel, RoundCancelled), Reason.NO_ROUND)
    async with coordinator(settings) as again:  # nothing to resume after a restart
        assert again.running_plan() is None
    assert events.types().count("round.opened") == 1


async def test_operator_tokens_and_devices_over_the_broker(broker, settings):
    async with coordinator(settings) as coord:
        async with OperatorClient(with_operator(settings)) as op:
            me = op.identity
            req, signed = op.sign(TokenCreate, device_id="cam-7", ttl_seconds=600, reply_kem_alg=me.kem_alg,
                                  reply_kem_pk=me.kem_pk)
            created = await op.send(req, signed, TokenCreated)
            token = op.open_token(created.sealed_token, req.nonce)
            assert token.encode() not in encode(created)  # the token never travels in clear
            assert created.coordinator_fingerprint == coord.identity.sig_fp
            dev = await client.enroll(await broker.rpc(), broker.names, "cam-7", token, created.coordinator_fingerprint,
                                      sig_alg="ML-DSA-44", kem_alg="ML-KEM-768")
            table = await op.call(DeviceListRequest, DeviceTable)
            assert [(d.device_id, d.status, d.sig_fp) for d in table.devices] == [
                ("cam-7", "active", dev.identity.sig_fp)]
            await expect(op.call(TokenCreate, TokenCreated, device_id="x", ttl_seconds=1e9,
                                 reply_kem_alg=me.kem_alg, reply_kem_pk=me.kem_pk), Reason.INVALID_FIELD)
            revoked = await op.call(DeviceRevoke, DeviceRevoked, device_id="cam-7")
            assert revoked.device_id == "cam-7" and coord.registry.get_device("cam-7").status == "revoked"
            await expect(op.call(DeviceRevoke, DeviceRevoked, device_id="nobody"), Reason.NOT_ENROLLED)
            await expect(op.call(RoundStatusRequest, RoundTable, round_id=9), Reason.NO_ROUND)


async def test_a_reply_from_an_unpinned_coordinator_is_refused(broker, settings):
    async with coordinator(settings):
        elsewhere = with_operator(settings).model_copy()
        elsewhere = elsewhere.model_copy(update={"operator": elsewhere.operator.model_copy(
            update={"coordinator_fingerprint": "ab" * 32})})
        with pytest.raises(QflareError) as exc:
            async with OperatorClient(elsewhere):
                pass
        assert exc.value.reason == Reason.BAD_SIGNATURE
