"""Broker identities: every principal its own confined user, checked on every request (real RabbitMQ).

Users are named within the test's namespace and deleted afterwards; policies match only the
test's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import aio_pika
import aiormq
import pytest

from broker.client import BrokerClient
from broker.connection import BrokerUnavailable, connect
from broker.principals import role_users
from broker.users import (
    BrokerAdminError,
    ManagementApi,
    UserExists,
    amqp_url_for,
    apply_policies,
    create_device_user,
    delete_device_user,
    device_permissions,
    ensure_user,
    provision_services,
    remove_policies,
)
from common.settings import load_settings
from edge_agent import client
from pqc.identity import Identity
from schemas import signing
from schemas.codec import encode
from schemas.messages import AttestRequest, EnrollRequest, Event, SessionRequest, Signed
from schemas.names import Names
from schemas.reasons import QflareError, Reason
from tests.services import EventLog, coordinator, enclave, enrolled, operator_call
from tests.test_rounds import honest_update, open_round

pytestmark = pytest.mark.broker


@pytest.fixture
def api(settings) -> ManagementApi:
    api = ManagementApi.from_settings(settings)
    try:
        api.request("GET", "/api/overview")
    except BrokerAdminError as exc:
        pytest.fail(f"{exc}")
    return api


def device_user_settings(settings, api, device_id: str):
    names = Names(settings.broker.namespace)
    password = create_device_user(api, names, device_id, secrets.token_urlsafe(16), max_connections=4)
    assert password is not None
    return settings.model_copy(update={"amqp_url": amqp_url_for(settings.amqp_url, names.device_user(device_id),
                                                                password)})


@pytest.fixture
def device_user(settings, broker, api):
    name = f"dev-{secrets.token_hex(4)}"
    try:
        yield name, device_user_settings(settings, api, name)
    finally:
        delete_device_user(api, broker.names, name)


@contextlib.asynccontextmanager
async def device_broker(dev_settings, name: str):
    b = await BrokerClient.open(dev_settings, name=name, declare=False, client_id=name)
    try:
        yield b
    finally:
        await b.close()


async def ignore(message) -> None:
    pass


async def refused(coro, error: type[Exception] = aiormq.exceptions.ChannelAccessRefused) -> bool:
    """True when the broker refused the operation (ACCESS_REFUSED unless told otherwise)."""
    try:
        await coro
    except error:
        return True
    return False


async def can_publish(url: str, exchange: str, key: str = "x") -> bool:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(exchange, ensure=False)
        return not await refused(ex.publish(aio_pika.Message(encode(Event(type="x", at=0.0))), key))
    finally:
        await conn.close()


async def can_consume(url: str, queue: str) -> bool:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return not await refused(q.consume(ignore))
    finally:
        await conn.close()


async def expect_reason(coro, reason: Reason) -> QflareError:
    with pytest.raises(QflareError) as exc:
        await coro
    assert exc.value.reason == reason, exc.value
    return exc.value


# --- devices ---------------------------------------------------------------------------------


async def enroll_and_send_an_update(broker, coord, enc, dev_broker: BrokerClient, device_id: str) -> None:
    """As the device's own user: enroll, open a session, send an update the enclave accepts."""
    events = await EventLog.bind(broker, "update.accepted")
    rpc = await dev_broker.rpc()
    token = coord.registry.create_token(device_id, 600)
    dev = await client.enroll(rpc, dev_broker.names, device_id, token, coord.identity.sig_fp,
                              sig_alg="ML-DSA-44", kem_alg="ML-KEM-768")
    await client.open_session(rpc, dev_broker.names, dev)
    await open_round(coord, coord.broker, 1, [device_id])  # as the coordinator's own user
    _, key, body = honest_update(dev, enc, 1)
    await dev_broker.publisher.publish(dev_broker.names.updates_exchange, key, body)
    await events.wait("update.accepted")


