"""The enclave worker: attested keys, intake, round state, filters, aggregation, publishing.

Round life: the coordinator's signed ``RoundOpen`` opens a round on the current global
model (announced, signed, on the models fanout); updates are checked and stored durably
before their ack; the round closes when every expected device has sent one, or at the
deadline once the minimum is met; a round short of its minimum is reported as failed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

import pqc
from broker.client import BrokerClient
from broker.messaging import DEFERRED, TRANSIENT, consume
from broker.principals import require_role
from broker.topology import declare_shard_queues
from common import handshake, health, metrics
from common.attestation import SIMULATED_WARNING, local_coordinator_fingerprint, platform_dir
from common.chunks import max_update_chunks
from common.crypto_policy import live_policy, require_live_kem
from common.settings import ConfigError, Settings
from common.shards import shard_of
from common.state import private_dir
from common.task import TaskError
from common.training import TaskRunner, runner_for
from enclave_worker import aggregate as agg
from enclave_worker import (
    attestation,
    deadline,
    filters,
    intake,
    publisher,
    reputation,
    rootdata,
    staleness,
)
from enclave_worker import shards as sharding
from enclave_worker.defend import Defence, DefenceState, defend
from enclave_worker.reassembly import ChunkIntake
from enclave_worker.store import EnclaveStore
from schemas import signing
from schemas.codec import decode, encode
from schemas.messages import (
    AttestAccept,
    AttestationReport,
    AttestChallenge,
    AttestChallengeRequest,
    CoordinatorKeys,
    GlobalModel,
    GrantKey,
    KeyChain,
    KeyEpoch,
    KeysRequest,
    Message,
    ModelChunk,
    PartialEnvelope,
    PeerAdmission,
    Revocation,
    RootData,
    RootDataSubmit,
    RoundAbort,
    RoundOpen,
    RoundResult,
    RoundSpec,
    ShardPartial,
    Signed,
    Update,
    UpdateChunk,
)
from schemas.names import Names
from schemas.reasons import QflareError, Reason

log = logging.getLogger("qflare.enclave")

#: Updates committed (one fsync) and acked together; a batch also closes after FLUSH_DELAY.
FLUSH_BATCH = 32
FLUSH_DELAY = 0.005


#: Updates sampled for the cosine filter's median reference when streaming a round.
REFERENCE_SAMPLE = 32
#: Coordinates of the sampled updates read at once for that median: the reference of a
#: 25 M-parameter model costs 32 × 4 MiB at a time, not 32 whole updates (3.2 GB).
REFERENCE_BLOCK = 1 << 20


#: Floats defend() holds per pair of a round's updates, at most: its k x k Gram matrix in
#: float64 and the copies its steps make of it (10-11.3 measured with tracemalloc; 4.0 GB peak
#: RSS for 10,000 updates of 1,058 floats, 42 MB of them the updates). Quadratic in k: this,
#: not k x d, bounds a round of many devices.
DEFEND_FLOATS_PER_PAIR = 12


def defend_floats(k: int, d: int) -> int:
    """Floats the robust defence holds for ``k`` updates of ``d`` floats (``fl.defend_max_floats``)."""
    return k * d + DEFEND_FLOATS_PER_PAIR * k * k


def reference_by_blocks(load_slice, picks, d: int, block: int = REFERENCE_BLOCK) -> np.ndarray:
    """The coordinate-wise median of the ``picks`` updates, ``block`` coordinates at a time."""
    out = np.empty(d, dtype=np.float32)
    for a in range(0, d, block):
        b = min(d, a + block)
        out[a:b] = filters.robust_reference(np.stack([load_slice(int(i), a, b) for i in picks]))
    return out


def close_round(deltas: np.ndarray, weights: np.ndarray, fl) -> tuple[np.ndarray | None, filters.ScreenResult]:
    """Screen the round's updates and aggregate the survivors (pure; no I/O)."""
    verdict = filters.screen(deltas, weights, max_norm=fl.max_norm, norm_median_multiple=fl.norm_median_multiple,
                             min_cosine=fl.min_cosine)
    keep = verdict.accepted
    if not keep.any():
        return None, verdict
    params = {"trimmed_mean": {"beta": fl.trim_beta}, "multi_krum": {"f": fl.krum_f}}.get(fl.aggregator, {})
    if fl.aggregator == "multi_krum":
        params["f"] = min(fl.krum_f, max(0, int(keep.sum()) - 3))
    return agg.aggregate(fl.aggregator, deltas[keep], weights[keep], **params), verdict


def close_round_streaming(load, n: int, weights: np.ndarray, fl, sample: int = REFERENCE_SAMPLE,
                          norms: np.ndarray | None = None, load_slice=None,
                          d: int | None = None) -> tuple[np.ndarray | None, filters.ScreenResult]:
    """FedAvg with the same filters, holding O(sample × d) floats whatever the round size.

    Pass 1 streams the norms (skipped when ``norms`` were computed at intake); the cosine reference is the coordinate-wise median of up to
    ``sample`` norm survivors (evenly spaced, so deterministic); pass 2 streams the cosine
    test and a running weighted mean. With ``n <= sample`` the result equals
    :func:`close_round`'s.
    """
    if norms is None:
        norms = np.array([float(np.linalg.norm(load(i).astype(np.float64))) for i in range(n)])
    accepted = filters.norm_verdict(norms, fl.max_norm, fl.norm_median_multiple)
    reasons: list[str | None] = [None if ok else filters.REASON_NORM for ok in accepted]
    survivors = np.flatnonzero(accepted)
    reference = None
    if fl.min_cosine is not None and survivors.size >= filters.MIN_UPDATES_FOR_MEDIAN:
        picks = survivors[np.linspace(0, survivors.size - 1, min(sample, survivors.size)).astype(int)]
        if load_slice is not None and d is not None:
            reference = reference_by_blocks(load_slice, picks, d)
        else:
            reference = filters.robust_reference(np.stack([load(int(i)) for i in picks]))
    running = agg.RunningFedAvg()
    for i in survivors:
        delta = load(int(i))
        if reference is not None and filters.cosine_to_reference(delta[None, :], reference)[0] < fl.min_cosine:
            accepted[i] = False
            reasons[i] = filters.REASON_COSINE
            continue
        running.add(delta, float(weights[i]))
    verdict = filters.ScreenResult(accepted=accepted, reasons=reasons)
    return (running.result() if running.count else None), verdict


