"""Enrolment in one round trip: the coordinator's self-signed keys travel with the token
(``TokenCreated.coordinator_keys``, the token file's ``coordinator_keys``), and the device
checks them against its pinned fingerprint before it sends anything."""

from __future__ import annotations

import base64
import json
import time

import pytest

import pqc
from common import handshake
from edge_agent import client
from ops.claim import keys_message, parse_token
from ops.operator_client import OperatorClient
from pqc.identity import Identity
from schemas import signing
from schemas.codec import decode, encode
from schemas.messages import (
    CoordinatorKeys,
    EnrollRequest,
    KeysRequest,
    Signed,
    TokenCreate,
    TokenCreated,
)
from schemas.reasons import QflareError, Reason
from tests.services import EventLog, coordinator, with_operator

pytestmark = pytest.mark.broker


async def create_token(settings, device_id: str) -> tuple[str, TokenCreated]:
    """A token as `qflare token create` gets it: over the operator plane, opened by the operator."""
    async with OperatorClient(with_operator(settings)) as op:
        me = op.identity
        req, signed = op.sign(TokenCreate, device_id=device_id, ttl_seconds=600, reply_kem_alg=me.kem_alg,
                              reply_kem_pk=me.kem_pk)
        created = await op.send(req, signed, TokenCreated)
        return op.open_token(created.sealed_token, req.nonce), created


def record_calls(rpc) -> list[type]:
    """The request types ``rpc`` sends from now on."""
    sent: list[type] = []
    original = rpc.call

    async def recording(*args, **kw):
        sent.append(type(args[2]))
        return await original(*args, **kw)

    rpc.call = recording
    return sent


def count_keys_requests(coord) -> list[int]:
    """How many KeysRequests the coordinator serves from now on (one-element list)."""
    served = [0]
    original = coord.keys

    async def keys(req):
        served[0] += 1
        return await original(req)

    coord.keys = keys  # Coordinator.handle looks its handlers up per request
    return served


async def enroll(broker, coord, device_id: str, token: str, fp: str, **kw) -> tuple[client.Device, list[type]]:
    rpc = await broker.rpc()
    sent = record_calls(rpc)
    s = coord.settings
    dev = await client.enroll(rpc, broker.names, device_id, token, fp, sig_alg=s.crypto.signature,
                              kem_alg=s.crypto.kem, **kw)
    return dev, sent


def self_signed(ident: Identity, *, as_keys: Identity | None = None) -> bytes:
    """Keys message for ``as_keys`` (default ``ident``), signed by ``ident``."""
    k = as_keys or ident
    return encode(signing.sign(CoordinatorKeys(sig_alg=k.sig_alg, sig_pk=k.sig_pk, kem_alg=k.kem_alg, kem_pk=k.kem_pk,
                                               issued_at=time.time()), ident.sig_alg, ident.sig_sk, ident.sig_pk))


async def test_enrol_with_the_keys_from_the_token_in_one_round_trip(broker, settings):
    async with coordinator(settings) as coord:
        token, created = await create_token(settings, "one-1")
        token2, _ = await create_token(settings, "one-2")
        assert created.coordinator_keys == encode(coord.keys_message)
        served = count_keys_requests(coord)  # after the operator's own (it checks the coordinator's key)
        dev, sent = await enroll(broker, coord, "one-1", token, created.coordinator_fingerprint,
                                 keys_message=created.coordinator_keys)
        assert sent == [EnrollRequest] and served == [0]  # no key chain: one RPC
        assert coord.registry.get_device("one-1").sig_fp == dev.identity.sig_fp
        assert dev.coordinator_kem_pk == coord.identity.kem_pk and dev.auth_key is not None
        await client.open_session(await broker.rpc(), broker.names, dev)  # kem-v3 with those keys
        # without the keys (an old token file) the device walks the chain first: two RPCs
        _, sent = await enroll(broker, coord, "one-2", token2, coord.identity.sig_fp)
        assert sent == [KeysRequest, EnrollRequest] and served == [1]