async def test_a_device_user_enrolls_trains_and_sends_its_update(broker, settings, device_user):
    from edge_agent.fleet import Fleet
    from edge_agent.models import latest_model_messages
    from edge_agent.outbox import Outbox

    name, dev_settings = device_user
    async with coordinator(settings) as coord, enclave(settings) as enc, \
            device_broker(dev_settings, name) as dev_broker:
        await enroll_and_send_an_update(broker, coord, enc, dev_broker, name)
        assert await latest_model_messages(dev_broker) != []  # may read the models stream
        fleet = Fleet(dev_broker, Outbox(settings.state_dir / "outbox.sqlite3"))
        await fleet.listen()  # may declare its own model feed, bound to the models fanout


async def test_a_device_user_cannot_publish_for_another_device_or_to_control(settings, device_user, broker):
    name, dev_settings = device_user
    names = broker.names
    url = dev_settings.amqp_url
    assert await can_publish(url, names.updates_exchange, Names.update_key(name))
    assert not await can_publish(url, names.updates_exchange, Names.update_key("someone-else"))
    assert not await can_publish(url, names.updates_exchange, Names.update_key(name + ".x"))
    for exchange in (names.control_exchange, names.events_exchange, names.dlx, names.operator_exchange,
                     names.models_exchange):
        assert not await can_publish(url, exchange), exchange
    for queue in (names.updates_queue, names.coordinator_queue, names.enclave_control_queue,
                  names.dead_letter_queue, names.operator_queue):
        assert not await can_consume(url, queue), queue


async def test_a_device_users_queues_do_not_cover_a_dotted_device_id(settings, device_user, broker):
    """Device ``D``'s queue prefix once covered device ``D.x``'s queues (ids contain dots)."""
    name, dev_settings = device_user
    conn = await aio_pika.connect(dev_settings.amqp_url)
    try:
        ch = await conn.channel()
        await ch.declare_queue(broker.names.private_queue(name, "models", "a1"), exclusive=True)
        for other in (f"{name}.x", f"{name}x"):
            ch = await conn.channel()
            assert await refused(ch.declare_queue(broker.names.private_queue(other, "models", "a1"),
                                                  exclusive=True)), other
    finally:
        await conn.close()
    perms = device_permissions(broker.names, "D")["permissions"]["configure"]
    assert perms.endswith(":.*$")


async def test_a_device_user_cannot_speak_for_another_device(settings, device_user, broker):
    name, dev_settings = device_user
    async with coordinator(settings) as coord, device_broker(dev_settings, name) as dev_broker:
        rpc = await dev_broker.rpc()
        token = coord.registry.create_token("victim", 600)
        await expect_reason(client.enroll(rpc, dev_broker.names, "victim", token, coord.identity.sig_fp,
                                          sig_alg="ML-DSA-44", kem_alg="ML-KEM-768"), Reason.FORBIDDEN)
        assert coord.registry.get_device("victim") is None


def junk_session_request(device_id: str) -> Signed:
    ident = Identity.generate("ML-DSA-44", "ML-KEM-768")
    req = SessionRequest(device_id=device_id, eph_kem_alg="ML-KEM-768", eph_pk=b"\x01" * 1184,
                         nonce=secrets.token_bytes(32), timestamp=time.time())
    return signing.sign(req, ident.sig_alg, ident.sig_sk, ident.sig_pk)


async def send_junk(dev_broker: BrokerClient, requests) -> None:
    rpc = await dev_broker.rpc()
    for req in requests:
        with contextlib.suppress(QflareError):
            await rpc.call(dev_broker.names.rpc_exchange, Names.COORDINATOR_KEY, req, Signed, 10)


async def test_twelve_junk_session_requests_lock_no_device_out_of_sessions(settings, device_user, broker):
    """Rate limits were keyed by the clear device id: 12 junk requests naming a device locked it out."""
    name, dev_settings = device_user
    async with coordinator(settings) as coord:
        victim = await enrolled(broker, coord, "victim", session=False)
        async with device_broker(dev_settings, name) as dev_broker:
            await send_junk(dev_broker, [junk_session_request("victim") for _ in range(12)])
            await send_junk(dev_broker, [junk_session_request(name) for _ in range(12)])  # its own id
        rpc = await broker.rpc()
        await client.open_session(rpc, broker.names, victim)
        assert victim.session is not None


