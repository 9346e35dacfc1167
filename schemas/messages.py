"""Every message that crosses the broker, as strict pydantic models.

Models are strict (no type coercion) and forbid unknown fields, so a peer cannot smuggle
data past validation. Messages that must be authenticated travel as the encoded bytes of
the inner model inside :class:`Signed`; the signature covers exactly those bytes, so
verification never depends on re-encoding. ``docs/protocol.md`` documents each one.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WrapSerializer, WrapValidator

DeviceId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
AlgName = Annotated[str, Field(min_length=1, max_length=64)]
Nonce = Annotated[bytes, Field(min_length=16, max_length=64)]
Key = Annotated[bytes, Field(min_length=1, max_length=65_536)]
BLOB_MAX = 256 * 1024 * 1024
Blob = Annotated[bytes, Field(max_length=BLOB_MAX)]


def keep_view(value: object, handler):
    """A read-only byte view passes as it is, bounded like bytes: the codec decodes a large
    update's payload as a view of the received body instead of a 4 MB copy (schemas/codec.py)."""
    if isinstance(value, memoryview):
        if not value.readonly or value.ndim != 1 or value.itemsize != 1 or value.nbytes > BLOB_MAX:
            raise ValueError(f"a payload view must be read-only bytes of at most {BLOB_MAX}")
        return value
    return handler(value)


def _dump_view(value: object, handler):
    return handler(value.tobytes() if isinstance(value, memoryview) else value)


#: A large payload: bytes, or a view of the message it arrived in (:func:`keep_view`).
Payload = Annotated[Blob, WrapValidator(keep_view), WrapSerializer(_dump_view)]
Fingerprint = Annotated[str, Field(min_length=8, max_length=128)]
#: An encoded message carried inside another (a signed grant, report, claim): far above
#: any real one (~10 KiB), far below the broker's message limit.
Encoded = Annotated[bytes, Field(max_length=1024 * 1024)]
Digest = Annotated[bytes, Field(max_length=64)]
Label = Annotated[str, Field(max_length=64)]  # reason codes, statuses, service names
#: Longest human-readable detail (error replies, event values); longer ones are cut.
ERROR_DETAIL_MAX = 1024
Detail = Annotated[str, Field(max_length=ERROR_DETAIL_MAX)]
Measurement = Annotated[str, Field(min_length=16, max_length=128)]
#: Most device ids one round may name.
MAX_EXPECTED = 100_000
Scalar = str | int | float | bool | None
BoundedScalar = Detail | int | float | bool | None
UpdateId = Annotated[str, Field(min_length=8, max_length=64)]
#: Most chunks one update or model may travel in (65,536 × 4 MiB = 256 GiB).
MAX_CHUNKS = 65_536
ChunkIndex = Annotated[int, Field(ge=0, lt=MAX_CHUNKS)]
ChunkCount = Annotated[int, Field(ge=1, le=MAX_CHUNKS)]
#: How an update's delta is encoded (common/compression.py): raw float32, int8 with a scale
#: per chunk, or top-k (index, value) pairs.
Encoding = Literal["f32", "int8", "topk"]
Sha256 = Annotated[bytes, Field(min_length=32, max_length=32)]
#: Most enclave shards one namespace may run (docs/scaling.md, "Sharded enclaves").
MAX_SHARDS = 64