class Enclave:
    def __init__(self, settings: Settings, initial: tuple[np.ndarray, str] | None = None) -> None:
        """``initial`` (parameters, layout id) replaces the task's model, e.g. for benchmarks."""
        require_live_kem(settings.crypto)
        self.settings = settings
        self.code = attestation.measurement()
        private_dir(settings.state_dir)
        self.platform_dir = platform_dir(settings)
        self.platform = attestation.platform_identity(self.platform_dir, legacy=settings.state_dir / "platform")
        self.identity = attestation.load_enclave_keys(settings, self.platform, self.code)
        #: Sharded enclaves (docs/scaling.md): this worker screens the devices whose
        #: ``shard_of`` is ``shard``; shard 0 is also the root. One shard: today's enclave.
        self.shards, self.shard = settings.enclave.shards, settings.enclave.shard
        self._enclave_dir = settings.state_dir / "enclave"
        if self.shards > 1:  # the keys are shared (enclave/keys), the state is each shard's own
            self._enclave_dir = self._enclave_dir / f"shard-{self.shard}"
        self.store = EnclaveStore(self._enclave_dir)
        self.policy = live_policy(settings.crypto)
        #: The task (common/task.py): the initial model and the evaluation; loaded only when needed.
        self.task: TaskRunner | None = None
        if initial is None or settings.fl.evaluate:
            self.task = runner_for(settings.fl.task)
        if initial is None:
            initial = (self.task.initial_params(), self.task.layout_id)
        self.layout_id = initial[1]
        latest = self.store.latest_model()
        if latest is None:
            latest = (0, initial[0])
            self.store.save_model(0, None, latest[1], None)
        if latest[1].shape != initial[0].shape:
            raise TaskError(f"the enclave's stored model has {latest[1].shape[0]} parameters, the task's "
                            f"{initial[0].shape[0]}: another task's state is in {settings.state_dir}")
        self.version, self.params = latest
        #: The coordinator key this enclave obeys, from its settings (never from the network).
        self.pinned_coordinator = settings.enclave.coordinator_fingerprint or local_coordinator_fingerprint(settings)
        if self.pinned_coordinator is None:
            raise ConfigError("the enclave pins its coordinator: set enclave.coordinator_fingerprint "
                              "(QFLARE_ENCLAVE__COORDINATOR_FINGERPRINT; `qflare coordinator fingerprint` prints it)")
        #: Trusted coordinator signature keys by fingerprint, reached from the pinned one through
        #: the signed rotation chain: the current key, and rotated-out keys, which vouch only for
        #: grants they issued before their rotation (intake.CoordinatorKey).
        self.coordinator_keys: dict[str, intake.CoordinatorKey] = {}
        self.current_coordinator: str | None = None
        self.key_epochs: dict[str, float] = self.store.key_epochs()
        self.report_digests: frozenset[bytes] = frozenset(self.store.reports(self.identity.kem_fp))
        self._last_round_open = 0.0  # issued_at of the newest RoundOpen obeyed
        self._round_opened_at: float | None = None  # when the open round opened (store time)
        #: Grant keys (handshake kem-v2) by key id, for this enclave (its code and kept keys):
        #: from the admission, then from each coordinator start (a rotated coordinator key
        #: derives another; the previous one then vouches only for grants issued before).
        self.grant_keys: dict[bytes, intake.GrantKeyEntry] = {}
        self.enclave_identity = handshake.enclave_identity(self.code, self.identity.kem_alg, self.identity.kem_pk,
                                                           self.identity.sig_alg, self.identity.sig_pk)
        self.broker: BrokerClient | None = None
        #: The port /healthz, /readyz and /metrics listen on (set by :func:`run`), for the start line.
        self.http_port: int | None = None
        self.round: RoundSpec | None = None
        self.lock = asyncio.Lock()
        self._revoked: set[str] = self.store.revoked()
        self._senders: dict[int, set[str]] = {}  # round id -> devices with a stored update
        self._pending: list[tuple[object, dict | None]] = []  # handled, not yet committed and acked
        self._flusher: asyncio.Task | None = None
        self._deadline: asyncio.Task | None = None
        self._restarted_at: float | None = None  # set when a start resumed open rounds
        ch = settings.chunking
        self.max_chunks = max_update_chunks(int(self.params.shape[0]), ch.chunk_bytes)
        #: Seconds per intake stage (intake.Stages), for `qflare bench round`.
        self.stages = intake.Stages()
        self.store.stages = self.stages  # its writer threads count the segment writes as "store"
        self.chunks = ChunkIntake(max_in_progress=ch.max_in_progress, timeout=ch.assembly_timeout_seconds,
                                  max_chunks=self.max_chunks, context=self._context, seen=self.store.has_update,
                                  accept=self._accept_chunked, reject=self._reject_chunked, quiet=self._quiet,
                                  stages=self.stages)
        self._expiry: asyncio.Task | None = None
        self._acking: set[asyncio.Task] = set()
        #: The root's open round: the partials taken, its own part once closed, the wait for the rest.
        self._book: sharding.PartialBook | None = None
        self._own: ShardPartial | None = None
        self._combining: tuple[RoundSpec, float] | None = None
        self._partial_timer: asyncio.Task | None = None
        self._admission: PeerAdmission | None = None
        self._expected: tuple[int | None, frozenset[str]] = (None, frozenset())
        self.defence_state = DefenceState(reputation.load(self._enclave_dir),
                                          reputation.load_trust_on(self._enclave_dir))
        stored_root = rootdata.load(self._enclave_dir, self.identity.kem_sk, self.identity.kem_fp)
        self.root: tuple[float, np.ndarray, np.ndarray] | None = (
            (stored_root[0].issued_at, stored_root[1], stored_root[2]) if stored_root else None)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, attest_timeout: float = 60.0) -> None:
        self.broker = await BrokerClient.open(self.settings, name="qflare-enclave")
        await self._attest(attest_timeout)
        b = self.broker
        for round_id, spec in self.store.open_rounds():
            self._restarted_at = time.time()  # its updates may still be on their way: see deadline.py
            await self._resume(decode(spec, RoundSpec))
        metrics.MODEL.version = self.version
        mb = self.settings.broker.max_message_bytes
        control_queue, updates_queue = b.names.enclave_control_queue, b.names.updates_queue
        if self.shards > 1:
            await declare_shard_queues(b.channel, self.settings, self.shard)
            await consume(b.channel, b.publisher, b.names.shard_queue(self.shard, "peers"), self._on_peer,
                          expected=PeerAdmission, max_bytes=mb)
            await self._tell_peers()
            if self.shard == 0:
                await consume(b.channel, b.publisher, b.names.partials_queue, self._on_partial,
                              expected=PartialEnvelope, max_bytes=mb)
            else:
                control_queue = b.names.shard_queue(self.shard, "control")
                updates_queue = b.names.shard_queue(self.shard, "updates")
                await consume(b.channel, b.publisher, b.names.shard_queue(self.shard, "models"), self._on_model,
                              expected=(Signed, ModelChunk), max_bytes=mb)
        await consume(b.channel, b.publisher, control_queue, self._on_control, expected=Signed,
                      max_bytes=mb)
        # Chunks of an update stay unacked until it is whole and durable: the window must hold
        # every update being reassembled, plus the usual prefetch for one-message updates.
        updates_channel = await b.connection.channel()
        await updates_channel.set_qos(
            prefetch_count=self.settings.broker.prefetch + self.settings.chunking.max_in_progress * self.max_chunks)
        await consume(updates_channel, b.publisher, updates_queue, self._on_update_message,
                      expected=(Update, UpdateChunk), max_bytes=mb)
        self._expiry = asyncio.create_task(self.chunks.run_expiry())
        log.warning(SIMULATED_WARNING, self.platform_dir)
        log.info("enclave started: namespace %s, measurement %s, KEM key %s (%s), signature key %s, model version %d, "
                 "HTTP port %s%s", b.names.namespace, self.code, self.identity.kem_fp, self.identity.kem_alg,
                 self.identity.sig_fp, self.version, self.http_port or "off",
                 f", shard {self.shard} of {self.shards}" if self.shards > 1 else "",
                 extra={"namespace": b.names.namespace, "measurement": self.code, "kem_fp": self.identity.kem_fp,
                        "sig_fp": self.identity.sig_fp, "platform_fp": self.platform.sig_fp,
                        "model_version": self.version, "http_port": self.http_port})

    def readiness_checks(self) -> list[health.Check]:
        """What /readyz checks: the broker connection, admission by the coordinator, the store."""
        return [health.broker_check(lambda: self.broker),
                health.Check("attested", lambda: None if self.coordinator_keys else
                             "not admitted by the coordinator yet"),
                health.Check("store", lambda: None if self.store.db.execute("SELECT 1").fetchone() else "no answer")]

    async def _attest(self, timeout: float) -> None:
        """Be admitted by the pinned coordinator, retrying until it answers: follow its key
        chain from the pin, answer a fresh challenge, check the admission binds our report."""
        assert self.broker is not None
        rpc = await self.broker.rpc()
        names = self.broker.names
        end = time.monotonic() + timeout
        while True:
            try:
                chain = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, KeysRequest(), KeyChain, 5.0)
                current, retired = handshake.walk_key_chain(chain.current, chain.rotations, self.pinned_coordinator)
                challenge = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, AttestChallengeRequest(),
                                           AttestChallenge, 5.0)
                req = attestation.attest_request(self.platform, self.identity, self.code, challenge.challenge)
                signed = await rpc.call(names.rpc_exchange, Names.COORDINATOR_KEY, req, Signed, 5.0)
                break
            except QflareError as err:
                if err.reason != Reason.TIMEOUT:
                    raise
                if time.monotonic() > end:
                    raise QflareError(Reason.TIMEOUT, f"no coordinator admitted this enclave within {timeout:g}s "
                                      f"in namespace {names.namespace!r}: start `qflare coordinator "
                                      "run` there (enclave.attest_timeout_seconds)") from None
                log.info("waiting for the coordinator to admit this enclave...",
                         extra={"namespace": names.namespace})
        attestation.check_accept(signed, req, challenge.challenge, (current.sig_alg, current.sig_pk))
        for alg, pk, rotated_at in retired:
            self.coordinator_keys[pqc.fingerprint(pk, alg)] = intake.CoordinatorKey(alg, pk, rotated_at)
        self._trust(current.sig_alg, current.sig_pk)
        digest = handshake.enclave_digest(req.report)
        self._admission = PeerAdmission(report=req.report, accept=encode(signed))  # for the other shards
        self.store.add_report(digest, self.identity.kem_fp)
        self.report_digests = self.report_digests | {digest}
        log.info("admitted by coordinator %s (pinned %s)", self.current_coordinator[:16], self.pinned_coordinator[:16])
        accept = signing.unverified(signed, AttestAccept)
        if accept.grant_key is not None:
            self._take_grant_key(self.enclave_identity, accept.grant_key, time.time())

    def _take_grant_key(self, enclave: bytes, sealed: bytes, issued_at: float) -> None:
        """Keep a grant key the (verified) coordinator sealed to this enclave; an earlier key
        is retired at ``issued_at`` (it vouches only for grants issued before)."""
        if enclave != self.enclave_identity:
            log.info("grant key for another enclave ignored")
            return
        try:
            key = pqc.open_sealed(self.identity.kem_sk, sealed, handshake.grant_key_aad(enclave), policy=self.policy)
        except pqc.errors.QflareCryptoError as exc:
            log.warning("grant key from the coordinator does not open: %s", type(exc).__name__)
            return
        key_id = handshake.grant_key_id(key)
        if key_id in self.grant_keys:
            return
        for k, entry in list(self.grant_keys.items()):
            if entry.rotated_at is None:
                self.grant_keys[k] = entry._replace(rotated_at=issued_at)
            elif entry.rotated_at + self.settings.crypto.session_ttl_seconds < time.time():
                del self.grant_keys[k]  # every grant it vouched for has expired
        self.grant_keys[key_id] = intake.GrantKeyEntry(key)
        log.info("grant key %s accepted (handshake kem-v2)", key_id.hex())

    def _trust(self, alg: str, pk: bytes, *, rotated_at: float | None = None) -> None:
        """Make (alg, pk) the current coordinator key; the previous one is retired at ``rotated_at``."""
        fp = pqc.fingerprint(pk, alg)
        old = self.current_coordinator
        if old is not None and old != fp and rotated_at is not None:
            self.coordinator_keys[old] = self.coordinator_keys[old]._replace(rotated_at=rotated_at)
        self.coordinator_keys[fp] = intake.CoordinatorKey(alg, pk)
        self.current_coordinator = fp
        ttl = self.settings.crypto.session_ttl_seconds  # a retired key's grants have all expired by then
        for k, key in list(self.coordinator_keys.items()):
            if key.rotated_at is not None and key.rotated_at + ttl < time.time():
                del self.coordinator_keys[k]

    async def stop(self) -> None:
        if self._partial_timer:
            self._partial_timer.cancel()
        if self._deadline:
            self._deadline.cancel()
        if self._expiry:
            self._expiry.cancel()
        if self._flusher:
            self._flusher.cancel()
        if self.broker and not self.broker.connection.is_closed:
            try:  # a close waiting for the broker holds the lock: do not wait for it forever
                await asyncio.wait_for(self.lock.acquire(), 5.0)
            except TimeoutError:
                log.warning("stopping while a round close waits for the broker; it resumes at restart")
            else:
                try:
                    await self._flush()
                finally:
                    self.lock.release()
            await self._acked()
        if self.broker:
            await self.broker.close()
        self.store.close()

    # --- control -------------------------------------------------------------------------

    def _verify_coordinator(self, signed: Signed, expected: type[Message]) -> Message:
        """Control messages obey only the current coordinator key (a rotated-out one has no say)."""
        key = self.coordinator_keys.get(signed.signer) if signed.signer == self.current_coordinator else None
        if key is None:
            raise QflareError(Reason.BAD_SIGNATURE, "control message not signed by the current coordinator key")
        return signing.verify(signed, expected, key.alg, key.pk)

    async def _on_control(self, signed: Signed, raw) -> None:
        require_role(self.settings, "coordinator", raw.user_id)  # broker-verified sender, before any crypto
        inner_type = signing.unverified(signed, (RoundOpen, RoundAbort, Revocation, CoordinatorKeys, RootData,
                                                 KeyEpoch, GrantKey, RootDataSubmit))
        if isinstance(inner_type, RootDataSubmit):  # the operator's signature, checked against our own pins
            await self._take_root_data(signed)
            return
        msg = self._verify_coordinator(signed, type(inner_type))
        if isinstance(msg, GrantKey):
            self._take_grant_key(msg.enclave, msg.sealed, msg.issued_at)
            return
        if isinstance(msg, RootData):
            await self._take_root_data(msg)
            return
        if isinstance(msg, RoundAbort):
            async with self.lock:
                await self._abort_round(msg)
            return
        if isinstance(msg, CoordinatorKeys):  # a rotation, signed by the key it replaces
            self._trust(msg.sig_alg, msg.sig_pk, rotated_at=msg.issued_at)
            log.info("coordinator key rotated to %s", self.current_coordinator[:16])
            return
        if isinstance(msg, Revocation):
            self.store.revoke(msg.device_id, msg.revoked_at)
            self._revoked.add(msg.device_id)
            log.info("device %s revoked", msg.device_id)
            return
        if isinstance(msg, KeyEpoch):
            self.store.set_key_epoch(msg.device_id, msg.not_before)
            self.key_epochs[msg.device_id] = max(msg.not_before, self.key_epochs.get(msg.device_id, msg.not_before))
            log.info("device %s changed keys: its grants from before %.0f are superseded", msg.device_id,
                     msg.not_before)
            return
        now, skew = time.time(), self.settings.crypto.freshness_seconds
        if msg.issued_at > now + skew or msg.issued_at < self._last_round_open:
            log.warning("round %d open refused: issued_at %.0f is in the future or older than the last one obeyed",
                        msg.spec.round_id, msg.issued_at)
            return
        self._last_round_open = msg.issued_at
        async with self.lock:
            await self._open_round(msg.spec)

    async def _take_root_data(self, msg: RootData | Signed) -> None:
        """Keep the operator's sealed root data: the trusted reference of every later round."""
        try:
            if isinstance(msg, Signed):
                msg = rootdata.from_operator(msg, set(self.settings.operator.pinned_fingerprints),
                                             self.settings.crypto.freshness_seconds, time.time())
            x, y = rootdata.open_root(msg, self.identity.kem_sk, self.identity.kem_fp,
                                      newer_than=self.root[0] if self.root else None)
        except QflareError as err:
            log.warning("root data refused: %s %s", err.reason.value, err.detail)
            await self.broker.publisher.event(f"enclave.root_data.rejected.{err.reason.value}",
                                              reason=err.reason.value, detail_text=err.detail[:200])
            return
        rootdata.save(self._enclave_dir, msg)
        self.root = (msg.issued_at, x, y)
        log.info("root data received: %d samples", len(y))
        await self.broker.publisher.event("enclave.root_data", samples=len(y))

    async def _open_round(self, spec: RoundSpec) -> None:
        status = self.store.round_status(spec.round_id)
        if status is not None and status != "open":
            # Already closed (a redelivered command, or a coordinator that restarted mid-plan):
            # say again how it ended, so whoever waits for it can go on (the root's to say).
            if self.shard == 0:
                await self._announce_closed(spec.round_id, status)
            return
        if self.shards > 1 and spec.mode != "sync":
            log.error("round %d refused: sharded enclaves run sync rounds only (docs/scaling.md)", spec.round_id)
            return
        if self.round is not None and self.round.round_id != spec.round_id:
            await self._finish(self.round, forced=True)
        self.store.open_round(spec.round_id, encode(spec))
        await self._resume(spec)
        if self.shard != 0:
            log.info("round %d opened on model version %d (shard %d of %d)", spec.round_id, self.version, self.shard,
                     self.shards)
            return
        await self.broker.publisher.event("round.opened", round_id=spec.round_id, deadline=spec.deadline,
                                          min_updates=spec.min_updates, expected=len(spec.expected))
        log.info("round %d opened on model version %d", spec.round_id, self.version)

    async def _abort_round(self, abort: RoundAbort) -> None:
        """Close a round as ``cancelled`` at the coordinator's signed word (an operator
        cancelled the plan): no model, its deltas deleted; a later open of it is refused."""
        status = self.store.round_status(abort.round_id)
        if status not in (None, "open"):
            return  # it already ended; nothing to stop
        await self._flush()
        if self.round is not None and self.round.round_id == abort.round_id:
            if self._deadline:
                self._deadline.cancel()
            self.round = None
        if status is None:
            self.store.open_round(abort.round_id, b"")  # known, so a delayed RoundOpen is refused
        result = RoundResult(round_id=abort.round_id, accepted=0, rejected=self.store.rejections(abort.round_id),
                             seconds=0.0, status="cancelled")
        self.store.close_round(abort.round_id, "cancelled", result.model_dump())
        await self._round_event("cancelled", abort.round_id, result,
                                received=len(self.store.round_updates(abort.round_id)))
        log.warning("round %d cancelled by the coordinator (%s)", abort.round_id, abort.reason)

    async def _resume(self, spec: RoundSpec) -> None:
        """Announce ``spec`` on the current model and arm its deadline."""
        self.round = spec
        self._round_opened_at = self.store.round_opened_at(spec.round_id)
        if self.shards > 1 and self.shard == 0:
            self._book = sharding.PartialBook(spec.round_id, self.shards, self.version, self.layout_id,
                                              int(self.params.shape[0]))
            self._own, self._combining = None, None
        if self.shard == 0:  # only the root announces rounds and signs models
            messages = publisher.build_model_messages(self.identity, self.version, self.layout_id, self.params,
                                                      self.settings.chunking.chunk_bytes, next_round=spec)
            await publisher.publish_model(self.broker.publisher, messages, self.version)
        if self._deadline:
            self._deadline.cancel()
        self._deadline = asyncio.create_task(self._deadline_timer(spec))
        if self._buffer_ready(spec):  # a restart between storing a buffer's last update and its model
            await self._fold(spec)
        if self._complete(spec):
            await self._finish(spec)

    def _recovered_at(self) -> float | None:
        """When this enclave last came back: a broker reconnect, or a restart mid-round."""
        times = [t for t in (self.broker.link.back_at if self.broker and self.broker.link else None,
                             self._restarted_at) if t is not None]
        return max(times) if times else None

    async def _deadline_timer(self, spec: RoundSpec) -> None:
        """Close ``spec`` at its deadline; never while the broker is away (see deadline.py)."""
        grace = self.settings.recovery.close_grace_seconds
        link = self.broker.link
        while True:
            at = deadline.close_time(spec.deadline, self._recovered_at(), grace)
            await asyncio.sleep(max(0.0, at - time.time()))
            if link is not None and not link.up.is_set():
                log.warning("round %d reached its deadline with the broker away; it closes %.0f s after the "
                            "broker is back", spec.round_id, grace)
                await link.wait_up()
                continue
            if deadline.close_time(spec.deadline, self._recovered_at(), grace) <= time.time():
                break
        async with self.lock:
            if self.round is not None and self.round.round_id == spec.round_id:
                await self._finish(spec)

    def senders(self, round_id: int) -> set[str]:
        """Devices whose update for ``round_id`` is stored (cached; the store is the truth)."""
        if round_id not in self._senders:
            self._senders[round_id] = self.store.devices_in_round(round_id)
        return self._senders[round_id]

    def _complete(self, spec: RoundSpec) -> bool:
        """A sync round is complete once every expected device sent (an async one runs to its deadline)."""
        return (spec.mode == "sync" and bool(spec.expected)
                and self._own_expected(spec) <= self.senders(spec.round_id))

    def _own_expected(self, spec: RoundSpec) -> frozenset[str]:
        """The round's expected devices this shard owns (all with one enclave), once per round:
        it is asked after every stored update, and a SHA-256 per expected device each time cost
        a shard about 0.5 ms per update with 300 devices."""
        if self._expected[0] != spec.round_id:
            own = [d for d in spec.expected if self.shards == 1 or shard_of(d, self.shards) == self.shard]
            self._expected = (spec.round_id, frozenset(own))
        return self._expected[1]

    def _buffer_ready(self, spec: RoundSpec) -> bool:
        return spec.mode == "async" and staleness.buffer_full(len(self.store.buffered_updates(spec.round_id)),
                                                              self._buffer_size(spec))

    # --- intake --------------------------------------------------------------------------

    def _context(self) -> intake.IntakeContext:
        return intake.IntakeContext(
            coordinator_keys=dict(self.coordinator_keys), kem_alg=self.identity.kem_alg,
            kem_sk=self.identity.kem_sk, kem_fp=self.identity.kem_fp,
            open_round=self.round.round_id if self.round else None, layout_id=self.layout_id,
            n_params=int(self.params.shape[0]), revoked=frozenset(self._revoked), policy=self.policy,
            now=time.time(), base_version=self.version if self._max_staleness(self.round) is None else None,
            opened_at=self._round_opened_at, skew=self.settings.crypto.freshness_seconds, key_epochs=self.key_epochs,
            report_digests=self.report_digests, version=self.version, max_staleness=self._max_staleness(self.round),
            grant_keys=dict(self.grant_keys), shard=self.shard, shards=self.shards, buffers=self.store.buffers)

    def _max_staleness(self, spec: RoundSpec | None) -> int | None:
        """The staleness bound of an async round (None: a sync round, or none open)."""
        if spec is None or spec.mode != "async":
            return None
        return staleness.max_staleness_for(spec.max_staleness, self.settings.fl.max_staleness)

    def _buffer_size(self, spec: RoundSpec) -> int:
        return staleness.buffer_size_for(spec.buffer_size, max(spec.min_updates, self.settings.fl.min_accepted))

    async def _on_update_message(self, msg: Update | UpdateChunk, raw) -> object:
        if isinstance(msg, UpdateChunk):
            await self.chunks.handle(msg, raw, self._routed(raw))
            return DEFERRED
        return await self._on_update(msg, raw)

    @staticmethod
    def _routed(raw) -> str | None:
        return Names.routed_device(raw.routing_key)

    async def _on_update(self, update: Update, raw) -> object:
        """Check one update, timed from delivery to verdict (:func:`_intake`)."""
        with metrics.INTAKE_SECONDS.time():
            return await self._intake(update, raw)

    async def _intake(self, update: Update, raw) -> object:
        """Check one update; its outcome is written in the open batch and acked at the flush.

        Signature checks and decryption run in a worker thread (OpenSSL releases the GIL, so
        several updates are opened at once on the second core); the state checks are then
        made again under the lock, since the round may have moved on meanwhile.
        """
        routed = self._routed(raw)
        header = None
        try:
            header = intake.read_header(update)
            opened = await asyncio.to_thread(self._check_and_open, update, header, routed, self._context(),
                                             raw.redelivered)
        except QflareError as err:
            async with self.lock:
                return await self._reject(raw, header, routed, err)
        if opened is None:  # a redelivery counts once: ack it with the batch
            async with self.lock:
                self._pending.append((raw, None))
                return await self._schedule_flush()
        return await self._store_opened([raw], header, routed, opened)

    def _check_and_open(self, update: Update, header, routed: str | None, ctx: intake.IntakeContext,
                        redelivered: bool) -> intake.Opened | None:
        """:func:`intake.check_and_open` in a worker thread, None for a redelivery of a stored
        update. The replay lookup is made here too: on the event loop it waited for the
        SQLite connection whenever a batch's commit held it (up to 14 ms, 0.5 ms per update)."""
        seen = self.store.has_update(header.update_id)
        if seen and redelivered:
            return None
        return intake.check_and_open(update, header, routed, ctx, seen, self.stages)

    async def _accept_chunked(self, held: list, header, routed: str | None, opened: intake.Opened) -> object:
        return await self._store_opened(held, header, routed, opened)

    async def _reject_chunked(self, held: list, header, routed: str | None, err: QflareError) -> object:
        async with self.lock:
            self._pending.extend((r, None) for r in held[1:])
            return await self._reject(held[0], header, routed, err)

    async def _quiet(self, held: list) -> object:
        """Ack ``held`` with the next batch, with no event (chunks of an update already settled)."""
        if not held:
            return DEFERRED
        async with self.lock:
            self._pending.extend((r, None) for r in held)
            return await self._schedule_flush()

    async def _store_opened(self, held: list, header, routed: str | None, opened: intake.Opened) -> object:
        """Store an opened update and ack its messages with the batch, unless the round moved on."""
        raw, rest = held[0], held[1:]
        async with self.lock:
            self._pending.extend((r, None) for r in rest)
            try:
                if self.round is None or header.round_id != self.round.round_id:
                    raise QflareError(Reason.WRONG_ROUND, f"round {header.round_id} closed while it was checked")
                if self.store.has_update(header.update_id):
                    raise QflareError(Reason.REPLAY, f"update {header.update_id} was already received")
                if header.device_id in self._revoked:
                    raise QflareError(Reason.REVOKED, f"device {header.device_id} is revoked")
                if self.round.mode == "async":
                    # again under the lock: a model may have been published while it was opened
                    staleness.check_base(header.base_version, self.version, self._max_staleness(self.round))
                    if not self.store.has_model(header.base_version):
                        raise QflareError(Reason.UNKNOWN_BASE, f"base version {header.base_version} was never "
                                          "published")
                    if self.store.sent_on_base(header.round_id, header.device_id, header.base_version):
                        raise QflareError(Reason.REPLAY, f"device {header.device_id} already sent an update on "
                                          f"model v{header.base_version}")
                    if self.store.in_buffer(header.round_id, header.device_id):  # one vote per buffer
                        raise QflareError(Reason.REPLAY, f"device {header.device_id} already has an update in the "
                                          "buffer")
                elif header.device_id in self.senders(header.round_id):
                    raise QflareError(Reason.REPLAY, f"device {header.device_id} already sent an update this round")
            except QflareError as err:
                opened.release()
                return await self._reject(raw, header, routed, err)
            self.store.begin()
            # the row and the write's place (the store's writer threads write the bytes; the
            # batch's commit waits for them), off the event loop; the lock orders the store
            await asyncio.to_thread(self._timed, "index", self.store.add_update, header.round_id, header.update_id,
                                    header.device_id, header.num_samples, opened.delta, opened.norm,
                                    header.base_version, opened.buffer)
            self.senders(header.round_id).add(header.device_id)
            metrics.UPDATES.labels("accepted").inc()
            event = {"type_": "update.accepted", "device_id": header.device_id, "round_id": header.round_id,
                     "update_id": header.update_id}
            if self.settings.fl.defend:  # the standing this update is judged with at the close
                reps = self.defence_state.reputations
                event |= {"reputation": round(reputation.current(reps, header.device_id), 4),
                          "quarantined": reputation.quarantined(reps, header.device_id,
                                                                self.settings.fl.quarantine_below)}
            self._pending.append((raw, event))
            if self._buffer_ready(self.round):
                await self._fold(self.round)  # flushes the batch first
                return DEFERRED
            if self._complete(self.round):
                await self._finish(self.round)  # flushes the batch first
                return DEFERRED
            return await self._schedule_flush()

    async def _reject(self, raw, header, routed: str | None, err: QflareError) -> object:
        """Record a refusal (counted in the open round when it concerns it); caller holds the lock."""
        device = header.device_id if header else routed
        # Counted in the round the update names when the store knows it (a late update for a
        # closed round is on that round's record), else a wrong_round one in the open round.
        target = None
        if header is not None and self.store.round_status(header.round_id) is not None:
            target = header.round_id
        elif self.round is not None and err.reason == Reason.WRONG_ROUND:
            target = self.round.round_id
        if target is not None:
            self.store.begin()
            self.store.count_rejection(target, err.reason.value)
        metrics.UPDATES.labels(err.reason.value).inc()
        log.info("update from %s rejected: %s %s", device, err.reason.value, err.detail)
        self._pending.append((raw, {"type_": f"update.rejected.{err.reason.value}", "device_id": device,
                                    "round_id": header.round_id if header else None,
                                    "reason": err.reason.value, "detail_text": err.detail[:200]}))
        return await self._schedule_flush()

    async def _schedule_flush(self) -> object:
        """Flush a full batch now, else within FLUSH_DELAY (caller holds the lock)."""
        if len(self._pending) >= FLUSH_BATCH:
            await self._flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())
        return DEFERRED

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_DELAY)
        # The batch's segment writes finish before the lock is taken, so updates go on being
        # checked and indexed meanwhile; the commit (under the lock) still waits for every
        # write of its batch before the fsync, so nothing is acked before it is on disk.
        await asyncio.to_thread(self.store.wait_writes)
        async with self.lock:
            await self._flush()

    async def _flush(self) -> None:
        """Commit the batch (one fsync), then ack its messages and emit their events (in a task)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        # the fsync off the event loop: deliveries, acks and other updates' opening go on
        await asyncio.to_thread(self._timed, "commit", self.store.commit)
        # durable now: ack and announce outside the lock, so the next batch is stored meanwhile
        task = asyncio.create_task(self._ack(pending))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _acked(self) -> None:
        """Wait for the acks and events of every committed batch (before a round's model)."""
        if self._acking:
            await asyncio.gather(*list(self._acking), return_exceptions=True)

    async def _ack(self, pending: list) -> None:
        """Ack a committed batch and send its events, all at once. One after the other, each
        await waited a turn of the busy event loop (two per update, the heaviest stage of
        ``bench round``): with ``qflare load`` at 1,000 devices (load average 5-7) the time from
        the last update sent to the round's close went from 6.5 s to 3.2-4.4 s."""
        t0 = time.perf_counter()
        await asyncio.gather(*(self._ack_one(raw, event) for raw, event in pending))
        self.stages.add("ack", time.perf_counter() - t0)

    async def _ack_one(self, raw, event: dict | None) -> None:
        try:
            await raw.ack()
        except TRANSIENT:
            pass  # the broker redelivers it; the update id keeps it from counting twice
        if event is not None:
            try:
                await self.broker.publisher.event(**event)
            except TRANSIENT as exc:  # events are notifications: the stored state is the truth
                log.warning("event %s not sent: %s", event["type_"], exc)

    def _timed(self, stage: str, fn, *args):
        """``fn(*args)``, its time added to ``stages`` (runs in worker threads)."""
        with self.stages.time(stage):
            return fn(*args)

    # --- closing -------------------------------------------------------------------------

    def _evaluate(self, params: np.ndarray) -> dict[str, float]:
        """The task's metrics of ``params`` on its held-out data (empty when there is nothing to
        evaluate); a task that fails is logged and reported as no metrics, never a failed round."""
        task = self.task
        if not self.settings.fl.evaluate or task is None or task.layout_id != self.layout_id:
            return {}
        try:
            held_out = task.test_data
            return task.evaluate(params, *held_out) if held_out is not None else {}
        except TaskError as exc:
            log.error("evaluation skipped: %s", exc)
            return {}

    def _screen_and_aggregate(self, stored: list, weights: np.ndarray,
                              spec: RoundSpec) -> tuple[np.ndarray | None, filters.ScreenResult | Defence]:
        fl = self.settings.fl
        if fl.defend and defend_floats(len(stored), int(self.params.shape[0])) <= fl.defend_max_floats:
            reference = (rootdata.reference_update(self.task, self.layout_id, self.params, self.root[1],
                                                   self.root[2], spec)
                         if self.root else None)
            out = defend(np.stack([self.store.load_delta(u) for u in stored]), weights,
                         [u.device_id for u in stored], fl, reference=reference, state=self.defence_state)
            return out.aggregate, out
        if fl.defend:
            log.warning("round of %d updates is over fl.defend_max_floats (the updates and the defence's k x k "
                        "matrices): closing with the streaming filters", len(stored))
        if fl.aggregator == "fedavg":
            return close_round_streaming(lambda i: self.store.load_delta(stored[i]), len(stored), weights, fl,
                                         norms=np.array([u.norm for u in stored]),
                                         load_slice=lambda i, a, b: self.store.load_delta(stored[i], a, b),
                                         d=int(self.params.shape[0]))
        # robust aggregators need every update at once
        return close_round(np.stack([self.store.load_delta(u) for u in stored]), weights, fl)

    async def _finish(self, spec: RoundSpec, forced: bool = False) -> None:
        """Close ``spec``: screen, aggregate, sign and publish the model, then record it."""
        await self._flush()
        await self._acked()  # its updates' events go out before the round's
        t0 = time.time()
        fl = self.settings.fl
        stored = self.store.round_updates(spec.round_id)
        rejected = self.store.rejections(spec.round_id)
        if self._deadline and not forced and asyncio.current_task() is not self._deadline:
            self._deadline.cancel()
        if spec.mode == "async":
            await self._finish_async(spec, t0)
            return
        self.round = None
        for u in [u for u in stored if u.device_id in self._revoked]:  # revoked after their update came
            stored.remove(u)
            await self._refuse_stored(spec.round_id, u, Reason.REVOKED.value, rejected)
        if self.shards > 1:
            await self._finish_part(spec, t0, stored, rejected)
            return
        if len(stored) < spec.min_updates:
            await self._fail(spec, t0, rejected, len(stored), 0, Reason.TOO_FEW_UPDATES,
                             f"{len(stored)} of {spec.min_updates} updates")
            return
        weights = await self._capped_weights(spec, stored)
        # The close reads every delta and can take seconds: off the event loop, so acks and
        # heartbeats go on. The lock is held, so nothing writes the store meanwhile.
        combined, verdict = await asyncio.to_thread(self._screen_and_aggregate, stored, weights, spec)
        rejected_now = await self._judged(stored, verdict, spec)
        for reason, count in rejected_now.items():
            rejected[reason] = rejected.get(reason, 0) + count
        accepted = int(verdict.accepted.sum())
        if accepted < fl.min_accepted:
            await self._fail(spec, t0, rejected, len(stored), accepted, Reason.TOO_FEW_ACCEPTED,
                             f"{accepted} accepted, fl.min_accepted is {fl.min_accepted}")
            return
        await self._publish_round(spec, t0, combined, accepted, rejected)

    async def _publish_round(self, spec: RoundSpec, t0: float, combined: np.ndarray | None, accepted: int,
                             rejected: dict[str, int]) -> None:
        """The round's model from ``combined``: evaluated, signed, recorded, then published."""
        new_params = self.params + combined if combined is not None else self.params
        scores = await asyncio.to_thread(self._evaluate, new_params)
        accuracy = scores.get("accuracy")
        result = RoundResult(round_id=spec.round_id, accepted=accepted, rejected=rejected, accuracy=accuracy,
                             metrics=scores, seconds=round(time.time() - t0, 4), status="completed")
        version = self.version + 1
        messages = publisher.build_model_messages(self.identity, version, self.layout_id, new_params,
                                                  self.settings.chunking.chunk_bytes, result=result)
        # Recorded first, then published until confirmed: a crash or an outage in between
        # re-sends this same signed model (see _announce_closed), never makes a second one.
        self.store.begin()  # the model and the round's end are durable together, or neither
        self.store.save_model(version, spec.round_id, new_params, messages[0])
        self.store.close_round(spec.round_id, "completed", result.model_dump())
        self.store.commit()
        self.version, self.params = version, new_params
        await publisher.publish_model(self.broker.publisher, messages, version)
        metrics.ROUNDS.labels("completed").inc()
        metrics.ROUND_SECONDS.observe(time.time() - t0)
        metrics.MODEL.version, metrics.MODEL.accuracy = version, accuracy
        await self._round_event("completed", spec.round_id, result, version=version)
        log.info("round %d completed: %d accepted, rejected %s, metrics %s", spec.round_id, accepted, rejected,
                 scores)


    # --- sharded enclaves (docs/scaling.md, "Sharded enclaves"; enclave_worker/shards.py) ----

    async def _finish_part(self, spec: RoundSpec, t0: float, stored: list, rejected: dict[str, int]) -> None:
        """Close this shard's part of ``spec``: screen its updates as one enclave would, then
        the partial (Σ w·Δ, Σ w, counts) goes to the root, signed and sealed; the root keeps its own."""
        combined, n_accepted, total_w = None, 0, 0.0
        if stored:
            weights = await self._capped_weights(spec, stored)
            combined, verdict = await asyncio.to_thread(self._screen_and_aggregate, stored, weights, spec)
            for reason, count in (await self._judged(stored, verdict, spec)).items():
                rejected[reason] = rejected.get(reason, 0) + count
            accepted = np.asarray(verdict.accepted, dtype=bool)
            n_accepted, total_w = int(accepted.sum()), float(np.asarray(weights, dtype=np.float64)[accepted].sum())
        if combined is None or total_w <= 0:
            n_accepted, total_w = 0, 0.0
        # the shard's screened aggregate (FedAvg: Σ w·Δ / Σ w) times its accepted weight: the
        # root's Σ sums / Σ weights is then FedAvg over every shard's survivors
        total_sum = combined.astype(np.float64) * total_w if n_accepted else None
        partial = ShardPartial(round_id=spec.round_id, shard=self.shard, shards=self.shards,
                               base_version=self.version, layout_id=self.layout_id,
                               weighted_sum=total_sum.astype("<f8").tobytes() if n_accepted else b"",
                               weight_total=total_w if n_accepted else 0.0, received=len(stored),
                               accepted=n_accepted, rejected=rejected, issued_at=time.time())
        if self.shard == 0:
            self._own = partial
            self._combining = (spec, t0)
            if self._partial_timer:
                self._partial_timer.cancel()
            self._partial_timer = asyncio.create_task(self._partial_deadline(spec))
            await self._maybe_combine()
            return
        if not stored and self.shard not in self._awaited_shards(spec) | {0}:
            self.store.close_round(spec.round_id, "completed", RoundResult(
                round_id=spec.round_id, accepted=0, seconds=0.0, status="completed").model_dump())
            log.info("round %d: no expected device is shard %d's; no partial", spec.round_id, self.shard)
            return
        body = sharding.seal_partial(partial, self.identity, self.identity.kem_alg, self.identity.kem_pk,
                                     self.broker.names.namespace)
        result = RoundResult(round_id=spec.round_id, accepted=n_accepted, rejected=rejected,
                             seconds=round(time.time() - t0, 4), status="completed")
        # confirmed first, then recorded: a crash in between sends it again at the restart,
        # which the root refuses as a replay; never a part closed and not sent
        await self.broker.publisher.publish_until_confirmed(
            self.broker.names.rpc_exchange, Names.PARTIALS_KEY, body, what=f"round {spec.round_id} partial",
            message_id=f"partial-{spec.round_id}-{self.shard}")
        self.store.close_round(spec.round_id, "completed", result.model_dump())
        await self.broker.publisher.event("shard.partial.sent", round_id=spec.round_id, shard=self.shard,
                                          received=len(stored), accepted=n_accepted, confirmed=True)
        log.info("round %d: shard %d sent its partial (%d of %d accepted, rejected %s)", spec.round_id,
                 self.shard, n_accepted, len(stored), rejected)

    async def _on_partial(self, envelope: PartialEnvelope, raw) -> None:
        """The root takes one shard's partial: from an enclave broker user, opening with the
        root's key, signed by the admitted enclave key, once per shard, for the open round."""
        require_role(self.settings, "enclave", raw.user_id)
        async with self.lock:
            try:
                if not self.coordinator_keys:
                    raise QflareError(Reason.NO_ENCLAVE, "this root is not admitted yet")
                admitted = {self.identity.sig_fp: sharding.SignerKey(self.identity.sig_alg, self.identity.sig_pk)}
                partial = await asyncio.to_thread(sharding.open_partial, envelope, self.identity.kem_sk, admitted,
                                                  self.broker.names.namespace, self.policy)
                if self._book is None:
                    raise QflareError(Reason.WRONG_ROUND, f"partial for round {partial.round_id}, none is open")
                self._book.take(partial, skew=self.settings.crypto.freshness_seconds,
                                opened_at=self._round_opened_at)
            except QflareError as err:
                log.warning("partial of shard %d for round %d refused: %s %s", envelope.shard, envelope.round_id,
                            err.reason.value, err.detail)
                await self.broker.publisher.event(f"shard.partial.rejected.{err.reason.value}",
                                                  round_id=envelope.round_id, reason=err.reason.value,
                                                  shard=envelope.shard, detail_text=err.detail[:200])
                return
            log.info("round %d: partial of shard %d taken (%d of %d accepted)", partial.round_id, partial.shard,
                     partial.accepted, partial.received)
            await self._maybe_combine()

    async def _maybe_combine(self, *, at_deadline: bool = False) -> None:
        """Make the round's model once the root's own part and every partial are in (or at
        the wait's end with those it has). Caller holds the lock."""
        if self._combining is None or self._own is None or self._book is None:
            return
        spec, t0 = self._combining
        awaited = self._awaited_shards(spec)
        if not awaited <= set(self._book.taken) and not at_deadline:
            return
        if self._partial_timer and asyncio.current_task() is not self._partial_timer:
            self._partial_timer.cancel()
        parts, book = [self._own, *self._book.taken.values()], self._book
        self._combining, self._book, self._own = None, None, None
        rejected: dict[str, int] = {}
        for p in parts:
            for reason, count in p.rejected.items():
                rejected[reason] = rejected.get(reason, 0) + count
        for shard in sorted(awaited - set(book.taken)):
            rejected[Reason.MISSING_SHARD.value] = rejected.get(Reason.MISSING_SHARD.value, 0) + 1
            log.warning("round %d: no partial from shard %d; the model is made without it", spec.round_id, shard)
            await self.broker.publisher.event("shard.missing", round_id=spec.round_id, shard=shard,
                                              reason=Reason.MISSING_SHARD.value, confirmed=True)
        out = sharding.combine(parts, max_norm=self.settings.fl.max_norm)
        by_shard = {p.shard: p for p in parts}
        for shard, reason in out.dropped.items():
            rejected[reason] = rejected.get(reason, 0) + by_shard[shard].accepted
            await self.broker.publisher.event(f"shard.partial.rejected.{reason}", round_id=spec.round_id,
                                              reason=reason, shard=shard, detail_text="left out of the model")
        received = sum(p.received for p in parts)
        accepted = sum(by_shard[s].accepted for s in out.used)
        if received < spec.min_updates:
            await self._fail(spec, t0, rejected, received, 0, Reason.TOO_FEW_UPDATES,
                             f"{received} of {spec.min_updates} updates across the shards")
            return
        if accepted < self.settings.fl.min_accepted:
            await self._fail(spec, t0, rejected, received, accepted, Reason.TOO_FEW_ACCEPTED,
                             f"{accepted} accepted across the shards, fl.min_accepted is {self.settings.fl.min_accepted}")
            return
        await self._publish_round(spec, t0, out.delta, accepted, rejected)

    def _awaited_shards(self, spec: RoundSpec) -> set[int]:
        """The shards whose partial the root waits for: those owning an expected device (every
        shard when the round names none); shard 0 is the root itself."""
        if not spec.expected:
            return set(range(1, self.shards))
        return {shard_of(d, self.shards) for d in spec.expected} - {0}

    async def _partial_deadline(self, spec: RoundSpec) -> None:
        """At the round's deadline plus enclave.partial_wait_seconds, combine what has come."""
        at = spec.deadline + self.settings.enclave.partial_wait_seconds
        await asyncio.sleep(max(0.0, at - time.time()))
        async with self.lock:
            if self._combining is not None and self._combining[0].round_id == spec.round_id:
                await self._maybe_combine(at_deadline=True)

    async def _tell_peers(self) -> None:
        """Send the other shards the coordinator's admission of this shard's report."""
        if self._admission is not None:
            await self.broker.publisher.publish(self.broker.names.rpc_exchange, Names.PEERS_KEY, self._admission)

    async def _on_peer(self, msg: PeerAdmission, raw) -> None:
        """Take another shard's admitted report as this enclave's own (grants name it): only
        when the current coordinator key signed its admission and it names this code and keys."""
        require_role(self.settings, "enclave", raw.user_id)
        key = self.coordinator_keys.get(self.current_coordinator or "")
        if key is None:
            return
        accept = signing.verify(decode(msg.accept, Signed), AttestAccept, key.alg, key.pk)
        if accept.report_digest != attestation.report_digest(msg.report):
            raise QflareError(Reason.BAD_SIGNATURE, "admission is for another report")
        report = signing.unverified(msg.report, AttestationReport)
        if (report.measurement, report.kem_pk, report.sig_pk) != (self.code, self.identity.kem_pk,
                                                                  self.identity.sig_pk):
            raise QflareError(Reason.BAD_SIGNATURE, "admitted report of another enclave")
        digest = handshake.enclave_digest(msg.report)
        if digest in self.report_digests:
            return
        self.store.add_report(digest, self.identity.kem_fp)
        self.report_digests = self.report_digests | {digest}
        log.info("shard %d takes a peer shard's admitted report", self.shard)
        await self._tell_peers()  # so a peer that started after this shard learns this one's too

    async def _on_model(self, msg: Signed | ModelChunk, raw) -> None:
        """A shard other than the root follows the root's global models (signed by the shared
        enclave key), so its next round checks updates against the model devices train on."""
        require_role(self.settings, "enclave", raw.user_id)
        if isinstance(msg, ModelChunk):
            return  # sharded enclaves take models of one message (docs/scaling.md)
        model = signing.verify(msg, GlobalModel, self.identity.sig_alg, self.identity.sig_pk)
        if model.chunk_digests or model.layout_id != self.layout_id:
            log.error("model v%d not followed: chunked or of another layout", model.version)
            return
        async with self.lock:
            if model.version <= self.version:
                return  # a round announcement on the current model, or an older one
            params = np.frombuffer(model.params, dtype="<f4").astype(np.float32)
            if params.shape != self.params.shape:
                log.error("model v%d not followed: %d parameters, not %d", model.version, params.shape[0],
                          self.params.shape[0])
                return
            self.store.begin()
            self.store.save_model(model.version, model.result.round_id if model.result else None, params,
                                  raw.body)
            self.store.commit()
            self.version, self.params = model.version, params
            metrics.MODEL.version = model.version
            log.info("shard %d follows model v%d", self.shard, model.version)

    async def _judged(self, stored: list, verdict: filters.ScreenResult | Defence, spec: RoundSpec) -> dict[str, int]:
        """Announce what the filters refused and keep the defence's new state; the refusals by reason."""
        rejected: dict[str, int] = {}
        for u, reason in zip(stored, verdict.reasons, strict=True):
            if reason is not None:  # a Reason from defend, a str from the filters
                await self._refuse_stored(spec.round_id, u, getattr(reason, "value", reason), rejected)
        if isinstance(verdict, Defence):
            self.defence_state = verdict.state
            reputation.save(self._enclave_dir, verdict.state.reputations, self.settings.fl.quarantine_below,
                            verdict.state.trust_on)
            for device in verdict.newly_quarantined:
                log.warning("device %s quarantined: repeated rejections", device)
                await self.broker.publisher.event("device.quarantined", device_id=device, round_id=spec.round_id,
                                                  reputation=round(verdict.state.reputations[device], 4))
        return rejected

    # --- asynchronous rounds (FedBuff; enclave_worker/staleness.py) -----------------------

    async def _fold(self, spec: RoundSpec, *, last: bool = False) -> bool:
        """Turn an async round's buffer into the next model: filters on the buffer, each update
        weighed by its staleness, signed, recorded with the buffer's updates, then published
        (announcing the round again unless ``last``). False when the buffer was empty."""
        await self._flush()
        await self._acked()
        t0 = time.time()
        fl = self.settings.fl
        buffered = self.store.buffered_updates(spec.round_id)
        rejected: dict[str, int] = {}
        revoked = [u for u in buffered if u.device_id in self._revoked]  # revoked after their update came
        for u in revoked:
            await self._refuse_stored(spec.round_id, u, Reason.REVOKED.value, rejected)
        buffered = [u for u in buffered if u.device_id not in self._revoked]
        if not buffered:
            self._drop_buffer(spec, [u.update_id for u in revoked], rejected)
            return False
        stale = [staleness.staleness(self.version, u.base_version) for u in buffered]
        capped = await self._capped_weights(spec, buffered)
        bases = [u.base_version for u in buffered]
        weights = staleness.buffer_weights(capped, bases, self.version)
        combined, verdict = await asyncio.to_thread(self._screen_and_aggregate, buffered, weights, spec)
        for reason, count in (await self._judged(buffered, verdict, spec)).items():
            rejected[reason] = rejected.get(reason, 0) + count
        accepted = int(verdict.accepted.sum())
        ok = np.asarray(verdict.accepted, dtype=bool)
        kept = [u for u, a in zip(buffered, ok, strict=True) if a]
        dropped = [u.update_id for u in revoked] + [u.update_id for u, a in zip(buffered, ok, strict=True) if not a]
        if combined is None or accepted < fl.min_accepted:  # no model: no few devices may set it
            if kept:
                rejected[Reason.TOO_FEW_ACCEPTED.value] = rejected.get(Reason.TOO_FEW_ACCEPTED.value, 0) + len(kept)
            self._drop_buffer(spec, dropped + [u.update_id for u in kept], rejected)
            log.warning("async round %d: %d of a buffer of %d accepted (fl.min_accepted %d; refused %s); no new "
                        "model", spec.round_id, accepted, len(buffered), fl.min_accepted, rejected)
            return False
        scale = staleness.step_scale(capped[ok], [b for b, a in zip(bases, ok, strict=True) if a], self.version)
        new_params = self.params + np.float32(scale) * combined
        scores = await asyncio.to_thread(self._evaluate, new_params)
        result = RoundResult(round_id=spec.round_id, accepted=accepted, rejected=rejected,
                             accuracy=scores.get("accuracy"), metrics=scores, seconds=round(time.time() - t0, 4),
                             status="completed")
        version = self.version + 1
        messages = publisher.build_model_messages(self.identity, version, self.layout_id, new_params,
                                                  self.settings.chunking.chunk_bytes, result=result,
                                                  next_round=None if last else spec)
        self.store.begin()  # the model and the buffer it consumed are durable together, or neither
        self.store.save_model(version, spec.round_id, new_params, messages[0])
        self.store.fold([u.update_id for u in kept], version)
        self._count_dropped(spec, dropped, rejected)
        self.store.commit()
        self.version, self.params = version, new_params
        await publisher.publish_model(self.broker.publisher, messages, version)
        metrics.MODEL.version, metrics.MODEL.accuracy = version, result.accuracy
        await self.broker.publisher.event(
            "model.published", round_id=spec.round_id, version=version, accepted=accepted,
            accuracy=result.accuracy, staleness_max=max(stale), staleness_mean=round(sum(stale) / len(stale), 4),
            rejected=",".join(f"{k}={v}" for k, v in sorted(rejected.items())),
            metrics=",".join(f"{k}={v:.6g}" for k, v in sorted(scores.items())), confirmed=True)
        log.info("async round %d: model v%d from a buffer of %d (%d accepted, rejected %s, staleness max %d, "
                 "step x%.3f), metrics %s", spec.round_id, version, len(buffered), accepted, rejected, max(stale),
                 scale, scores)
        return True

    def _count_dropped(self, spec: RoundSpec, update_ids: list[str], rejected: dict[str, int]) -> None:
        """Mark buffered updates judged and left out, and add ``rejected`` to the round's record (in the batch)."""
        self.store.fold(update_ids, -1)
        for reason, count in rejected.items():
            for _ in range(count):
                self.store.count_rejection(spec.round_id, reason)

    def _drop_buffer(self, spec: RoundSpec, update_ids: list[str], rejected: dict[str, int]) -> None:
        """A buffer that makes no model: its updates consumed, the refusals recorded, durably."""
        self.store.begin()
        self._count_dropped(spec, update_ids, rejected)
        self.store.commit()

    async def _finish_async(self, spec: RoundSpec, t0: float) -> None:
        """An async round's deadline: a last model from the buffer if it holds ``min_updates``
        (else its updates are dropped, counted as ``too_few_updates``), then the round's end."""
        leftover = self.store.buffered_updates(spec.round_id)
        if leftover and staleness.closes_with_leftover(len(leftover), spec.min_updates):
            await self._fold(spec, last=True)
        elif leftover:
            self._drop_buffer(spec, [u.update_id for u in leftover], {Reason.TOO_FEW_UPDATES.value: len(leftover)})
        self.round = None
        versions = self.store.versions_of_round(spec.round_id)
        rejected = self.store.rejections(spec.round_id)
        if not versions:
            await self._fail(spec, t0, rejected, len(self.store.round_updates(spec.round_id)), 0,
                             Reason.TOO_FEW_UPDATES, f"async: no buffer of {self._buffer_size(spec)} made a model")
            return
        scores = await asyncio.to_thread(self._evaluate, self.params)
        result = RoundResult(round_id=spec.round_id, accepted=self.store.folded_count(spec.round_id),
                             rejected=rejected, accuracy=scores.get("accuracy"), metrics=scores,
                             seconds=round(time.time() - t0, 4), status="completed")
        self.store.close_round(spec.round_id, "completed", result.model_dump())
        metrics.ROUNDS.labels("completed").inc()
        await self._round_event("completed", spec.round_id, result, version=self.version)
        log.info("async round %d completed: models v%d..v%d, %d updates aggregated, rejected %s", spec.round_id,
                 versions[0], versions[-1], result.accepted, rejected)

    async def _capped_weights(self, spec: RoundSpec, stored: list) -> np.ndarray:
        """The stored updates' aggregation weights: claims capped (aggregate.capped_weights),
        each clipped claim announced as ``update.clipped``."""
        fl = self.settings.fl
        weights, clipped = agg.capped_weights(np.array([u.num_samples for u in stored]), fl.sample_cap_multiple,
                                              fl.max_num_samples)
        for u, w in ((u, w) for u, w, c in zip(stored, weights, clipped, strict=True) if c):
            await self.broker.publisher.event("update.clipped", device_id=u.device_id, round_id=spec.round_id,
                                              update_id=u.update_id, claimed=u.num_samples, weight=int(w),
                                              confirmed=True)
        return weights

    async def _refuse_stored(self, round_id: int, u, reason: str, rejected: dict[str, int]) -> None:
        """A stored update left out at the close: counted in ``rejected``, announced."""
        metrics.CLOSE_REFUSED.labels(reason).inc()  # its intake verdict (accepted) stays counted once
        rejected[reason] = rejected.get(reason, 0) + 1
        await self.broker.publisher.event(f"update.rejected.{reason}", device_id=u.device_id, round_id=round_id,
                                          reason=reason, update_id=u.update_id, confirmed=True)

    async def _fail(self, spec: RoundSpec, t0: float, rejected: dict[str, int], received: int, accepted: int,
                    reason: Reason, why: str) -> None:
        """Close ``spec`` as failed, publishing no model."""
        result = RoundResult(round_id=spec.round_id, accepted=accepted, rejected=rejected,
                             seconds=round(time.time() - t0, 4), status="failed", reason=reason.value)
        self.store.close_round(spec.round_id, "failed", result.model_dump())
        await self._round_event("failed", spec.round_id, result, received=received)
        metrics.ROUNDS.labels("failed").inc()
        log.warning("round %d failed (%s): %s", spec.round_id, reason.value, why)

    async def _round_event(self, status: str, round_id: int, result: RoundResult, *, version: int | None = None,
                           received: int | None = None) -> None:
        """``round.completed`` or ``round.failed``: the one place their fields are spelled."""
        if status == "completed":
            await self.broker.publisher.event(
                "round.completed", round_id=round_id, version=version, accepted=result.accepted,
                accuracy=result.accuracy, rejected=",".join(f"{k}={v}" for k, v in sorted(result.rejected.items())),
                metrics=",".join(f"{k}={v:.6g}" for k, v in sorted(result.metrics.items())), confirmed=True)
        elif status == "cancelled":
            await self.broker.publisher.event("round.cancelled", round_id=round_id, received=received,
                                              reason="cancelled", confirmed=True)
        else:
            await self.broker.publisher.event("round.failed", round_id=round_id, received=received,
                                              accepted=result.accepted,
                                              reason=result.reason or Reason.TOO_FEW_UPDATES.value, confirmed=True)

    async def _announce_closed(self, round_id: int, status: str) -> None:
        """Say again how a closed round ended, with its model (asked again after an outage)."""
        result, version = self.store.closed_round(round_id)
        stored = self.store.model(version) if version is not None else None
        if stored is not None and stored[1] is not None:
            messages = publisher.model_messages(stored[1], stored[0], self.settings.chunking.chunk_bytes)
            await publisher.publish_model(self.broker.publisher, messages, version)
        await self._round_event(status, round_id, RoundResult.model_validate(result), version=version,
                                received=len(self.store.round_updates(round_id)))


async def run(settings: Settings) -> None:
    """``qflare enclave run``: serve until cancelled."""
    enclave = Enclave(settings)
    e = settings.enclave
    http = await health.serve("enclave", enclave.readiness_checks(), metrics.ENCLAVE, e.http_host, e.http_port,
                              "enclave.http_port")
    enclave.http_port = http.port if http else None
    try:
        await enclave.start(attest_timeout=e.attest_timeout_seconds)
        await asyncio.Event().wait()
    finally:
        await enclave.stop()
        if http:
            await http.stop()