async def test_four_junk_enrollment_requests_lock_no_device_out_of_enrollment(settings, device_user, broker):
    name, dev_settings = device_user
    async with coordinator(settings) as coord:
        junk = EnrollRequest(device_id="victim", kem_alg=coord.identity.kem_alg,
                             coordinator_kem_fp=coord.identity.kem_fp, sealed=b"\x00" * 2000)
        async with device_broker(dev_settings, name) as dev_broker:
            await send_junk(dev_broker, [junk] * 4)
        await enrolled(broker, coord, "victim", session=False)
        assert coord.registry.get_device("victim") is not None


# --- services ---------------------------------------------------------------------------------


async def test_only_the_enclaves_broker_user_may_attest(settings, device_user, broker):
    """A device replaying the enclave's attest request must not be able to replace its report."""
    name, dev_settings = device_user
    async with coordinator(settings) as coord, enclave(settings):
        from coordinator.service import META_ENCLAVE_REPORT

        admitted = coord.registry.get_meta(META_ENCLAVE_REPORT)
        assert admitted
        platform = Identity.generate("ML-DSA-44", "ML-KEM-768")
        from schemas.messages import AttestationReport

        fake = signing.sign(AttestationReport(measurement="0" * 64, kem_alg="ML-KEM-768", kem_pk=platform.kem_pk,
                                              sig_alg="ML-DSA-44", sig_pk=platform.sig_pk,
                                              nonce=secrets.token_bytes(32), created_at=time.time()),
                            platform.sig_alg, platform.sig_sk, platform.sig_pk)
        req = AttestRequest(report=encode(fake), platform_pk=platform.sig_pk, platform_alg=platform.sig_alg)
        events = await EventLog.bind(broker, "attestation.rejected.#")
        async with device_broker(dev_settings, name) as dev_broker:
            rpc = await dev_broker.rpc()
            await expect_reason(rpc.call(dev_broker.names.rpc_exchange, Names.COORDINATOR_KEY, req, Signed, 10),
                                Reason.FORBIDDEN)
        await events.wait("attestation.rejected.forbidden")
        assert coord.registry.get_meta(META_ENCLAVE_REPORT) == admitted


async def test_operator_requests_only_from_operator_broker_users(settings, broker):
    """Holding the operator key is not enough: the request must come from an operator broker user."""
    from schemas.messages import RoundListRequest, RoundTable

    others = settings.model_copy(update={"broker": settings.broker.model_copy(
        update={"roles": settings.broker.roles.model_copy(update={"operator": ["qflare.x.operator"]})})})
    async with coordinator(others) as coord:
        events = await EventLog.bind(broker, "operator.rejected.#")
        await expect_reason(operator_call(others, RoundListRequest, RoundTable), Reason.FORBIDDEN)
        await events.wait("operator.rejected.forbidden")
        assert coord.registry.list_rounds(1) == []
    async with coordinator(settings):  # guest on loopback plays every role by default
        assert isinstance(await operator_call(settings, RoundListRequest, RoundTable), RoundTable)


async def test_the_enclave_takes_control_messages_only_from_coordinator_broker_users(settings, broker):
    """A round.open signed by the coordinator's key but sent by another broker user is dead-lettered."""
    from schemas.names import REASON_HEADER
    from tests.test_broker_attacks import next_dead_letter

    strict = settings.model_copy(update={"broker": settings.broker.model_copy(
        update={"roles": settings.broker.roles.model_copy(update={"coordinator": ["qflare.x.coordinator"]})})})
    async with coordinator(settings) as coord, enclave(strict) as enc:
        events = await EventLog.bind(broker, "round.opened")
        await open_round(coord, broker, 1, ["d"])  # sent as guest, which strict says is no coordinator
        refused = await next_dead_letter(broker)
        assert refused.headers[REASON_HEADER] == Reason.FORBIDDEN
        assert events.types() == [] and enc.round is None