class Message(BaseModel):
    """Base of all wire messages; ``TYPE`` is the envelope's type tag."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    TYPE: ClassVar[str] = ""


class Signed(Message):
    """``body`` (an encoded message) signed by the key whose fingerprint is ``signer``."""

    TYPE: ClassVar[str] = "signed"
    body: Blob
    alg: AlgName
    signer: Fingerprint
    signature: Key


class ErrorReply(Message):
    """Typed failure answer to any request: a reason code, never a traceback."""

    TYPE: ClassVar[str] = "error"
    reason: Label
    detail: Detail = ""


class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    nonce: Digest = b""


class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    nonce: Digest = b""
    service: Label
    version: Label


# --- enrollment (docs/architecture.md protocol step 2) -------------------------------------------


class EnrollClaim(Message):
    """What the device proves: it holds the token and the new signature key."""

    TYPE: ClassVar[str] = "enroll.claim"
    device_id: DeviceId
    token: Annotated[str, Field(min_length=1, max_length=256)]
    sig_alg: AlgName
    sig_pk: Key
    kem_alg: AlgName
    kem_pk: Key
    nonce: Nonce
    timestamp: float
    #: Handshake ``kem-v2``: a fresh key the coordinator answers under (:class:`EnrollConfirm`)
    #: instead of signing; only the holder of its KEM secret key can read it from the sealed claim.
    reply_key: Sha256 | None = None


class EnrollRequest(Message):
    """An encoded ``Signed(EnrollClaim)`` sealed to the coordinator's KEM key.

    ``device_id`` is in clear (it is no secret: routing keys carry it) so rate limits apply
    before any crypto; the sealed claim must name the same device.
    """

    TYPE: ClassVar[str] = "enroll.request"
    device_id: DeviceId
    kem_alg: AlgName
    coordinator_kem_fp: Fingerprint
    sealed: Blob


class EnrollAccept(Message):
    """Signed by the coordinator; carries the enclave's attested keys when known."""

    TYPE: ClassVar[str] = "enroll.accept"
    device_id: DeviceId
    request_nonce: Nonce
    sig_fp: Fingerprint
    coordinator_sig_alg: AlgName
    coordinator_sig_pk: Key
    enclave_report: Encoded | None = None


class EnrollConfirm(Message):
    """Handshake ``kem-v2``: the encoded :class:`EnrollAccept`, AES-256-GCM under the claim's
    ``reply_key`` (common/handshake.py: seal_enroll_accept); opening it is the key confirmation."""

    TYPE: ClassVar[str] = "enroll.confirm"
    device_id: DeviceId
    sealed: Annotated[bytes, Field(min_length=28, max_length=1024 * 1024)]


# --- sessions (step 3) -----------------------------------------------------------------


class SessionRequest(Message):
    """Signed by the device's long-term key; ``eph_pk`` is a fresh KEM key."""

    TYPE: ClassVar[str] = "session.request"
    device_id: DeviceId
    eph_kem_alg: AlgName
    eph_pk: Key
    nonce: Nonce
    timestamp: float


class SessionGrant(Message):
    """Coordinator-signed, short-lived right to send updates, checked by the enclave.

    It also authenticates the handshake to the device: ``transcript`` binds the request,
    the ciphertext, the coordinator's nonce and the session id, and ``enclave_digest`` the
    enclave report sent beside it, so one signature serves both readers.
    """

    TYPE: ClassVar[str] = "session.grant"
    device_id: DeviceId
    session_id: Annotated[str, Field(min_length=8, max_length=64)]
    sig_alg: AlgName
    sig_pk: Key
    sig_fp: Fingerprint
    issued_at: float
    not_after: float
    transcript: Digest
    enclave_digest: Digest | None = None


class SessionAccept(Message):
    """The coordinator's answer: ciphertext to the ephemeral key, its nonce, the grant.

    Not signed itself: every field is bound by the signed grant's transcript/enclave digest.
    """

    TYPE: ClassVar[str] = "session.accept"
    device_id: DeviceId
    session_id: Annotated[str, Field(min_length=8, max_length=64)]
    ciphertext: Key
    nonce: Nonce
    grant: Encoded  # Signed(SessionGrant)
    enclave_report: Encoded | None = None


#: Handshake suites a device may ask for: ``sig-v1`` (a signed SessionRequest, a signed
#: grant) and ``kem-v2`` (KEM authentication and key confirmation, a MACed grant).
KemSuite = Literal["kem-v3", "kem-v2"]


class SessionHello(Message):
    """Handshakes ``kem-v2`` and ``kem-v3``, device → coordinator (docs/crypto.md, "KEM handshake").

    ``static_ct`` encapsulates to the coordinator's static KEM key (fingerprint
    ``coordinator_kem_fp``, pinned through the device's key chain); ``eph_pk`` is a fresh KEM
    key for forward secrecy. Not signed: in kem-v2 the device is authenticated by decapsulating
    the coordinator's ciphertext to its enrolled KEM key, in kem-v3 by ``auth_tag``.
    """

    TYPE: ClassVar[str] = "session.hello"
    suite: KemSuite
    device_id: DeviceId
    coordinator_kem_fp: Fingerprint
    static_ct: Key
    eph_kem_alg: AlgName
    eph_pk: Key
    nonce: Nonce
    timestamp: float
    #: kem-v3 only: HMAC-SHA-256 under the device's enrolment MAC key over every other field
    #: (common/handshake.py: hello_tag); kem-v2 leaves it out.
    auth_tag: Sha256 | None = None


