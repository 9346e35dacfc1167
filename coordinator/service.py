"""The coordinator: enrollment, sessions, rotation, attestation admission and rounds.

Handlers are small async functions from a decoded request to a reply; every refusal is a
:class:`QflareError` with a reason code (the RPC plumbing turns it into a typed
``ErrorReply``) plus an event. Cheap checks (rate limits, policy, freshness) run before
any expensive crypto.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from pathlib import Path

import msgpack

import pqc
from broker.client import BrokerClient
from broker.messaging import TRANSIENT, serve_rpc
from broker.principals import limit_key, require_device, require_role
from common import attestation as attestation_rules
from common import handshake, health, metrics
from common.attestation import SIMULATED_WARNING, platform_dir
from common.crypto_policy import live_policy, require_live_kem
from common.events import decode_event
from common.settings import Settings
from common.state import private_dir
from coordinator import session_keys
from coordinator.operator import OperatorDesk, check_round_start
from coordinator.ratelimit import RateLimiter
from coordinator.registry import Registry, SessionRecord, identity_meta_key, open_registry
from pqc.identity import Identity
from schemas import signing
from schemas.codec import CodecError, decode, encode, encode_fields
from schemas.messages import (
    AttestAccept,
    AttestationReport,
    AttestChallenge,
    AttestChallengeRequest,
    AttestRequest,
    CoordinatorKeys,
    EnrollAccept,
    EnrollClaim,
    EnrollConfirm,
    EnrollRequest,
    Event,
    GrantKey,
    GrantMac,
    KeyChain,
    KeyEpoch,
    KeyRotation,
    KeysRequest,
    Message,
    Ping,
    Pong,
    Revocation,
    RotationAccept,
    RotationRequest,
    RoundAbort,
    RoundOpen,
    RoundSpec,
    RoundStart,
    SessionAccept,
    SessionCall,
    SessionConfirm,
    SessionGrant,
    SessionHello,
    SessionRequest,
    Signed,
    StatusReply,
    StatusRequest,
)
from schemas.names import Names
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.coordinator")
VERSION = "0.1.0"

#: What the coordinator's request queue accepts (the broker dead-letters anything else).
#: Devices can write this queue, so nothing here steers rounds: operator requests have their
#: own queue (coordinator/operator.py).
REQUESTS: tuple[type[Message], ...] = (Ping, KeysRequest, EnrollRequest, Signed, SessionHello, RotationRequest,
                                       AttestChallengeRequest, AttestRequest, SessionCall)
META_ENCLAVE_REPORT = "enclave_report"
META_ROUND = "last_round_id"
META_ROTATIONS = "coordinator_rotations"
META_PLAN = "round_plan"  # the running RoundStart and its first round id, until it ends
META_CURRENT = "round_current"  # the spec of the round last opened
#: Events that end a round (the enclave's; the coordinator records them and moves on).
ROUND_END_EVENTS = ("round.completed", "round.failed", "round.cancelled")
#: Requests only a broker user playing this role may send (broker.roles; docs/security.md);
#: every operator request, on its own queue, is checked by coordinator/operator.py.
ROLE_OF: dict[type[Message], tuple[str, str]] = {AttestRequest: ("enclave", "attestation"),
                                                  AttestChallengeRequest: ("enclave", "attestation")}
#: The round driver's lease in the registry: of several coordinators one runs the stored plan,
#: renewing every third of this; when it dies, another takes the plan over within this long.
ROUND_LEASE = "round_driver"
ROUND_LEASE_SECONDS = 15.0
#: How long `coordinator rotate-keys` waits for a running coordinator to answer before rotating.
ROTATE_PING_SECONDS = 2.0


class GroupCommit:
    """Durable registry steps of concurrent requests, committed together.

    Every enrolment must reach the disk (``synchronous=FULL``: one fsync per commit, 2-5 ms
    here) before it is answered. Steps share one transaction and one fsync
    (:meth:`Registry.commit_group`), each in a savepoint of its own (its own outcome), and
    nobody is answered before the commit. The batch is committed once the event loop has gone
    ``ROUNDS`` times through the requests that were ready with the first step (those the
    broker delivered meanwhile join it): a lone enrolment waits microseconds, a burst shares
    the disk's cost (batches of 1-6 at 32 enrolments in flight over the broker here).
    """

    #: Event-loop iterations the first step waits for ready requests to reach their commit.
    ROUNDS = 3

    def __init__(self, registry: Registry, commit=None) -> None:
        self.registry = registry
        #: What commits a batch: ``commit_group`` (steps, savepoints, the durable connection) by
        #: default; ``record_sessions`` (session rows, one transaction) for the session batcher.
        self._commit = commit or registry.commit_group
        self._pending: list[tuple[object, asyncio.Future]] = []
        self._scheduled = False

    async def run(self, step):
        """``step()``'s result once committed with the others (its exception if it raised);
        for the session batcher ``step`` is a row and the result whether it was new."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((step, fut))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._later, self.ROUNDS - 1)
        return await fut

    def _later(self, rounds: int) -> None:
        if rounds > 0:
            asyncio.get_running_loop().call_soon(self._later, rounds - 1)
        else:
            self._flush()

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        try:
            results = self._commit([step for step, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: every step with it
            results = [exc] * len(batch)
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue  # its request was cancelled meanwhile
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


def coordinator_dir(settings: Settings) -> Path:
    return settings.state_dir / "coordinator"


def load_identity(settings: Settings) -> Identity:
    """The coordinator's long-term keys, created on first use."""
    return Identity.load_or_create(coordinator_dir(settings), settings.crypto.signature, settings.crypto.kem)


class Coordinator:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        require_live_kem(settings.crypto)
        self.settings = settings
        private_dir(settings.state_dir)
        self.identity = load_identity(settings)
        self.registry = registry or open_registry(settings)
        self.commits = GroupCommit(self.registry)
        #: Session rows of concurrent handshakes, one transaction for a burst (each row alone cost
        #: a commit: ~0.1 ms, a third of a kem-v2 session); each is answered once committed.
        self.session_rows = GroupCommit(self.registry, commit=self.registry.record_sessions)
        self.policy = live_policy(settings.crypto)
        rl = settings.rate_limits
        self.enroll_limits = RateLimiter(rl.enroll_per_device_per_s, rl.enroll_per_device_burst,
                                         rl.global_per_s, rl.global_burst)
        self.session_limits = RateLimiter(rl.session_per_device_per_s, rl.session_per_device_burst,
                                          rl.global_per_s, rl.global_burst)
        self.broker: BrokerClient | None = None
        self.broker_names = Names(settings.broker.namespace)
        #: Session keys live in the registry, wrapped under this key (coordinator/session_keys.py),
        #: so every coordinator of the namespace serves every session, and a restart keeps them.
        self.session_wrap = session_keys.wrapping_key(self.identity.kem_sk)
        #: Grant keys (handshake kem-v2) derive from this and the admitted enclave report, so
        #: every coordinator of the identity computes the same key without storing it.
        self.grant_root = handshake.grant_root(self.identity.kem_sk)
        #: Devices' kem-v3 MAC keys live in the registry wrapped under this key (a dump opens none).
        self.device_wrap = session_keys.device_wrapping_key(self.identity.kem_sk)
        #: (report, key, key id, report digest, enclave identity) for the admitted report
        self._grant_key: tuple[bytes, bytes, bytes, bytes | None, bytes] | None = None
        self._kems: dict[str, pqc.Kem] = {}  # by algorithm name: no lookup per handshake
        self._session_seconds = metrics.HANDSHAKE_SECONDS.labels("session")
        self._sessions_ok = metrics.SESSIONS.labels("ok")
        self.accepted_handshakes = frozenset(settings.crypto.accepted_handshakes)
        #: Grants are MACed for the enclave (kem-v2, kem-v3) when either is accepted.
        self.mac_grants = bool(self.accepted_handshakes & set(handshake.KEM_SUITES))
        #: MACs the attestation challenges (the same in every coordinator sharing the identity).
        self.challenge_key = attestation_rules.challenge_key(self.identity.kem_sk)
        #: The port /healthz, /readyz and /metrics listen on (set by :func:`run`), for the start line.
        self.http_port: int | None = None
        self._rounds_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        #: Sessions opened since the last ``sessions.opened`` event, by handshake.
        self._opened: collections.Counter[str] = collections.Counter()
        self._opened_since = time.monotonic()
        self._sessions_task: asyncio.Task | None = None
        #: This process among the coordinators sharing the registry (holder of leases).
        self.instance = f"{VERSION}-{secrets.token_hex(8)}"
        self._round_done: asyncio.Queue[Event] = asyncio.Queue()
        self.operator_desk = OperatorDesk(self)
        self._reconnected = asyncio.Event()  # the round driver asks the enclave again at once
        self.keys_message = signing.sign(self._keys(), self.identity.sig_alg, self.identity.sig_sk,
                                         self.identity.sig_pk)

    def _keys(self) -> CoordinatorKeys:
        i = self.identity
        return CoordinatorKeys(sig_alg=i.sig_alg, sig_pk=i.sig_pk, kem_alg=i.kem_alg, kem_pk=i.kem_pk,
                               issued_at=time.time())

    def _sign(self, msg: Message) -> Signed:
        return signing.sign(msg, self.identity.sig_alg, self.identity.sig_sk, self.identity.sig_pk)

    async def _event(self, type_: str, **kw) -> None:
        """Emit an event; a notification, so a broker outage does not fail what emits it."""
        if self.broker is not None:
            try:
                await self.broker.publisher.event(type_, **kw)
            except TRANSIENT as exc:
                log.info("event %s not sent: %s", type_, exc)

    async def _refuse(self, kind: str, err: QflareError, device_id: str | None) -> QflareError:
        counter = {"enrollment": metrics.ENROLLMENTS, "session": metrics.SESSIONS}.get(kind)
        if counter is not None:
            counter.labels(err.reason.value).inc()
        await self._event(f"{kind}.rejected.{err.reason.value}", device_id=device_id, reason=err.reason.value,
                          detail_text=err.detail[:200])
        self.registry.audit("coordinator", f"{kind}.rejected", device_id=device_id, reason=err.reason.value)
        log.log(logging.DEBUG if err.reason == Reason.RATE_LIMITED else logging.WARNING,  # no log flood
                "%s refused%s: %s %s", kind, f" for {device_id}" if device_id else "", err.reason.value,
                err.detail[:200])
        return err

    # --- lifecycle -----------------------------------------------------------------------

    def claim_namespace(self) -> None:
        """One coordinator identity per namespace: the registry records the first one's
        fingerprint, and a coordinator holding other keys refuses to start (devices would see
        its replies fail their pinned key, one in N, silently)."""
        ns = self.broker_names.namespace
        recorded = self.registry.claim_identity(ns, self.identity.sig_fp)
        if recorded != self.identity.sig_fp:
            raise QflareError(Reason.IDENTITY_CONFLICT, (
                f"namespace {ns} is served by coordinator {recorded[:16]}… but this one holds key "
                f"{self.identity.sig_fp[:16]}…: give every coordinator the same key directory "
                f"({coordinator_dir(self.settings)}), see docs/scaling.md"))

    async def _check_peers(self) -> None:
        """Coordinators already serving the namespace must hold this identity too, even when
        they keep another registry (a second state directory): ask one for its key."""
        assert self.broker is not None
        ch = await self.broker.connection.channel()
        try:
            q = await ch.declare_queue(self.broker.names.coordinator_queue, passive=True)
        finally:
            await ch.close()
        if not q.declaration_result.consumer_count:
            return
        rpc = await self.broker.rpc()
        try:
            chain = await rpc.call(self.broker.names.rpc_exchange, Names.COORDINATOR_KEY, KeysRequest(), KeyChain,
                                   self.settings.broker.rpc_timeout)
        except QflareError:
            return  # none answered in time (a peer just stopped): nothing to compare with
        keys = signing.unverified(decode(chain.current, Signed), CoordinatorKeys)
        peer_fp = pqc.fingerprint(keys.sig_pk, keys.sig_alg)
        if peer_fp != self.identity.sig_fp:
            raise QflareError(Reason.IDENTITY_CONFLICT, (
                f"namespace {self.broker.names.namespace} is served by coordinator {peer_fp[:16]}… but this one "
                f"holds key {self.identity.sig_fp[:16]}…: give every coordinator the same key directory and "
                "registry, see docs/scaling.md"))

    async def start(self) -> None:
        self.claim_namespace()
        self.broker = await BrokerClient.open(self.settings, name="qflare-coordinator")
        await self._check_peers()
        b = self.broker
        await b.channel.set_qos(prefetch_count=self.settings.coordinator.prefetch)
        await serve_rpc(b.channel, b.publisher, b.names.coordinator_queue, self.handle,
                        expected=REQUESTS, max_bytes=self.settings.broker.max_message_bytes)
        await serve_rpc(b.channel, b.publisher, b.names.operator_queue, self.operator_desk.handle,
                        expected=(Signed,), max_bytes=self.settings.broker.max_message_bytes)
        # round progress: the enclave announces each closed round on the events exchange
        q = await b.channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ROUND_END_EVENTS:
            await q.bind(b.names.events_exchange, key)
        await q.consume(self._on_round_event, no_ack=True)
        # Round events sent while we were away are lost to this (exclusive) queue: ask again.
        b.connection.reconnect_callbacks.add(lambda *_: self._reconnected.set())
        if self._has_plan() and self._claim_rounds():
            await self._resume_plan()
            if not self._driving():
                self.registry.release_lease(ROUND_LEASE, self.instance)
        self._watch_task = asyncio.create_task(self._watch_plan())
        self._sessions_task = asyncio.create_task(self._announce_sessions())
        await self._send_grant_key()
        log.warning(SIMULATED_WARNING, platform_dir(self.settings))
        if not self.operator_desk.pinned:
            log.warning("no operator key is pinned (operator.pinned_fingerprints): every operator request "
                        "will be refused; make one with `qflare operator init`")
        log.info("coordinator started: namespace %s, signature key %s, KEM key %s (%s), %d pinned operator key(s), "
                 "registry %s, HTTP port %s", b.names.namespace, self.identity.sig_fp, self.identity.kem_fp,
                 self.identity.kem_alg, len(self.operator_desk.pinned), self.registry.describe(),
                 self.http_port or "off",
                 extra={"namespace": b.names.namespace, "sig_fp": self.identity.sig_fp, "kem_fp": self.identity.kem_fp,
                        "http_port": self.http_port, "registry": self.registry.describe()})

    def readiness_checks(self) -> list[health.Check]:
        """What /readyz checks: the broker connection and a usable registry."""
        return [health.broker_check(lambda: self.broker),
                health.Check("registry", lambda: self.registry.get_meta(META_ROUND) and None)]  # a query answers

    async def _on_round_event(self, message) -> None:
        try:
            ev = decode_event(message.body, message.content_type)
        except CodecError:
            return
        if ev.round_id is not None:
            self._record_round_end(ev)
            log.info("round %d %s%s", ev.round_id, ev.type.removeprefix("round."),
                     "".join(f", {k} {v}" for k, v in ev.detail.items()))
        await self._round_done.put(ev)

    def _record_round_end(self, ev: Event) -> None:
        d = ev.detail
        status = ev.type.removeprefix("round.")
        accepted, accuracy, version = d.get("accepted"), d.get("accuracy"), d.get("version")
        self.registry.record_round_closed(
            ev.round_id, status, accepted=accepted if isinstance(accepted, int) else None,
            rejected=_parse_counts(d.get("rejected")), accuracy=accuracy if isinstance(accuracy, float) else None,
            version=version if isinstance(version, int) else None, reason=ev.reason)

    async def _announce_sessions(self) -> None:
        """Every ``events.sessions_every_seconds``: one ``sessions.opened`` with the count."""
        while True:
            await asyncio.sleep(self.settings.events.sessions_every_seconds)
            await self._flush_sessions_event()

    async def _flush_sessions_event(self) -> None:
        opened, self._opened = self._opened, collections.Counter()
        now = time.monotonic()
        since, self._opened_since = self._opened_since, now
        if opened:
            await self._event("sessions.opened", count=sum(opened.values()), kem_v3=opened[handshake.KEM_V3],
                              kem_v2=opened[handshake.KEM_V2],
                              sig_v1=opened[handshake.SIG_V1], seconds=round(now - since, 3))

    async def stop(self) -> None:
        if self._sessions_task:
            self._sessions_task.cancel()
            await self._flush_sessions_event()
        for task in (self._watch_task, self._rounds_task):
            if task:
                task.cancel()
        self.registry.release_lease(ROUND_LEASE, self.instance)  # another coordinator carries on at once
        if self.broker:
            await self.broker.close()
        self.registry.close()

    # --- dispatch ------------------------------------------------------------------------

    async def handle(self, msg: Message, caller: str | None = None) -> Message | bytes:
        """Route a request to its handler (``REQUESTS`` lists what the queue accepts); the
        answer, or its encoding where a hot path builds that directly (sessions).

        ``caller`` is the sender's broker-verified user: a role's requests come only from that
        role's users, and rate limits are keyed by it.
        """
        if type(msg) in ROLE_OF:
            role, kind = ROLE_OF[type(msg)]
            try:
                require_role(self.settings, role, caller)
            except QflareError as err:
                raise await self._refuse(kind, err, None) from None
        if isinstance(msg, EnrollRequest):
            return await self.enroll(msg, caller)
        if isinstance(msg, Signed):
            return await self.open_session(msg, caller)
        if isinstance(msg, SessionHello):
            return await self.open_kem_session(msg, caller)
        handlers = {
            Ping: self.ping, KeysRequest: self.keys, RotationRequest: self.rotate, AttestRequest: self.admit_enclave,
            AttestChallengeRequest: self.attest_challenge, SessionCall: self.session_call,
        }
        return await handlers[type(msg)](msg)

    async def ping(self, msg: Ping) -> Pong:
        return Pong(nonce=msg.nonce, service="coordinator", version=VERSION)

    async def keys(self, _: KeysRequest) -> KeyChain:
        return KeyChain(current=encode(self.keys_message), rotations=rotations(self.registry))

    # --- enrollment (docs/architecture.md step 2) ---------------------------------------------------

    async def enroll(self, req: EnrollRequest, caller: str | None = None) -> Signed | EnrollConfirm:
        with metrics.HANDSHAKE_SECONDS.labels("enrollment").time():
            try:
                return await self._enroll(req, caller)
            except QflareError as err:
                raise await self._refuse("enrollment", err, req.device_id) from None

    async def _enroll(self, req: EnrollRequest, caller: str | None) -> Signed | EnrollConfirm:
        require_device(self.broker_names, caller, req.device_id)
        if not self.enroll_limits.allow(limit_key(caller, req.device_id), time.monotonic()):
            raise QflareError(Reason.RATE_LIMITED, "too many enrollment requests")
        if req.coordinator_kem_fp != self.identity.kem_fp:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, "sealed to a key this coordinator does not hold")
        try:
            inner = pqc.open_sealed(self.identity.kem_sk, req.sealed, handshake.enroll_aad(req.device_id),
                                    policy=self.policy)
        except pqc.errors.PolicyError as exc:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, str(exc)) from None
        except pqc.errors.QflareCryptoError:
            raise QflareError(Reason.MALFORMED, "enrollment request does not open") from None
        signed = decode(inner, Signed)
        claim = signing.unverified(signed, EnrollClaim)
        if claim.device_id != req.device_id:
            raise QflareError(Reason.DEVICE_MISMATCH, "sealed claim names another device")
        self.policy.check_sig(claim.sig_alg)  # PolicyError carries reason unsupported_algorithm
        self.policy.check_kem(claim.kem_alg)
        if not handshake.is_fresh(claim.timestamp, time.time(), self.settings.crypto.freshness_seconds):
            raise QflareError(Reason.STALE, "enrollment timestamp outside the freshness window")
        if claim.reply_key is not None and not self.mac_grants:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, "handshakes kem-v2/kem-v3 are not accepted here "
                              "(crypto.accepted_handshakes)")
        existing = self.registry.get_device(claim.device_id)
        if existing is not None and existing.status == "revoked":
            raise QflareError(Reason.REVOKED, f"device {claim.device_id} is revoked")
        outcome = self.registry.check_token(claim.token, claim.device_id)
        # The same claim again, already served (a coordinator died before its reply or ack, and
        # the broker redelivered the request to another): answer it again, change nothing.
        repeat = (outcome == "token_used" and existing is not None and existing.sig_pk == claim.sig_pk
                  and existing.kem_pk == claim.kem_pk)
        if outcome != "ok" and not repeat:
            raise QflareError(Reason(outcome), "token refused")
        try:
            signing.verify(signed, EnrollClaim, claim.sig_alg, claim.sig_pk)
        except QflareError:
            raise
        except pqc.errors.QflareCryptoError as exc:
            raise QflareError(Reason.BAD_SIGNATURE, str(exc)) from None
        if repeat:
            self.registry.audit("coordinator", "enrollment.repeated", device_id=existing.device_id)
            return self._enroll_accept(existing, claim)
        nonce_window = self.settings.crypto.freshness_seconds * 2

        def burn_and_enroll():  # the nonce, the burn and the enrolment it pays for, together
            # kept in the step's transaction: no commit of its own, and undone with a refused step
            if not self.registry.remember_nonce_in_step(claim.nonce, window_seconds=nonce_window):
                raise QflareError(Reason.REPLAY, "enrollment nonce seen before")
            outcome = self.registry.consume_token(claim.token, claim.device_id)  # atomic burn: the final word
            if outcome != "ok":
                raise QflareError(Reason(outcome), "token refused")
            device = self.registry.enroll_device(claim.device_id, claim.sig_alg, claim.sig_pk, claim.kem_alg,
                                                 claim.kem_pk)
            if claim.reply_key is not None:  # kept even where kem-v3 is not (yet) accepted
                # kem-v3's device MAC key, from the reply key only this device and we know
                auth = handshake.device_auth_key(claim.reply_key, device.device_id, device.sig_fp)
                self.registry.set_device_auth(device.device_id, device.sig_fp, session_keys.wrap_device_key(
                    self.device_wrap, handshake.device_auth_aad(device.device_id, device.sig_fp), auth))
            return device

        device = await self.commits.run(burn_and_enroll)  # committed with concurrent enrolments
        metrics.ENROLLMENTS.labels("ok").inc()
        if existing is not None:  # re-enrolled with new keys: grants of the old ones end
            await self._key_epoch(device.device_id, device.enrolled_at, device.sig_fp)
        await self._event("device.enrolled", device_id=device.device_id, sig_fp=device.sig_fp)
        return self._enroll_accept(device, claim)

    def _enroll_accept(self, device, claim: EnrollClaim) -> Signed | EnrollConfirm:
        """Signed (sig-v1), or sealed under the claim's reply key (kem-v2): only this
        coordinator's KEM key opened the claim, so only it can answer under that key."""
        accept = EnrollAccept(
            device_id=device.device_id, request_nonce=claim.nonce, sig_fp=device.sig_fp,
            coordinator_sig_alg=self.identity.sig_alg, coordinator_sig_pk=self.identity.sig_pk,
            enclave_report=self.registry.get_meta(META_ENCLAVE_REPORT))
        if claim.reply_key is None:
            return self._sign(accept)
        return EnrollConfirm(device_id=device.device_id, sealed=handshake.seal_enroll_accept(
            claim.reply_key, device.device_id, encode(accept)))

    # --- sessions (step 3) ---------------------------------------------------------------

    async def open_session(self, signed: Signed, caller: str | None = None) -> SessionAccept:
        device_id = None
        with metrics.HANDSHAKE_SECONDS.labels("session").time():
            try:
                req = signing.unverified(signed, SessionRequest)
                device_id = req.device_id
                return await self._open_session(signed, req, caller)
            except CodecError as err:
                raise await self._refuse("session", err, device_id) from None
            except QflareError as err:
                raise await self._refuse("session", err, device_id) from None

    async def _open_session(self, signed: Signed, req: SessionRequest, caller: str | None) -> SessionAccept:
        now = time.time()
        require_device(self.broker_names, caller, req.device_id)
        if not self.session_limits.allow(limit_key(caller, req.device_id), time.monotonic()):
            raise QflareError(Reason.RATE_LIMITED, "too many session requests")
        if handshake.SIG_V1 not in self.accepted_handshakes:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, "handshake sig-v1 is not accepted here (crypto.accepted_handshakes)")
        device = self._active_device(req.device_id)
        self.policy.check_kem(req.eph_kem_alg)
        kem = pqc.get_kem(req.eph_kem_alg)
        if not handshake.is_fresh(req.timestamp, now, self.settings.crypto.freshness_seconds):
            raise QflareError(Reason.STALE, "session request outside the freshness window")
        signing.verify(signed, SessionRequest, device.sig_alg, device.sig_pk)
        if not self.registry.remember_nonce(req.nonce, window_seconds=self.settings.crypto.freshness_seconds * 2):
            raise QflareError(Reason.REPLAY, "session request seen before")
        try:
            ct, ss = kem.encapsulate(req.eph_pk)
        except (ValueError, pqc.errors.QflareCryptoError) as exc:
            raise QflareError(Reason.MALFORMED, f"ephemeral key refused: {exc}") from None
        session_id = secrets.token_hex(16)
        nonce = secrets.token_bytes(32)
        not_after = now + self.settings.crypto.session_ttl_seconds
        transcript = handshake.transcript_hash(encode(signed), ct, nonce, session_id)
        report = self.registry.get_meta(META_ENCLAVE_REPORT)
        grant = self._sign(SessionGrant(device_id=device.device_id, session_id=session_id, sig_alg=device.sig_alg,
                                        sig_pk=device.sig_pk, sig_fp=device.sig_fp, issued_at=now,
                                        not_after=not_after, transcript=transcript,
                                        enclave_digest=handshake.enclave_digest(report)))
        key = handshake.session_key(ss, req.nonce, nonce, transcript)
        self.registry.record_session(session_id, device.device_id, not_after, now,
                                     wrapped_key=session_keys.wrap(self.session_wrap, session_id, key))
        metrics.SESSIONS.labels("ok").inc()
        self._opened[handshake.SIG_V1] += 1
        return SessionAccept(device_id=device.device_id, session_id=session_id, ciphertext=ct, nonce=nonce,
                             grant=encode(grant), enclave_report=report)

    # --- sessions, handshake kem-v2 (docs/crypto.md, "KEM handshake") -----------------------

    def grant_key_for(self, report: bytes | None) -> tuple[bytes, bytes, bytes | None, bytes]:
        """(key, key id, report digest, enclave identity) for grants to the enclave of
        ``report`` (kem-v2). The key is per enclave (code and kept keys), not per report, so a
        restarted enclave keeps honouring grants issued before its restart.

        With no enclave admitted the key is one no enclave will ever be given: such grants
        are refused by any enclave.
        """
        cached = self._grant_key
        if cached is None or cached[0] != (report or b""):
            if report:
                r = signing.unverified(decode(report, Signed), AttestationReport)
                enclave = handshake.enclave_identity(r.measurement, r.kem_alg, r.kem_pk, r.sig_alg, r.sig_pk)
            else:
                enclave = b""
            key = handshake.grant_key(self.grant_root, enclave)
            cached = self._grant_key = (report or b"", key, handshake.grant_key_id(key),
                                        handshake.enclave_digest(report), enclave)
        return cached[1], cached[2], cached[3], cached[4]

    def _kem(self, alg: str) -> pqc.Kem:
        kem = self._kems.get(alg)
        if kem is None:
            kem = self._kems[alg] = pqc.get_kem(alg)
        return kem

    def _sealed_grant_key(self, report: bytes) -> tuple[bytes, bytes]:
        """(enclave identity, grant key sealed to the reported enclave's KEM key)."""
        r = signing.unverified(decode(report, Signed), AttestationReport)
        key, _, _, enclave = self.grant_key_for(report)
        return enclave, pqc.seal(r.kem_alg, r.kem_pk, key, handshake.grant_key_aad(enclave))

    async def _send_grant_key(self) -> None:
        """Give the admitted enclave (if any) this identity's grant key, signed, on its control
        queue: after a coordinator key rotation the key differs from the one it was admitted with."""
        report = self.registry.get_meta(META_ENCLAVE_REPORT)
        if not report or self.broker is None or not self.mac_grants:
            return
        enclave, sealed = self._sealed_grant_key(report)
        await self.broker.publisher.publish(self.broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY,
                                            self._sign(GrantKey(enclave=enclave, sealed=sealed,
                                                                issued_at=time.time())))

    async def open_kem_session(self, hello: SessionHello, caller: str | None = None) -> bytes:
        """The encoded ``SessionConfirm`` (the hot path answers with its bytes)."""
        with self._session_seconds.time():
            try:
                return await self._open_kem_session(hello, caller)
            except QflareError as err:
                raise await self._refuse("session", err, hello.device_id) from None

    async def _open_kem_session(self, hello: SessionHello, caller: str | None) -> bytes:
        """KEM authentication both ways and key confirmation; no signature made or checked.

        The coordinator decapsulates ``static_ct`` (only its static key can), encapsulates to
        the device's ephemeral key (forward secrecy) and to its enrolled KEM key (only the
        enrolled device can decapsulate), and proves itself by a MAC under a key from all
        three secrets. The grant is MACed under the attested enclave's grant key.
        """
        now = time.time()
        require_device(self.broker_names, caller, hello.device_id)
        if not self.session_limits.allow(limit_key(caller, hello.device_id), time.monotonic()):
            raise QflareError(Reason.RATE_LIMITED, "too many session requests")
        if hello.suite not in self.accepted_handshakes:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, f"handshake {hello.suite} is not accepted here "
                              "(crypto.accepted_handshakes)")
        if hello.coordinator_kem_fp != self.identity.kem_fp:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, "encapsulated to a key this coordinator does not hold")
        v3 = hello.suite == handshake.KEM_V3
        if v3:  # the device row, its MAC key and the enclave's report in one statement
            found = self.registry.session_inputs(hello.device_id, META_ENCLAVE_REPORT)
            device = self._require_active(found[0] if found else None, hello.device_id)
            report = found[2] if found else None
            auth_key = self._device_auth_key(device, found[1] if found else None)
            if hello.auth_tag is None or not handshake.tags_equal(hello.auth_tag, handshake.hello_tag(
                    auth_key, hello.suite, hello.device_id, hello.coordinator_kem_fp, hello.static_ct,
                    hello.eph_kem_alg, hello.eph_pk, hello.nonce, hello.timestamp)):
                raise QflareError(Reason.BAD_SIGNATURE, "session hello fails the device's MAC")
        else:
            device = self._active_device(hello.device_id)
            report = self.registry.get_meta(META_ENCLAVE_REPORT)
        self.policy.check_kem(hello.eph_kem_alg)
        if not handshake.is_fresh(hello.timestamp, now, self.settings.crypto.freshness_seconds):
            raise QflareError(Reason.STALE, "session request outside the freshness window")
        try:
            ss_static = self._kem(self.identity.kem_alg).decapsulate(self.identity.kem_sk, hello.static_ct)
            eph_ct, ss_eph = self._kem(hello.eph_kem_alg).encapsulate(hello.eph_pk)
            if v3:
                device_ct, ss_device = None, auth_key
            else:
                device_ct, ss_device = self._kem(device.kem_alg).encapsulate(device.kem_pk)
        except (ValueError, pqc.errors.QflareCryptoError) as exc:
            raise QflareError(Reason.MALFORMED, f"KEM input refused: {exc}") from None
        session_id = handshake.kem_session_id(hello.nonce)
        nonce = secrets.token_bytes(32)
        not_after = now + self.settings.crypto.session_ttl_seconds
        if v3:
            transcript = handshake.kem_v3_transcript(hello.auth_tag, eph_ct, nonce, session_id)
        else:
            transcript = handshake.kem_transcript(encode(hello), eph_ct, device_ct, nonce, session_id)
        gkey, key_id, digest, _ = self.grant_key_for(report)
        # encode_fields: every field is ours or the registry's, already valid (no model, no re-validation)
        body = encode_fields(SessionGrant, {
            "device_id": device.device_id, "session_id": session_id, "sig_alg": device.sig_alg,
            "sig_pk": device.sig_pk, "sig_fp": device.sig_fp, "issued_at": now, "not_after": not_after,
            "transcript": transcript, "enclave_digest": digest})
        grant = encode_fields(GrantMac, {"body": body, "key_id": key_id, "tag": handshake.grant_tag(gkey, body)})
        final = handshake.kem_final_transcript(transcript, grant, digest)
        derive = handshake.kem_v3_session_keys if v3 else handshake.kem_session_keys
        key, confirm_key = derive(ss_eph, ss_static, ss_device, hello.nonce, nonce, final)
        if not await self.session_rows.run((session_id, device.device_id, not_after, now,
                                            session_keys.wrap(self.session_wrap, session_id, key))):
            raise QflareError(Reason.REPLAY, "session request seen before")  # its nonce names a session
        self._sessions_ok.inc()
        self._opened[hello.suite] += 1
        # the reply's encoding at once (encode_fields: every field ours, valid, in declaration
        # order; tests/test_kem_v3_handshake.py re-encodes it), not a model then its dump
        return encode_fields(SessionConfirm, {
            "suite": hello.suite, "device_id": device.device_id, "session_id": session_id, "eph_ct": eph_ct,
            "device_ct": device_ct, "nonce": nonce, "grant": grant, "enclave_report": report,
            "confirm": handshake.confirm_tag(confirm_key, final)})

    def _active_device(self, device_id: str):
        """The enrolled, active device a session is asked for, or refuse (not_enrolled, revoked)."""
        return self._require_active(self.registry.get_device(device_id), device_id)

    def _device_auth_key(self, device, wrapped: bytes | None) -> bytes:
        """The device's kem-v3 MAC key, or refuse (unsupported_algorithm: the device falls back
        to kem-v2) when none is kept for its current signature key: enrolled before kem-v3 or
        with sig-v1, or its keys rotated since."""
        key = None if wrapped is None else session_keys.unwrap_device_key(
            self.device_wrap, handshake.device_auth_aad(device.device_id, device.sig_fp), wrapped)
        if key is None:
            raise QflareError(Reason.UNSUPPORTED_ALGORITHM, f"no kem-v3 key for device {device.device_id} "
                              "(enrolled before kem-v3, or its keys rotated): use kem-v2")
        return key

    def _require_active(self, device, device_id: str):
        if device is None:
            raise QflareError(Reason.NOT_ENROLLED, f"device {device_id} is not enrolled")
        if device.status != "active":
            raise QflareError(Reason.REVOKED, f"device {device_id} is revoked")
        return device

    # --- control traffic under the session key ----------------------------------------

    async def session_call(self, call: SessionCall) -> SessionCall:
        """Open a device's control request, answer it under the same key (any coordinator
        sharing the registry can: the session, its key and its last sequence live there)."""
        live = self.registry.get_session(call.session_id)
        key = live and live.wrapped_key and session_keys.unwrap(self.session_wrap, call.session_id, live.wrapped_key)
        if live is None or not key:  # none, from before the keys were kept, or under a rotated key
            raise QflareError(Reason.SESSION_UNKNOWN, "open a new session")
        device = self.registry.get_device(live.device_id)
        if device is None or device.status != "active":
            raise QflareError(Reason.REVOKED, live.device_id)
        if time.time() > live.not_after:
            raise QflareError(Reason.SESSION_EXPIRED, "open a new session")
        if call.seq <= live.last_seq:
            raise QflareError(Reason.REPLAY, f"sequence {call.seq} already used")
        payload = handshake.open_call(key, call.session_id, call.seq, handshake.TO_COORDINATOR, call.ciphertext)
        if payload is None:
            raise QflareError(Reason.BAD_SIGNATURE, "session call does not authenticate")
        if not self.registry.advance_session(call.session_id, call.seq):  # atomic across coordinators
            raise QflareError(Reason.REPLAY, f"sequence {call.seq} already used")
        request = decode(payload, (StatusRequest,))
        reply = self._status(device, live, request)
        return SessionCall(session_id=call.session_id, seq=call.seq, ciphertext=handshake.seal_call(
            key, call.session_id, call.seq, handshake.TO_DEVICE, encode(reply)))

    def _status(self, device, live: SessionRecord, request: StatusRequest) -> StatusReply:
        report = self.registry.get_meta(META_ENCLAVE_REPORT)
        kem_fp = None
        if report:
            r = signing.unverified(decode(report, Signed), AttestationReport)
            kem_fp = pqc.fingerprint(r.kem_pk, r.kem_alg)
        return StatusReply(device_id=device.device_id, status=device.status, session_not_after=live.not_after,
                           last_round_id=int(self.registry.get_meta(META_ROUND) or b"0"), enclave_kem_fp=kem_fp)

    # --- device key rotation -------------------------------------------------------------

    async def rotate(self, req: RotationRequest) -> Signed:
        device_id = None
        try:
            old_signed = decode(req.claim, Signed)
            claim = signing.unverified(old_signed, KeyRotation)
            device_id = claim.device_id
            device = self.registry.get_device(claim.device_id)
            if device is None:
                raise QflareError(Reason.NOT_ENROLLED, claim.device_id)
            if device.status != "active":
                raise QflareError(Reason.REVOKED, claim.device_id)
            if not handshake.is_fresh(claim.timestamp, time.time(), self.settings.crypto.freshness_seconds):
                raise QflareError(Reason.STALE, "rotation request outside the freshness window")
            self.policy.check_sig(claim.sig_alg)
            self.policy.check_kem(claim.kem_alg)
            signing.verify(old_signed, KeyRotation, device.sig_alg, device.sig_pk)
            new_signed = decode(req.new_key_proof, Signed)
            if signing.verify(new_signed, KeyRotation, claim.sig_alg, claim.sig_pk) != claim:
                raise QflareError(Reason.BAD_SIGNATURE, "new-key proof does not match the claim")
            if not self.registry.remember_nonce(claim.nonce):
                raise QflareError(Reason.REPLAY, "rotation request seen before")
            device = self.registry.rotate_device_keys(claim.device_id, claim.sig_alg, claim.sig_pk,
                                                      claim.kem_alg, claim.kem_pk)
        except QflareError as err:
            raise await self._refuse("rotation", err, device_id) from None
        await self._key_epoch(device.device_id, device.rotated_at, device.sig_fp)
        await self._event("device.rotated", device_id=device.device_id, sig_fp=device.sig_fp)
        return self._sign(RotationAccept(device_id=device.device_id, sig_fp=device.sig_fp, request_nonce=claim.nonce))

    async def _key_epoch(self, device_id: str, not_before: float, sig_fp: str) -> None:
        """Tell the enclave the device changed keys: its grants from before are superseded
        (the registry already ended its sessions)."""
        assert self.broker is not None
        try:
            await self.broker.publisher.publish(self.broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY,
                                                self._sign(KeyEpoch(device_id=device_id, not_before=not_before,
                                                                    sig_fp=sig_fp)))
        except TRANSIENT as exc:  # its old grants then end at their expiry, at the latest
            log.error("key epoch of %s not sent to the enclave: %s", device_id, exc)

    # --- attestation admission (step 6) --------------------------------------------------

    async def attest_challenge(self, _: AttestChallengeRequest) -> AttestChallenge:
        """A single-use challenge for the enclave's next report (checked in :meth:`admit_enclave`)."""
        now = time.time()
        return AttestChallenge(challenge=attestation_rules.new_challenge(self.challenge_key, now),
                               expires_at=now + self.settings.crypto.freshness_seconds)

    async def admit_enclave(self, req: AttestRequest) -> Signed:
        """Admit a report signed by the trusted platform, for allowed code, answering a fresh
        challenge this coordinator issued, used once, and no older than the admitted report."""
        now, window = time.time(), self.settings.crypto.freshness_seconds
        try:
            platform = attestation_rules.trusted_platform_key(self.settings)
            if platform is None or platform != (req.platform_alg, req.platform_pk):
                raise QflareError(Reason.BAD_SIGNATURE, "report not signed by a trusted platform key")
            report = signing.verify(decode(req.report, Signed), AttestationReport, req.platform_alg, req.platform_pk)
            if report.measurement not in attestation_rules.allowed_measurements(self.settings):
                raise QflareError(Reason.MEASUREMENT_NOT_ALLOWED, (
                    f"{report.measurement}: a new enclave build? add it to the coordinator's "
                    "enclave.allowed_measurements (`qflare enclave measurement` prints it) and restart it"))
            issued = attestation_rules.challenge_issued_at(self.challenge_key, report.nonce)
            if issued is None:
                raise QflareError(Reason.BAD_SIGNATURE, "the report does not answer a challenge this coordinator issued")
            if not handshake.is_fresh(issued, now, window) or not handshake.is_fresh(report.created_at, now, window):
                raise QflareError(Reason.STALE, "the report or its challenge is outside the freshness window")
            admitted = self.registry.get_meta(META_ENCLAVE_REPORT)
            if admitted and signing.unverified(decode(admitted, Signed), AttestationReport).created_at > report.created_at:
                raise QflareError(Reason.STALE, "the report is older than the one already admitted")
            if not self.registry.remember_nonce(report.nonce, window_seconds=window * 2):
                raise QflareError(Reason.REPLAY, "the challenge was already answered")
        except (QflareError, CodecError) as err:
            raise await self._refuse("attestation", err, None) from None
        self.registry.set_meta(META_ENCLAVE_REPORT, req.report)
        self.registry.audit("coordinator", "enclave.admitted", measurement=report.measurement)
        grant_key = (self._sealed_grant_key(req.report)[1] if self.mac_grants
                     else None)
        await self._event("enclave.attested", measurement=report.measurement,
                          kem_fp=pqc.fingerprint(report.kem_pk, report.kem_alg),
                          sig_fp=pqc.fingerprint(report.sig_pk, report.sig_alg),
                          platform_fp=pqc.fingerprint(req.platform_pk, req.platform_alg), platform="simulated")
        return self._sign(AttestAccept(measurement=report.measurement, coordinator_sig_alg=self.identity.sig_alg,
                                       coordinator_sig_pk=self.identity.sig_pk,
                                       report_digest=attestation_rules.report_digest(req.report),
                                       challenge=report.nonce, grant_key=grant_key))

    # --- revocation ----------------------------------------------------------------------

    async def revoke(self, device_id: str, reason: str = "operator") -> None:
        await revoke_device(self.settings, device_id, reason, registry=self.registry, broker=self.broker,
                            identity=self.identity)

    # --- rounds --------------------------------------------------------------------------

    def device_status(self, device_id: str) -> str | None:
        """The registry status of a device ("active", "revoked"), None if never enrolled."""
        device = self.registry.get_device(device_id)
        return device.status if device else None

    def _driving(self) -> bool:
        return self._rounds_task is not None and not self._rounds_task.done()

    def _has_plan(self) -> bool:
        """A plan is stored (not decoded: one an older version stored may not decode)."""
        return bool(self.registry.get_meta(META_PLAN))

    def _claim_rounds(self) -> bool:
        return self.registry.claim_lease(ROUND_LEASE, self.instance, ROUND_LEASE_SECONDS)

    def running_plan(self) -> tuple[int, int] | None:
        """(first, last) round id of the plan being run, here or by another coordinator."""
        plan = self._stored_plan()  # a stored plan runs: its driver, or the next to take it over
        return (plan[1], plan[1] + plan[0].rounds - 1) if plan else None

    async def _watch_plan(self) -> None:
        """Keep the round driver's lease while driving; stop when the plan was cancelled
        through another coordinator (or the lease lost); take over a plan whose driver died."""
        while True:
            await asyncio.sleep(ROUND_LEASE_SECONDS / 3)
            try:
                if self._driving():
                    if not self._has_plan() or not self._claim_rounds():
                        log.info("round plan ended or taken over elsewhere; this coordinator stops driving it")
                        self._rounds_task.cancel()  # type: ignore[union-attr]
                elif self._has_plan() and self._claim_rounds():
                    log.info("taking over the stored round plan (its driver stopped renewing its lease)")
                    await self._resume_plan()
                    if not self._driving():
                        self.registry.release_lease(ROUND_LEASE, self.instance)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("round plan watch failed; retrying")

    def _stored_plan(self) -> tuple[RoundStart, int] | None:
        raw = self.registry.get_meta(META_PLAN)
        if not raw:
            return None
        try:
            plan = msgpack.unpackb(raw)
            return decode(plan["req"], RoundStart), plan["first"]
        except (CodecError, KeyError, TypeError, ValueError):
            return None  # stored by an older version; _resume_plan drops it

    async def start_rounds(self, req: RoundStart) -> int:
        """Run an authenticated, bounds-checked plan (coordinator/operator.py); its first round id."""
        if self._driving() or self._has_plan() or not self._claim_rounds():
            raise QflareError(Reason.INVALID_FIELD, "rounds are already running; cancel them first")
        first = int(self.registry.get_meta(META_ROUND) or b"0") + 1
        self.registry.set_meta(META_PLAN, msgpack.packb({"req": encode(req), "first": first}))
        self._rounds_task = asyncio.create_task(self._run_rounds(req, first))
        self._rounds_task.add_done_callback(_report_driver_end)
        return first

    async def cancel_rounds(self, reason: str) -> tuple[int | None, int]:
        """Stop the running plan and tell the enclave, signed, to close the open round as
        cancelled. Returns (the round stopped, how many rounds of the plan never ran)."""
        plan = self._stored_plan()
        if plan is None:
            raise QflareError(Reason.NO_ROUND, "no round plan is running")
        if self._driving():
            self._rounds_task.cancel()  # type: ignore[union-attr]
            try:
                await self._rounds_task  # type: ignore[misc]
            except asyncio.CancelledError:
                pass
        # driven by another coordinator: it sees the plan gone within a lease period and stops
        self.registry.set_meta(META_PLAN, b"")
        self.registry.release_lease(ROUND_LEASE, self.instance)
        req, first = plan
        current = int(self.registry.get_meta(META_ROUND) or b"0")
        round_id = current if current >= first else None  # None: its first round never opened
        skipped = first + req.rounds - 1 - current if round_id else req.rounds
        if round_id is not None:
            await self._abort_round(round_id, reason)
        log.info("round plan cancelled at round %s (%s); %d round(s) not run", round_id, reason, skipped)
        return round_id, skipped

    async def _abort_round(self, round_id: int, reason: str) -> None:
        """The signed control message that makes the enclave close ``round_id`` as cancelled."""
        assert self.broker is not None
        await self.broker.publisher.publish(self.broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY,
                                            self._sign(RoundAbort(round_id=round_id, issued_at=time.time(),
                                                                  reason=reason)))
        self.registry.record_round_closed(round_id, "cancelled", reason=reason)

    async def _resume_plan(self) -> None:
        """After a restart, carry on with an unfinished plan: the current round is opened
        again (the enclave answers at once if it already closed), then the rest.

        The plan is checked again against today's bounds: one that no longer passes (or that
        an older version stored without them, e.g. 10 000 rounds of a billion seconds) is
        dropped, and its open round cancelled, instead of wedging the round driver again.
        """
        raw, current = self.registry.get_meta(META_PLAN), self.registry.get_meta(META_CURRENT)
        if not raw:
            return
        try:
            req, first = self._stored_plan()  # type: ignore[misc]
            spec = decode(current, RoundSpec) if current else None
            if spec is not None and spec.round_id < first:
                spec = None  # its driver stopped before the plan's first round opened
            # the bounds again; expected devices were checked at start (one revoked since only
            # stops sending, which its round's deadline bounds)
            check_round_start(req, self.settings, lambda _device: "active")
            if spec is not None and spec.deadline - time.time() > self.settings.operator.max_deadline_seconds:
                raise QflareError(Reason.INVALID_FIELD, "the open round's deadline is past operator.max_deadline_seconds")
        except (QflareError, KeyError, TypeError, ValueError) as exc:
            detail = exc.detail if isinstance(exc, QflareError) else type(exc).__name__
            self.registry.set_meta(META_PLAN, b"")
            self.registry.audit("coordinator", "round.plan.dropped", detail=detail)
            round_id = int(self.registry.get_meta(META_ROUND) or b"0")
            if round_id:
                await self._abort_round(round_id, "plan outside the bounds")
            log.error("dropped the stored round plan instead of resuming it: %s", detail)
            return
        if spec is None:
            log.info("starting the stored round plan at %d", first)
            self._rounds_task = asyncio.create_task(self._run_rounds(req, first))
            self._rounds_task.add_done_callback(_report_driver_end)
        elif spec.round_id < first + req.rounds:
            log.info("resuming rounds at %d", spec.round_id)
            self._rounds_task = asyncio.create_task(self._run_rounds(req, first, resume=spec))
            self._rounds_task.add_done_callback(_report_driver_end)
        else:
            self.registry.set_meta(META_PLAN, b"")  # it had run to its end

    async def _run_rounds(self, req: RoundStart, first: int, resume: RoundSpec | None = None) -> None:
        assert self.broker is not None
        start = resume.round_id if resume else first
        for round_id in range(start, first + req.rounds):
            if round_id != start and not self.registry.get_meta(META_PLAN):
                return  # cancelled through another coordinator while the last round closed
            fl = self.settings.fl  # fl.mode async: each round is a FedBuff window (docs/protocol.md)
            spec = resume if resume and round_id == resume.round_id else RoundSpec(
                round_id=round_id, deadline=time.time() + req.deadline_seconds, min_updates=req.min_updates,
                expected=req.expected, epochs=req.epochs, lr=req.lr, batch_size=req.batch_size, mode=fl.mode,
                buffer_size=fl.buffer_size if fl.mode == "async" else 1,
                max_staleness=fl.max_staleness if fl.mode == "async" else 0)
            self.registry.set_meta(META_ROUND, str(round_id).encode())
            self.registry.set_meta(META_CURRENT, encode(spec))
            self.registry.record_round_opened(round_id, spec.deadline, spec.min_updates, len(spec.expected))
            await self._send_round_open(spec)
            self.registry.audit("coordinator", "round.opened", round_id=round_id)
            log.info("%sround %d opened (plan %d..%d): deadline in %.0f s, min_updates %d, %s",
                     f"async (buffer {spec.buffer_size}, max staleness {spec.max_staleness}) "
                     if spec.mode == "async" else "", round_id, first,
                     first + req.rounds - 1, spec.deadline - time.time(), spec.min_updates,
                     f"{len(spec.expected)} expected device(s)" if spec.expected else "any device",
                     extra={"round_id": round_id, "deadline": spec.deadline, "min_updates": spec.min_updates})
            if not await self._await_close(spec, remaining=first + req.rounds - round_id - 1):
                break
        self.registry.set_meta(META_PLAN, b"")
        self.registry.release_lease(ROUND_LEASE, self.instance)

    async def _send_round_open(self, spec: RoundSpec) -> None:
        """Sign a fresh ``RoundOpen`` for ``spec`` and publish it until the broker confirms it.

        Sent again while a round waits for its close: the enclave opens a round once and, when
        it already closed it, says again how it ended.
        """
        await self.broker.publisher.publish_until_confirmed(
            self.broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY,
            self._sign(RoundOpen(spec=spec, issued_at=time.time())), what=f"round {spec.round_id} open")

    async def _await_close(self, spec: RoundSpec, remaining: int) -> bool:
        """Wait until the enclave reports ``spec`` closed; False if the operator's bound ran out.

        A close the coordinator did not hear (the enclave or the broker was away) is asked for
        again after every reconnect and every ``recovery.stall_report_seconds``, each time with
        a ``round.stalled`` warning; only past ``recovery.stall_limit_seconds`` of waiting is
        the rest of the plan cancelled.
        """
        r = self.settings.recovery
        wait = max(0.0, spec.deadline - time.time()) + r.stall_report_seconds
        stalled_since: float | None = None
        while True:
            outcome = await self._wait_round(spec.round_id, wait)
            if outcome == "closed":
                if stalled_since is not None:
                    log.info("round %d closed after the enclave came back", spec.round_id)
                return True
            now = time.monotonic()
            if outcome == "timeout":
                stalled_since = stalled_since if stalled_since is not None else now
                waited = now - stalled_since
                if waited >= r.stall_limit_seconds:
                    self.registry.audit("coordinator", "round.stalled", round_id=spec.round_id, outcome="cancelled")
                    self.registry.record_round_closed(spec.round_id, "stalled", reason=Reason.NO_ENCLAVE.value)
                    await self._event("round.stalled", round_id=spec.round_id, reason=Reason.NO_ENCLAVE.value,
                                      remaining=remaining, action="cancelled", waited=round(waited, 1))
                    log.error("round %d: no enclave closed it within recovery.stall_limit_seconds (%.0f s); "
                              "%d remaining rounds cancelled", spec.round_id, r.stall_limit_seconds, remaining)
                    return False
                await self._event("round.stalled", round_id=spec.round_id, reason=Reason.NO_ENCLAVE.value,
                                  remaining=remaining, action="waiting", waited=round(waited, 1))
                log.warning("round %d: no close from the enclave yet; asking again (cancelling the plan after "
                            "%.0f s more)", spec.round_id, r.stall_limit_seconds - waited)
            await self._send_round_open(spec)
            wait = max(0.0, spec.deadline - time.time()) + r.stall_report_seconds
            if stalled_since is not None:
                wait = min(wait, max(0.1, r.stall_limit_seconds - (time.monotonic() - stalled_since)))

    async def _wait_round(self, round_id: int, timeout: float) -> str:
        """"closed" when the enclave reported ``round_id`` completed or failed within ``timeout``,
        "reconnected" when our broker link came back meanwhile, else "timeout"."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if self._reconnected.is_set():
                self._reconnected.clear()
                return "reconnected"
            got = asyncio.ensure_future(self._round_done.get())
            nudge = asyncio.ensure_future(self._reconnected.wait())
            try:
                done, _ = await asyncio.wait({got, nudge}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                nudge.cancel()
                if not got.done():
                    got.cancel()
            if got in done and got.result().round_id == round_id:
                return "closed"
        return "timeout"


def _report_driver_end(task: asyncio.Task) -> None:
    """A round driver never ends silently: an error is logged with its traceback."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the round driver stopped on an error; restart the coordinator to resume the plan",
                  exc_info=task.exception())