async def test_forged_keys_in_token_file_are_refused(broker, settings):
    """Mallory edits the token file: the coordinator's signature key, her KEM key (to read the
    sealed claim: the token), signed by her. The pin names the coordinator's key, so the
    signature must be the coordinator's, and it is not: refused before any request is sent."""
    async with coordinator(settings) as coord:
        token, created = await create_token(settings, "forged-1")
        mallory = Identity.generate(coord.identity.sig_alg, coord.identity.kem_alg)
        me = coord.identity
        theirs = CoordinatorKeys(sig_alg=me.sig_alg, sig_pk=me.sig_pk, kem_alg=mallory.kem_alg,
                                 kem_pk=mallory.kem_pk, issued_at=time.time())
        forged = encode(signing.sign(theirs, mallory.sig_alg, mallory.sig_sk, mallory.sig_pk))
        # and the genuine message with its KEM key swapped, the coordinator's signature kept
        genuine = decode(created.coordinator_keys, Signed)
        swapped = encode(genuine.model_copy(update={"body": encode(theirs)}))
        served = count_keys_requests(coord)
        for bad in (forged, swapped):
            rpc = await broker.rpc()
            sent = record_calls(rpc)
            with pytest.raises(QflareError) as exc:
                await client.enroll(rpc, broker.names, "forged-1", token, created.coordinator_fingerprint,
                                    sig_alg="ML-DSA-44", kem_alg="ML-KEM-768", keys_message=bad)
            assert exc.value.reason == Reason.BAD_SIGNATURE, exc.value
            assert sent == [] and served == [0]  # nothing left the device
        # the token was never sent: it still enrols with the genuine keys
        dev, sent = await enroll(broker, coord, "forged-1", token, created.coordinator_fingerprint,
                                 keys_message=created.coordinator_keys)
        assert sent == [EnrollRequest] and coord.registry.get_device("forged-1").sig_fp == dev.identity.sig_fp


async def test_keys_of_an_unpinned_coordinator_in_token_file_are_refused(broker, settings):
    """A genuine, self-consistent keys message of another coordinator (or of mallory's): the
    device is pinned to this one, so it is refused; so is a rotation announcement passed off
    as current keys, and bytes that are no keys message at all."""
    async with coordinator(settings) as coord:
        token, created = await create_token(settings, "unpinned-1")
        other = Identity.generate(coord.identity.sig_alg, coord.identity.kem_alg)
        me = coord.identity
        rotation = encode(signing.sign(CoordinatorKeys(
            sig_alg=other.sig_alg, sig_pk=other.sig_pk, kem_alg=other.kem_alg, kem_pk=other.kem_pk,
            issued_at=time.time(), previous_sig_alg=me.sig_alg, previous_sig_pk=me.sig_pk),
            me.sig_alg, me.sig_sk, me.sig_pk))  # even signed by the pinned key: not self-signed keys
        for bad, reason in ((self_signed(other), Reason.BAD_SIGNATURE), (rotation, Reason.BAD_SIGNATURE),
                            (b"\x93garbage", Reason.MALFORMED)):
            rpc = await broker.rpc()
            sent = record_calls(rpc)
            with pytest.raises(QflareError) as exc:
                await client.enroll(rpc, broker.names, "unpinned-1", token, created.coordinator_fingerprint,
                                    sig_alg="ML-DSA-44", kem_alg="ML-KEM-768", keys_message=bad)
            assert exc.value.reason == reason, exc.value
            assert sent == []
        # the same message with the other coordinator pinned passes the check: the pin decides
        assert handshake.check_keys_message(self_signed(other), other.sig_fp).kem_pk == other.kem_pk
        assert coord.registry.get_device("unpinned-1") is None


async def test_a_token_made_before_a_coordinator_rotation_falls_back_to_the_key_chain(broker, settings):
    """The token file holds the keys of before `coordinator rotate-keys`: the coordinator refuses
    the claim sealed to a KEM key it no longer holds (unsupported_algorithm) before it looks at
    the token, so the device walks the chain from its pin and enrols with the same token."""
    from coordinator.service import rotate_coordinator_keys

    events = await EventLog.bind(broker, "enrollment.rejected.#", "device.enrolled")
    async with coordinator(settings) as coord:
        token, created = await create_token(settings, "rot-token-1")
        old_fp = coord.identity.sig_fp
    old, new = await rotate_coordinator_keys(settings)
    assert old == old_fp != new
    async with coordinator(settings) as coord:
        served = count_keys_requests(coord)
        dev, sent = await enroll(broker, coord, "rot-token-1", token, created.coordinator_fingerprint,
                                 keys_message=created.coordinator_keys)
        assert sent == [EnrollRequest, KeysRequest, EnrollRequest] and served == [1]
        await events.wait("enrollment.rejected.unsupported_algorithm")
        await events.wait("device.enrolled")
        assert pqc.fingerprint(dev.coordinator_sig_pk, dev.coordinator_sig_alg) == new
        assert dev.coordinator_kem_pk == coord.identity.kem_pk
        assert coord.registry.get_device("rot-token-1").sig_fp == dev.identity.sig_fp
        await client.open_session(await broker.rpc(), broker.names, dev)
        # a token created now carries the new keys, and enrols in one round trip again
        token2, created2 = await create_token(settings, "rot-token-2")
        assert created2.coordinator_fingerprint == new
        _, sent = await enroll(broker, coord, "rot-token-2", token2, new, keys_message=created2.coordinator_keys)
        assert sent == [EnrollRequest]