class SessionConfirm(Message):
    """Handshake ``kem-v2``, coordinator → device: ciphertexts to the ephemeral key and to
    the device's enrolled KEM key, the MACed grant, and ``confirm``, the key-confirmation tag
    over the whole transcript (only the holder of the coordinator's static key can make it)."""

    TYPE: ClassVar[str] = "session.confirm"
    suite: KemSuite
    device_id: DeviceId
    session_id: Annotated[str, Field(min_length=8, max_length=64)]
    eph_ct: Key
    device_ct: Key | None = None  # kem-v2 only: to the device's enrolled KEM key
    nonce: Nonce
    grant: Encoded  # GrantMac(SessionGrant)
    enclave_report: Encoded | None = None
    confirm: Sha256


class GrantMac(Message):
    """A :class:`SessionGrant` (``body``, encoded) under HMAC-SHA-256 with a grant key the
    coordinator gave the attested enclave; ``key_id`` names that key (common/handshake.py)."""

    TYPE: ClassVar[str] = "session.grant.mac"
    body: Encoded
    key_id: Annotated[bytes, Field(min_length=16, max_length=16)]
    tag: Sha256


class GrantKey(Message):
    """Coordinator → enclave, signed: the grant key for the admitted enclave, sealed to its
    KEM key. Sent at every coordinator start (a rotated coordinator key derives
    another grant key); the same key also travels in :class:`AttestAccept` at admission."""

    TYPE: ClassVar[str] = "enclave.grant_key"
    enclave: Sha256  # the enclave it is for (common/handshake.py: enclave_identity)
    sealed: Annotated[bytes, Field(min_length=1, max_length=64 * 1024)]
    issued_at: float


class SessionCall(Message):
    """Control traffic under the session key (AES-256-GCM), in either direction.

    ``seq`` strictly increases per session and direction (replays are refused); the
    plaintext is an encoded request or reply message.
    """

    TYPE: ClassVar[str] = "session.call"
    session_id: Annotated[str, Field(min_length=8, max_length=64)]
    seq: Annotated[int, Field(ge=1, lt=2**63)]
    ciphertext: Annotated[bytes, Field(min_length=16, max_length=1024 * 1024)]


class StatusRequest(Message):
    """Device → coordinator, inside a :class:`SessionCall`: where do I stand?"""

    TYPE: ClassVar[str] = "device.status.request"


class StatusReply(Message):
    TYPE: ClassVar[str] = "device.status"
    device_id: DeviceId
    status: Label
    session_not_after: float
    last_round_id: int
    enclave_kem_fp: Fingerprint | None = None


class KeyRotation(Message):
    """Signed by the device's *old* key; ``new_key_proof`` is the new key's signature."""

    TYPE: ClassVar[str] = "device.rotate"
    device_id: DeviceId
    sig_alg: AlgName
    sig_pk: Key
    kem_alg: AlgName
    kem_pk: Key
    nonce: Nonce
    timestamp: float


class RotationRequest(Message):
    TYPE: ClassVar[str] = "device.rotate.request"
    claim: Encoded  # Signed(KeyRotation) by the old key
    new_key_proof: Encoded  # Signed(KeyRotation) by the new key


class RotationAccept(Message):
    TYPE: ClassVar[str] = "device.rotate.accept"
    device_id: DeviceId
    sig_fp: Fingerprint
    request_nonce: Nonce


class CoordinatorKeys(Message):
    """The coordinator's public keys: self-signed when current, signed by the *previous*
    key (named here) when it announces a rotation."""

    TYPE: ClassVar[str] = "coordinator.keys"
    sig_alg: AlgName
    sig_pk: Key
    kem_alg: AlgName
    kem_pk: Key
    issued_at: float
    previous_sig_alg: AlgName | None = None
    previous_sig_pk: Key | None = None