def _parse_counts(text: object) -> dict[str, int]:
    """``"norm_bound=2,low_cosine=1"`` (the ``rejected`` detail of ``round.completed``) as a dict."""
    out: dict[str, int] = {}
    for part in text.split(",") if isinstance(text, str) else ():
        key, _, value = part.partition("=")
        if key and value.isdigit():
            out[key] = int(value)
    return out


def rotations(registry: Registry) -> list[bytes]:
    """Every coordinator key rotation so far, oldest first."""
    raw = registry.get_meta(META_ROTATIONS)
    return list(msgpack.unpackb(raw)) if raw else []


async def rotate_coordinator_keys(settings: Settings) -> tuple[str, str]:
    """Replace the coordinator's keys; the old key signs the announcement of the new one.

    Run it while the coordinator is stopped (it loads its keys at start). The signed
    announcement goes to the registry (served in every key chain) and to the enclave's
    control queue, so both devices and the enclave can follow the change.
    """
    old = load_identity(settings)
    broker = await BrokerClient.open(settings, name="qflare-rotate")
    try:  # a running coordinator keeps the old keys in memory: enrolments would fail until its restart
        await (await broker.rpc()).call(broker.names.rpc_exchange, Names.COORDINATOR_KEY, Ping(nonce=b""), Pong,
                                        ROTATE_PING_SECONDS)
    except QflareError as err:
        if err.reason != Reason.TIMEOUT:
            await broker.close()
            raise
    else:
        await broker.close()
        raise QflareError(Reason.BUSY, f"a coordinator is running in namespace {settings.broker.namespace!r}: stop "
                          "every coordinator first (they load their keys at start), then rotate, then start them")
    new = Identity.generate(old.sig_alg, old.kem_alg)
    statement = signing.sign(CoordinatorKeys(sig_alg=new.sig_alg, sig_pk=new.sig_pk, kem_alg=new.kem_alg,
                                             kem_pk=new.kem_pk, issued_at=time.time(), previous_sig_alg=old.sig_alg,
                                             previous_sig_pk=old.sig_pk), old.sig_alg, old.sig_sk, old.sig_pk)
    registry = open_registry(settings)
    try:
        chain = rotations(registry) + [encode(statement)]
        rewrap_device_keys(registry, old, new)
        registry.set_meta(META_ROTATIONS, msgpack.packb(chain, use_bin_type=True))
        archive = coordinator_dir(settings) / "previous" / old.sig_fp[:16]
        old.save(archive)
        new.save(coordinator_dir(settings))
        registry.set_meta(identity_meta_key(settings.broker.namespace), new.sig_fp.encode())
        registry.audit("operator", "coordinator.rotated", old_fp=old.sig_fp, new_fp=new.sig_fp)
        await broker.publisher.publish(broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY, statement)
        await broker.publisher.event("coordinator.rotated", old_fp=old.sig_fp, new_fp=new.sig_fp)
    finally:
        await broker.close()
        registry.close()
    return old.sig_fp, new.sig_fp