def test_role_users_default_to_guest_on_loopback_else_to_the_namespaces_users(tmp_path):
    local = load_settings(amqp_url="amqp://guest:guest@127.0.0.1:5672/", state_dir=tmp_path)
    assert role_users(local, "enclave") == {"guest"}
    real = load_settings(amqp_url="amqps://qflare.prod.coordinator:pw@broker.example:5671/", state_dir=tmp_path,
                         broker={"namespace": "prod", "ca_file": str(tmp_path / "ca.pem")})
    assert role_users(real, "enclave") == {"qflare.prod.enclave"}
    assert role_users(real, "operator") == {"qflare.prod.operator"}
    listed = load_settings(amqp_url="amqp://guest:guest@127.0.0.1:5672/", state_dir=tmp_path,
                           broker={"roles": {"operator": ["alice", "bob"]}})
    assert role_users(listed, "operator") == {"alice", "bob"}


async def test_services_run_as_their_own_least_privilege_broker_users(settings, broker, api):
    """``qflare broker setup``'s users suffice for a whole round; each can do its role's part only."""
    names = broker.names
    users = provision_services(api, settings, lambda: secrets.token_urlsafe(16))
    as_role = {user.rsplit(".", 1)[1]: settings.model_copy(update={"amqp_url": amqp_url_for(settings.amqp_url, user, pw)})
               for user, pw in users.items()}
    device = f"dev-{secrets.token_hex(3)}"
    dev_settings = device_user_settings(settings, api, device)
    try:
        assert set(as_role) == {"coordinator", "enclave", "operator"}
        # a second setup leaves the users alone; --rotate gives new passwords
        assert set(provision_services(api, settings, lambda: "unused").values()) == {None}
        coord_url, enc_url, op_url = (as_role[r].amqp_url for r in ("coordinator", "enclave", "operator"))
        assert not await can_publish(enc_url, names.control_exchange, Names.ENCLAVE_CONTROL_KEY)
        assert not await can_publish(coord_url, names.models_exchange)
        assert not await can_publish(coord_url, names.updates_exchange, Names.update_key("d"))
        assert not await can_publish(op_url, names.control_exchange, Names.ENCLAVE_CONTROL_KEY)
        assert not await can_publish(op_url, names.models_exchange)
        assert await can_publish(op_url, names.operator_exchange, Names.OPERATOR_KEY + ".unrouted")
        assert not await can_consume(coord_url, names.updates_queue)
        assert not await can_consume(op_url, names.updates_queue)
        assert not await can_consume(enc_url, names.coordinator_queue)
        async with coordinator(as_role["coordinator"]) as coord, enclave(as_role["enclave"]) as enc, \
                device_broker(dev_settings, device) as dev_broker:
            await enroll_and_send_an_update(broker, coord, enc, dev_broker, device)
    finally:
        delete_device_user(api, names, device)
        for user in users:
            api.request("DELETE", f"/api/users/{user}")
        remove_policies(api, names)


# --- provisioning -----------------------------------------------------------------------------


async def test_another_deployment_cannot_silently_reset_a_device_users_password(settings, api, broker):
    """User names carried no namespace: another deployment's `broker-user D` reset this one's D."""
    ours, theirs = broker.names, Names(settings.broker.namespace + "b")
    assert ours.device_user("D") != theirs.device_user("D")
    assert ours.device_user("D") != ours.service_user("coordinator")
    pw = create_device_user(api, ours, "D", "first-password")
    try:
        assert pw == "first-password"
        assert create_device_user(api, ours, "D", "second") is None  # unchanged: same permissions
        url = amqp_url_for(settings.amqp_url, ours.device_user("D"), "first-password")
        await (await aio_pika.connect(url)).close()  # the first password still works
        other = device_permissions(theirs, "D")
        with pytest.raises(UserExists):
            ensure_user(api, ours.device_user("D"), other["permissions"], "x", topic=other["topic"])
        assert create_device_user(api, ours, "D", "rotated", rotate=True) == "rotated"
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(url)
    finally:
        delete_device_user(api, ours, "D")