class KeysRequest(Message):
    TYPE: ClassVar[str] = "coordinator.keys.request"


class KeyChain(Message):
    """The current keys (self-signed) and every rotation since the first key, oldest first,
    each ``Signed(CoordinatorKeys)`` by the key it replaces: a device pinned to any earlier
    key can walk to the current one."""

    TYPE: ClassVar[str] = "coordinator.keychain"
    current: Encoded
    rotations: Annotated[list[Encoded], Field(max_length=1000)] = []


# --- attestation (step 6) --------------------------------------------------------------


class AttestationReport(Message):
    """Signed by the (simulated) platform key: which code holds which keys."""

    TYPE: ClassVar[str] = "attestation.report"
    measurement: Measurement
    kem_alg: AlgName
    kem_pk: Key
    sig_alg: AlgName
    sig_pk: Key
    nonce: Nonce
    created_at: float


class AttestChallengeRequest(Message):
    """Enclave → coordinator: a fresh challenge to put in the next attestation report."""

    TYPE: ClassVar[str] = "attest.challenge.request"


class AttestChallenge(Message):
    """Coordinator → enclave: single-use, short-lived (common/attestation.py, ``new_challenge``)."""

    TYPE: ClassVar[str] = "attest.challenge"
    challenge: Nonce
    expires_at: float


class AttestRequest(Message):
    TYPE: ClassVar[str] = "attest.request"
    report: Encoded  # Signed(AttestationReport); its nonce is an AttestChallenge's challenge
    platform_pk: Key
    platform_alg: AlgName


class AttestAccept(Message):
    """Coordinator → enclave, signed by the coordinator key the enclave pins: binds the exact
    report admitted (its SHA-256) and the challenge it answered. ``grant_key``: the key grants
    of handshake ``kem-v2`` are MACed under, sealed to the admitted enclave's KEM key
    (associated data common/handshake.py: grant_key_aad)."""

    TYPE: ClassVar[str] = "attest.accept"
    measurement: Measurement
    coordinator_sig_alg: AlgName
    coordinator_sig_pk: Key
    report_digest: Sha256
    challenge: Nonce
    grant_key: Annotated[bytes, Field(max_length=64 * 1024)] | None = None


# --- rounds and models (steps 4-5) -----------------------------------------------------


class RoundSpec(Message):
    TYPE: ClassVar[str] = "round.spec"
    round_id: Annotated[int, Field(ge=1)]
    deadline: float
    min_updates: Annotated[int, Field(ge=1)]
    expected: Annotated[list[DeviceId], Field(max_length=MAX_EXPECTED)] = []
    epochs: Annotated[int, Field(ge=1, le=100)]
    lr: Annotated[float, Field(gt=0, le=10)]
    batch_size: Annotated[int, Field(ge=1, le=100_000)]
    #: ``async``: FedBuff (docs/protocol.md, "Asynchronous rounds"): a new model every
    #: ``buffer_size`` accepted updates until the deadline; updates on a model more than
    #: ``max_staleness`` versions old are refused.
    mode: Literal["sync", "async"] = "sync"
    buffer_size: Annotated[int, Field(ge=1, le=10_000)] = 1
    max_staleness: Annotated[int, Field(ge=0, le=10_000)] = 0


class RoundOpen(Message):
    """Coordinator → enclave, signed: open this round on the current global model."""

    TYPE: ClassVar[str] = "round.open"
    spec: RoundSpec
    issued_at: float


class RoundAbort(Message):
    """Coordinator → enclave, signed: stop this round now; it closes as ``cancelled``."""

    TYPE: ClassVar[str] = "round.abort"
    round_id: Annotated[int, Field(ge=1)]
    issued_at: float
    reason: Annotated[str, Field(max_length=200)] = "operator"


# --- the operator plane (docs/security.md, "Operator requests") -----------------------------
# Each request travels as Signed(<request>) on the operator exchange, signed by an operator
# key the coordinator pins; each reply as Signed(<reply>) by the coordinator, naming the
# request's nonce.