def rewrap_device_keys(registry: Registry, old: Identity, new: Identity) -> int:
    """Re-wrap every device's kem-v3 MAC key from ``old``'s KEM key to ``new``'s (a coordinator
    key rotation), in one transaction, so devices keep kem-v3 across it; how many."""
    old_wrap = session_keys.device_wrapping_key(old.kem_sk)
    new_wrap = session_keys.device_wrapping_key(new.kem_sk)
    n = 0
    with registry.transaction():
        for device_id, sig_fp, blob in registry.device_auth_rows():
            aad = handshake.device_auth_aad(device_id, sig_fp)
            key = session_keys.unwrap_device_key(old_wrap, aad, blob)
            if key is not None:
                registry.set_device_auth(device_id, sig_fp, session_keys.wrap_device_key(new_wrap, aad, key))
                n += 1
    return n


async def revoke_device(settings: Settings, device_id: str, reason: str = "operator", *,
                        registry: Registry | None = None, broker: BrokerClient | None = None,
                        identity: Identity | None = None) -> None:
    """Revoke at once: registry, a signed notice the enclave consumes, an event."""
    own_registry = registry is None
    registry = registry or open_registry(settings)
    identity = identity or load_identity(settings)
    own_broker = broker is None
    try:
        device = registry.revoke_device(device_id, reason)
        broker = broker or await BrokerClient.open(settings, name="qflare-revoke")
        notice = signing.sign(Revocation(device_id=device_id, revoked_at=time.time()), identity.sig_alg,
                              identity.sig_sk, identity.sig_pk)
        await broker.publisher.publish(broker.names.control_exchange, "enclave", notice)
        await broker.publisher.event("device.revoked", device_id=device_id, reason=reason, sig_fp=device.sig_fp)
        await asyncio.to_thread(_drop_broker_user, settings, device_id)
    finally:
        if own_broker and broker is not None:
            await broker.close()
        if own_registry:
            registry.close()


def _drop_broker_user(settings: Settings, device_id: str) -> None:
    """A revoked device loses its broker user too, if it had one (best effort)."""
    from broker.users import BrokerAdminError, ManagementApi, delete_device_user

    try:
        delete_device_user(ManagementApi.from_settings(settings), Names(settings.broker.namespace), device_id)
    except BrokerAdminError:
        pass  # no such user, or no management API: the registry and enclave still refuse it


async def run(settings: Settings) -> None:
    """``qflare coordinator run``: serve until cancelled."""
    coord = Coordinator(settings)
    c = settings.coordinator
    http = await health.serve("coordinator", coord.readiness_checks(), metrics.COORDINATOR, c.http_host,
                              c.http_port, "coordinator.http_port")
    coord.http_port = http.port if http else None
    try:
        await coord.start()
        await asyncio.Event().wait()
    finally:
        await coord.stop()
        if http:
            await http.stop()