async def test_a_device_stream_bound_to_the_models_fanout_stays_bounded(settings, device_user, broker, api):
    """A device could declare durable streams bound to the models fanout: now every queue under its
    prefix, a stream too, falls under the namespace's size-bounded policy."""
    name, dev_settings = device_user
    apply_policies(api, broker.names, settings)
    stream = broker.names.private_queue(name, "hoard", "1")
    conn = await aio_pika.connect(dev_settings.amqp_url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(stream, durable=True, arguments={"x-queue-type": "stream"})
        await q.bind(broker.names.models_exchange)
        feed = broker.names.private_queue(name, "models", "1")
        await ch.declare_queue(feed, exclusive=True)

        def effective(queue: str) -> dict:
            info = api.get(f"/api/queues/%2F/{queue}") or {}
            return info.get("effective_policy_definition") or {}

        got: dict[str, dict] = {}

        async def applied() -> None:
            while not (effective(stream) and effective(feed)):
                await asyncio.sleep(0.2)
            got.update(stream=effective(stream), feed=effective(feed))

        await asyncio.wait_for(applied(), 30)
        assert got["stream"]["max-length-bytes"] == settings.broker.client_queue_max_bytes
        assert got["feed"]["max-length-bytes"] == settings.broker.client_queue_max_bytes
        assert got["feed"]["expires"] == int(settings.broker.client_queue_expires_seconds * 1000)
        await ch.queue_delete(stream)
    finally:
        await conn.close()
        remove_policies(api, broker.names)


async def test_guest_is_refused_for_a_broker_on_another_host(tmp_path):
    for url in ("amqp://guest:guest@broker.example:5672/", "amqps://broker.example/"):
        s = load_settings(amqp_url=url, state_dir=tmp_path)
        with pytest.raises(BrokerUnavailable) as exc:
            await connect(s, timeout=0.5)
        assert "qflare broker setup" in str(exc.value) and "\n" not in str(exc.value)


def test_the_management_api_is_a_setting_derived_from_the_amqp_url_and_never_shows_its_password(tmp_path):
    s = load_settings(amqp_url="amqps://admin:s3cret@broker.example:5671/prod", state_dir=tmp_path)
    api = ManagementApi.from_settings(s)
    assert api.base_url == "https://broker.example:15672" and api.user == "admin" and api.ssl_context is not None
    assert "s3cret" not in repr(api)
    s = load_settings(amqp_url="amqp://guest:guest@127.0.0.1:5672/", state_dir=tmp_path,
                      broker={"management_url": "http://mgr:pw2@127.0.0.1:1/"})
    api = ManagementApi.from_settings(s)
    assert api.base_url == "http://127.0.0.1:1" and (api.user, api.password) == ("mgr", "pw2")
    with pytest.raises(BrokerAdminError) as exc:
        api.request("GET", "/api/overview")
    assert "pw2" not in str(exc.value) and "127.0.0.1:1" in str(exc.value)


async def test_a_device_user_holds_a_bounded_number_of_connections_and_a_vhost_a_bounded_number_of_queues(
        settings, api):
    """RabbitMQ 3.10's limits: max-connections per user, max-queues per vhost (on a vhost of the test's own)."""
    from urllib.parse import quote

    vhost = "v" + settings.broker.namespace
    api.request("PUT", f"/api/vhosts/{vhost}", {})
    try:
        api.request("PUT", f"/api/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
        url = settings.amqp_url.rstrip("/") + "/" + quote(vhost, safe="")
        s = settings.model_copy(update={"amqp_url": url, "broker": settings.broker.model_copy(
            update={"vhost_max_queues": 16})})
        names = Names(s.broker.namespace)
        assert apply_policies(api, names, s, vhost)[-1] == "max-queues=16"
        conn = await aio_pika.connect(url)
        try:
            ch = await conn.channel()
            for i in range(16):
                await ch.declare_queue(f"{names.namespace}.q{i}", exclusive=True)
            assert await refused(ch.declare_queue(f"{names.namespace}.q16", exclusive=True),
                                 aiormq.exceptions.ChannelPreconditionFailed)
        finally:
            await conn.close()
        password = create_device_user(api, names, "D", "pw", vhost, max_connections=1)
        dev_url = amqp_url_for(url, names.device_user("D"), password)
        first = await aio_pika.connect(dev_url)
        try:
            with pytest.raises(aiormq.exceptions.AMQPError):  # the broker closes it at open
                await aio_pika.connect(dev_url)
        finally:
            await first.close()
            delete_device_user(api, names, "D")
    finally:
        api.request("DELETE", f"/api/vhosts/{vhost}")