Reason200 = Annotated[str, Field(max_length=200)]


class OperatorRequest(Message):
    """Fields every operator request carries: the signer's key, a single-use nonce, a time."""

    operator_alg: AlgName
    operator_pk: Key
    nonce: Nonce
    issued_at: float


class RoundStart(OperatorRequest):
    """Operator → coordinator: run ``rounds`` rounds with these parameters (bounded by the
    coordinator's ``operator.*`` and ``fl.min_updates`` settings)."""

    TYPE: ClassVar[str] = "round.start"
    rounds: Annotated[int, Field(ge=1, le=10_000)]
    min_updates: Annotated[int, Field(ge=1, le=100_000)]
    deadline_seconds: Annotated[float, Field(gt=0, le=7 * 86400)]
    expected: Annotated[list[DeviceId], Field(max_length=MAX_EXPECTED)] = []
    epochs: Annotated[int, Field(ge=1, le=100)] = 1
    lr: Annotated[float, Field(gt=0, le=10)] = 0.1
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 16


class RoundStarted(Message):
    """Coordinator → operator, signed: the plan runs rounds ``round_id`` .. ``last_round_id``."""

    TYPE: ClassVar[str] = "round.started"
    request_nonce: Nonce
    round_id: int
    last_round_id: int


class RoundCancel(OperatorRequest):
    """Operator → coordinator: stop the running plan; the open round closes as cancelled."""

    TYPE: ClassVar[str] = "round.cancel"
    reason: Reason200 = "operator"


class RoundCancelled(Message):
    """Coordinator → operator, signed: which round was stopped and how many never ran."""

    TYPE: ClassVar[str] = "round.cancelled"
    request_nonce: Nonce
    round_id: int | None = None
    skipped: int = 0


class RoundListRequest(OperatorRequest):
    """Operator → coordinator: the latest rounds, newest first."""

    TYPE: ClassVar[str] = "round.list.request"
    limit: Annotated[int, Field(ge=1, le=1000)] = 20


class RoundStatusRequest(OperatorRequest):
    """Operator → coordinator: one round (the latest when ``round_id`` is None) and the plan."""

    TYPE: ClassVar[str] = "round.status.request"
    round_id: Annotated[int, Field(ge=1)] | None = None


class RoundInfo(Message):
    """One round as the coordinator recorded it (from its plan and the enclave's events)."""

    TYPE: ClassVar[str] = "round.info"
    round_id: int
    status: Label  # open | completed | failed | cancelled | stalled
    opened_at: float
    deadline: float
    min_updates: int
    expected: int
    closed_at: float | None = None
    accepted: int | None = None
    rejected: Annotated[dict[Label, int], Field(max_length=256)] = {}
    accuracy: float | None = None
    version: int | None = None
    reason: Detail | None = None  # a failure's reason code, or the operator's cancel reason


class RoundPlan(Message):
    """The plan being run: its first and last round ids."""

    TYPE: ClassVar[str] = "round.plan"
    first_round_id: int
    last_round_id: int


class RoundTable(Message):
    """Coordinator → operator, signed: rounds (newest first) and the running plan, if any."""

    TYPE: ClassVar[str] = "round.table"
    request_nonce: Nonce
    rounds: Annotated[list[RoundInfo], Field(max_length=1000)] = []  # RoundListRequest.limit
    plan: RoundPlan | None = None


class TokenCreate(OperatorRequest):
    """Operator → coordinator: a one-time enrollment token, sealed to ``reply_kem_pk``."""

    TYPE: ClassVar[str] = "token.create"
    device_id: DeviceId
    ttl_seconds: Annotated[float, Field(gt=0)]
    reply_kem_alg: AlgName
    reply_kem_pk: Key


class TokenCreated(Message):
    """Coordinator → operator, signed: the token, sealed to the request's KEM key (the
    request nonce is the associated data), so only the operator reads it."""

    TYPE: ClassVar[str] = "token.created"
    request_nonce: Nonce
    device_id: DeviceId
    sealed_token: Blob
    expires_at: float
    coordinator_fingerprint: Fingerprint
    #: The coordinator's current self-signed keys (``KeyChain.current``), so a device given
    #: the token enrols in one round trip; it checks them against its pinned fingerprint
    #: (common/handshake.py: check_keys_message). None from coordinators before it.
    coordinator_keys: Encoded | None = None