async def test_a_refusal_that_is_no_rotation_is_not_retried(broker, settings):
    """unsupported_algorithm for another cause (here: kem-v3 claims where only sig-v1 is
    accepted): the chain shows the same keys, so the device reports the refusal, once."""
    sig_only = settings.model_copy(update={"crypto": settings.crypto.model_copy(
        update={"accepted_handshakes": ["sig-v1"]})})
    async with coordinator(sig_only) as coord:
        token, created = await create_token(sig_only, "policy-1")
        rpc = await broker.rpc()
        sent = record_calls(rpc)
        with pytest.raises(QflareError) as exc:
            await client.enroll(rpc, broker.names, "policy-1", token, created.coordinator_fingerprint,
                                sig_alg="ML-DSA-44", kem_alg="ML-KEM-768", suite=handshake.KEM_V3,
                                keys_message=created.coordinator_keys)
        assert exc.value.reason == Reason.UNSUPPORTED_ALGORITHM and "not accepted" in exc.value.detail
        assert sent == [EnrollRequest, KeysRequest]
        assert coord.registry.get_device("policy-1") is None


def test_old_token_files_without_keys_still_parse(tmp_path):
    old = {"device_id": "d1", "token": "t", "coordinator_fingerprint": "f" * 64, "expires_at": 1.0}
    tok = parse_token(json.dumps(old))
    assert tok.coordinator_keys is None and keys_message(tok.coordinator_keys) is None
    new = parse_token(json.dumps({**old, "coordinator_keys": base64.b64encode(b"abc").decode()}))
    assert keys_message(new.coordinator_keys) == b"abc"
    for bad in ('{"device_id": "d1"}', "[]", json.dumps({**old, "coordinator_keys": "***"}),
                json.dumps({**old, "coordinator_keys": 5})):
        with pytest.raises(QflareError) as exc:
            keys_message(parse_token(bad).coordinator_keys)
        assert exc.value.reason == Reason.MALFORMED


def test_agent_enroll_with_a_token_file_from_token_create(sh, tmp_path):
    """`qflare agent enroll --token-file` takes the file `token create --json` wrote; a file
    whose keys were swapped for another coordinator's is refused, and its token not spent."""
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    good = tmp_path / "cam-1.json"
    good.write_text(sh.run("token", "create", "--device-id", "cam-1", "--json").stdout)
    tok = json.loads(good.read_text())
    keys = decode(base64.b64decode(tok["coordinator_keys"]), Signed)
    assert keys.signer == tok["coordinator_fingerprint"]
    forged = tmp_path / "forged.json"
    other = Identity.generate("ML-DSA-44", "ML-KEM-768")
    forged.write_text(json.dumps({**tok, "coordinator_keys": base64.b64encode(self_signed(other)).decode()}))
    bad = sh.run("agent", "enroll", "--token-file", str(forged), ok=False)
    assert bad.returncode != 0 and "bad_signature" in bad.stderr, bad.stderr
    assert sh.json("device", "list") == []
    # the pin given beside the file must be the file's
    pinned = sh.run("agent", "enroll", "--token-file", str(good), "--coordinator-fingerprint", other.sig_fp, ok=False)
    assert pinned.returncode != 0 and "bad_signature" in pinned.stderr, pinned.stderr
    usage = sh.run("agent", "enroll", "--token-file", str(good), "--token", "x", ok=False)
    assert usage.returncode == 2 and "not with --device-id or --token" in usage.stderr
    sh.run("agent", "enroll", "--token-file", str(good))
    assert [(d["device_id"], d["status"]) for d in sh.json("device", "list")] == [("cam-1", "active")]
    assert len(sh.json("agent", "session", "--device-id", "cam-1")["session_id"]) == 32
    # an old token file, without the keys: enrols through the key chain
    old = tmp_path / "cam-2.json"
    tok2 = json.loads(sh.run("token", "create", "--device-id", "cam-2", "--json").stdout)
    old.write_text(json.dumps({k: v for k, v in tok2.items() if k != "coordinator_keys"}))
    sh.run("agent", "enroll", "--token-file", str(old))
    assert sorted(d["device_id"] for d in sh.json("device", "list")) == ["cam-1", "cam-2"]


async def test_bench_handshake_devices_enrol_as_with_a_token_file(broker, settings):
    """`bench handshake` over the broker: by default each device checks its token's keys and
    enrols in one RPC; `fetch_chain` measures the old two RPCs; `shared_keys` one fetch for all."""
    from ops.bench_handshake import _over_broker

    async with coordinator(settings) as coord:
        for keys_from, fetches in (("token", 0), ("fetch_chain", 3), ("shared_keys", 1)):
            served = count_keys_requests(coord)
            out = await _over_broker(coord, coord.settings, 3, handshake.DEFAULT_SUITE, keys_from=keys_from)
            coord.keys = type(coord).keys.__get__(coord)
            assert served == [fetches], keys_from
            assert out["enroll_per_s"] > 0 and out["session_per_s"] > 0
        with pytest.raises(ValueError):
            await _over_broker(coord, coord.settings, 1, handshake.DEFAULT_SUITE, keys_from="nope")