class DeviceListRequest(OperatorRequest):
    """Operator → coordinator: the enrolled devices, optionally by status."""

    TYPE: ClassVar[str] = "device.list.request"
    status: Literal["active", "revoked"] | None = None


class DeviceInfo(Message):
    """One enrolled device, public parts only."""

    TYPE: ClassVar[str] = "device.info"
    device_id: DeviceId
    status: Label
    sig_alg: AlgName
    sig_fp: Fingerprint
    kem_alg: AlgName
    kem_fp: Fingerprint
    enrolled_at: float
    rotated_at: float | None = None
    revoked_at: float | None = None


class DeviceTable(Message):
    """Coordinator → operator, signed: the devices asked for."""

    TYPE: ClassVar[str] = "device.table"
    request_nonce: Nonce
    devices: Annotated[list[DeviceInfo], Field(max_length=MAX_EXPECTED)] = []


class DeviceRevoke(OperatorRequest):
    """Operator → coordinator: revoke this device at once (registry, enclave, broker user)."""

    TYPE: ClassVar[str] = "device.revoke"
    device_id: DeviceId
    reason: Reason200 = "operator"


class DeviceRevoked(Message):
    """Coordinator → operator, signed: the device is revoked."""

    TYPE: ClassVar[str] = "device.revoked"
    request_nonce: Nonce
    device_id: DeviceId
    revoked_at: float


class EnclaveReportRequest(OperatorRequest):
    """Operator → coordinator: the admitted enclave's attestation report (to seal root data).

    The operator seals root data to that report's KEM key on its own host."""

    TYPE: ClassVar[str] = "enclave.report.request"


class EnclaveReport(Message):
    """Coordinator → operator, signed: the admitted enclave's ``Signed(AttestationReport)``."""

    TYPE: ClassVar[str] = "enclave.report"
    request_nonce: Nonce
    report: Encoded


class RootDataSubmit(OperatorRequest):
    """Operator → coordinator → enclave, signed by the operator key: sealed root data.

    Sealed to the attested enclave's KEM key (fields as :class:`RootData`). The coordinator
    checks it like any operator request and forwards it unchanged; the enclave obeys it only
    under a key of its own ``operator.pinned_fingerprints``, fresh, and newer than the root
    data it holds."""

    TYPE: ClassVar[str] = "enclave.root_data.submit"
    kem_fp: Fingerprint
    sealed: Annotated[bytes, Field(min_length=1, max_length=16 * 1024 * 1024)]
    n_samples: Annotated[int, Field(ge=1, le=10_000)]


class RootDataForwarded(Message):
    """Coordinator → operator, signed: the root data went to the enclave's control queue.

    The enclave's verdict is the event ``enclave.root_data`` or ``enclave.root_data.rejected.*``."""

    TYPE: ClassVar[str] = "enclave.root_data.forwarded"
    request_nonce: Nonce
    kem_fp: Fingerprint


class Revocation(Message):
    """Coordinator → enclave, signed: refuse this device from now on."""

    TYPE: ClassVar[str] = "device.revocation"
    device_id: DeviceId
    revoked_at: float


class KeyEpoch(Message):
    """Coordinator → enclave, signed: the device replaced its keys at ``not_before``; grants
    issued before it are refused (``superseded``), so a rotated-out key can sign nothing."""

    TYPE: ClassVar[str] = "device.key_epoch"
    device_id: DeviceId
    not_before: float
    sig_fp: Fingerprint  # the device's new signature key


class RootData(Message):
    """Coordinator → enclave, signed by the coordinator key: sealed clean root data (demo).

    The enclave's trusted reference update, sealed to the attested enclave's KEM key
    (docs/robustness.md); an operator on its own host sends :class:`RootDataSubmit` instead.

    ``sealed`` opens, with associated data ``qflare-root-data|`` + ``kem_fp``, to an ``.npz``
    holding ``x`` (float32, n samples) and ``y`` (int64, n labels).
    """

    TYPE: ClassVar[str] = "enclave.root_data"
    kem_fp: Fingerprint
    sealed: Annotated[bytes, Field(min_length=1, max_length=16 * 1024 * 1024)]
    n_samples: Annotated[int, Field(ge=1, le=10_000)]
    issued_at: float


class UpdateHeader(Message):
    """Associated data of the sealed payload and half of what the device signs."""

    TYPE: ClassVar[str] = "update.header"
    device_id: DeviceId
    grant: Encoded  # Signed(SessionGrant) or GrantMac(SessionGrant)
    round_id: Annotated[int, Field(ge=1)]
    update_id: UpdateId
    base_version: Annotated[int, Field(ge=0)]
    num_samples: Annotated[int, Field(ge=1, le=10**9)]
    timestamp: float
    layout_id: Annotated[str, Field(min_length=1, max_length=64)]
    kem_alg: AlgName
    enclave_kem_fp: Fingerprint
    encoding: Encoding = "f32"
    #: 1: one ``Update`` message; more: that many ``UpdateChunk`` messages.
    chunks: ChunkCount = 1
    #: Elements of the delta each chunk covers (f32 and int8; the last chunk covers the rest).
    chunk_elems: Annotated[int, Field(ge=0, le=2**31)] = 0


class Update(Message):
    """A sealed model delta, signed by the device over ``header`` ‖ ``sealed``."""

    TYPE: ClassVar[str] = "update"
    header: Encoded
    sealed: Payload
    sig_alg: AlgName
    signature: Key


class UpdateChunk(Message):
    """One of ``count`` chunks of an update too large for one message, in index order.

    Chunk 0 carries the header and the KEM encapsulation, the last chunk the device's
    signature over header ‖ a running digest of every chunk (docs/protocol.md, chunked updates).
    """

    TYPE: ClassVar[str] = "update.chunk"
    update_id: UpdateId
    index: ChunkIndex
    count: Annotated[int, Field(ge=2, le=MAX_CHUNKS)]
    header: Encoded | None = None
    enc: Key | None = None
    sealed: Payload
    sig_alg: AlgName | None = None
    signature: Key | None = None


class RoundResult(Message):
    TYPE: ClassVar[str] = "round.result"
    round_id: int
    accepted: int
    rejected: Annotated[dict[Label, int], Field(max_length=256)] = {}
    accuracy: float | None = None
    #: Everything the task's evaluation reported (e.g. accuracy, loss), by name.
    metrics: Annotated[dict[Annotated[str, Field(min_length=1, max_length=64)], float], Field(max_length=16)] = {}
    seconds: float
    status: Label  # "completed" | "failed" | "cancelled"
    reason: Label | None = None  # why a round failed: too_few_updates or too_few_accepted


class GlobalModel(Message):
    """Signed by the enclave: the model every device must start from."""

    TYPE: ClassVar[str] = "model.global"
    version: Annotated[int, Field(ge=0)]
    layout_id: Annotated[str, Field(min_length=1, max_length=64)]
    params: Blob  # little-endian float32 vector; empty when it follows in chunks
    created_at: float
    result: RoundResult | None = None
    next_round: RoundSpec | None = None
    #: SHA-256 of each ``ModelChunk`` carrying ``params``, when it is too large for one message.
    chunk_digests: Annotated[list[Sha256], Field(max_length=MAX_CHUNKS)] = []


class ShardPartial(Message):
    """Shard → root, signed by the shard's attested enclave key, then sealed to the root's KEM
    key (``PartialEnvelope``): one shard's screened part of a round (docs/scaling.md).

    ``weight_total`` is Σ wᵢ over the shard's accepted updates (capped sample counts),
    ``weighted_sum`` the shard's screened aggregate times it (little-endian float64, one per
    parameter, empty when none was accepted): with FedAvg that is Σ wᵢ·Δᵢ, so the root's
    Σ sums / Σ totals is one enclave's FedAvg over the same updates.
    """

    TYPE: ClassVar[str] = "shard.partial"
    round_id: Annotated[int, Field(ge=1)]
    shard: Annotated[int, Field(ge=0, lt=MAX_SHARDS)]
    shards: Annotated[int, Field(ge=2, le=MAX_SHARDS)]
    base_version: Annotated[int, Field(ge=0)]
    layout_id: Annotated[str, Field(min_length=1, max_length=64)]
    weighted_sum: Blob
    weight_total: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    received: Annotated[int, Field(ge=0, le=MAX_EXPECTED)]
    accepted: Annotated[int, Field(ge=0, le=MAX_EXPECTED)]
    rejected: Annotated[dict[Label, Annotated[int, Field(ge=0, le=MAX_EXPECTED)]], Field(max_length=256)] = {}
    issued_at: float


class PeerAdmission(Message):
    """Shard → the other shards: the coordinator's signed admission of this shard's report.
    Every shard holds the same enclave keys but answered its own challenge, so devices' grants
    name whichever report the coordinator admitted last; a shard takes another's report as its
    own only under the coordinator's signature and when it names this shard's code and keys."""

    TYPE: ClassVar[str] = "shard.admission"
    report: Encoded  # the Signed(AttestationReport) the coordinator admitted
    accept: Encoded  # the coordinator's Signed(AttestAccept) binding it


class PartialEnvelope(Message):
    """A ``Signed(ShardPartial)`` sealed to the root enclave's KEM key; the clear fields are
    bound as associated data (common/shards.py ``partial_aad``) and repeated inside."""

    TYPE: ClassVar[str] = "shard.partial.sealed"
    round_id: Annotated[int, Field(ge=1)]
    shard: Annotated[int, Field(ge=0, lt=MAX_SHARDS)]
    base_version: Annotated[int, Field(ge=0)]
    sealed: Blob


class ModelChunk(Message):
    """A slice of a chunked global model's parameters; the signed model names its digest."""

    TYPE: ClassVar[str] = "model.chunk"
    version: Annotated[int, Field(ge=0)]
    index: ChunkIndex
    count: Annotated[int, Field(ge=2, le=MAX_CHUNKS)]
    data: Blob


class Event(Message):
    """Published on the events topic exchange with routing key ``type``."""

    TYPE: ClassVar[str] = "event"
    type: Annotated[str, Field(min_length=1, max_length=128)]
    at: float
    device_id: Annotated[str, Field(max_length=128)] | None = None
    round_id: int | None = None
    reason: Label | None = None
    detail: Annotated[dict[Label, BoundedScalar], Field(max_length=64)] = {}


ALL_MESSAGES: tuple[type[Message], ...] = (
    Signed, ErrorReply, Ping, Pong,
    EnrollClaim, EnrollRequest, EnrollAccept, EnrollConfirm,
    SessionRequest, SessionGrant, SessionAccept, SessionHello, SessionConfirm, GrantMac, GrantKey, SessionCall,
    StatusRequest, StatusReply,
    KeyRotation, RotationRequest, RotationAccept, CoordinatorKeys, KeysRequest, KeyChain,
    AttestationReport, AttestChallengeRequest, AttestChallenge, AttestRequest, AttestAccept,
    RoundSpec, RoundOpen, RoundAbort, Revocation, KeyEpoch, RootData,
    RoundStart, RoundStarted, RoundCancel, RoundCancelled, RoundListRequest, RoundStatusRequest, RoundInfo,
    RoundPlan, RoundTable, TokenCreate, TokenCreated, DeviceListRequest, DeviceInfo, DeviceTable, DeviceRevoke,
    DeviceRevoked, EnclaveReportRequest, EnclaveReport, RootDataSubmit, RootDataForwarded,
    UpdateHeader, Update, UpdateChunk, RoundResult, GlobalModel, ModelChunk, ShardPartial, PartialEnvelope,
    PeerAdmission, Event,
)
BY_TYPE: dict[str, type[Message]] = {m.TYPE: m for m in ALL_MESSAGES}
assert len(BY_TYPE) == len(ALL_MESSAGES), "duplicate message TYPE"

#: Every request the coordinator accepts on its operator queue, each inside Signed.
OPERATOR_REQUESTS: tuple[type[OperatorRequest], ...] = (
    RoundStart, RoundCancel, RoundListRequest, RoundStatusRequest, TokenCreate, DeviceListRequest, DeviceRevoke,
    EnclaveReportRequest, RootDataSubmit,
)
