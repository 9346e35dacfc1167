"""QFLARE settings: one pydantic-settings model, validated at start with readable errors.

Sources, highest first: keyword arguments, ``QFLARE_*`` environment variables (nested with
``__``, e.g. ``QFLARE_FL__ROUNDS=5``), a ``.env`` file, the YAML file named by ``--config``
or ``QFLARE_CONFIG``, then defaults.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from common.chunks import MESSAGE_OVERHEAD
from common.shards import MAX_SHARDS
from common.task import DEFAULT_TASK, SPEC_PATTERN
from pqc.ids import ALIASES, DEFAULT_KEM, DEFAULT_SIG, KemId, SigId

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class ConfigError(Exception):
    """Bad configuration; the message is one line naming the field and the reason."""


def _canonical(name: str, kind: type[KemId | SigId]) -> str:
    canon = ALIASES.get(name, name)
    if canon != name:
        from pqc.registry import note_alias

        note_alias(name)
    valid = {k.value for k in kind}
    if canon not in valid:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(valid)}")
    return canon


class Section(BaseModel):
    """A nested block of settings: a typo'd field (``fl: {roundz: 5}``) is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


MIB = 1024 * 1024


class BrokerRoles(Section):
    """Which broker users play which role (docs/security.md, Broker identities).

    Empty: the namespace's own user for the role (``Names.service_user``), or ``guest`` when
    the AMQP URL itself is guest on loopback (the demo and the tests).
    """

    coordinator: list[str] = []
    enclave: list[str] = []
    operator: list[str] = []


class BrokerSettings(Section):
    namespace: str = Field("qflare", pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    #: RabbitMQ management API; default: the AMQP host, port 15672, https when amqps.
    #: Credentials may be given in the URL; else the AMQP URL's are used.
    management_url: str | None = Field(None, pattern=r"^https?://")
    roles: BrokerRoles = BrokerRoles()
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    prefetch: int = Field(32, ge=1, le=10_000)
    rpc_timeout: float = Field(15.0, gt=0)
    delivery_limit: int = Field(5, ge=1, le=1000)
    max_message_bytes: int = Field(16 * MIB, ge=4096, le=128 * MIB)
    #: The dead-letter queue keeps at most this many bytes (oldest dropped first) ...
    dead_letter_max_bytes: int = Field(64 * MIB, ge=MIB)
    #: ... for at most this long.
    dead_letter_ttl_seconds: float = Field(7 * 86400.0, gt=0)
    #: A dead-lettered body is cut to this many bytes (headers and reason are kept whole).
    dead_letter_body_bytes: int = Field(4096, ge=0, le=MIB)
    #: Policy on every client queue of the namespace (``<ns>.client.*``): bytes held, ...
    client_queue_max_bytes: int = Field(64 * MIB, ge=MIB)
    #: ... and how long an unused one lives.
    client_queue_expires_seconds: float = Field(3600.0, gt=0)
    #: ``qflare broker setup`` caps the vhost's queues (a vhost of the deployment's own; null: no cap).
    vhost_max_queues: int | None = Field(None, ge=16)
    #: Connections one device's broker user may hold at once.
    device_max_connections: int = Field(4, ge=1, le=1000)
    #: Updates a fleet's channel has awaiting the broker's confirm at once; the next device's
    #: update waits for a slot, and that wait is not counted against the confirm timeout (a
    #: fleet of thousands queued all its publishes on one channel, where they timed out
    #: unsent: docs/scaling.md, the load generator).
    publish_window: int = Field(64, ge=1, le=10_000)
    #: Confirming channels a fleet spreads its devices' updates over, on its one connection
    #: (each channel writes one message at a time).
    publish_channels: int = Field(1, ge=1, le=64)
    #: Further nodes of the same RabbitMQ cluster, tried in turn when ``amqp_url`` does not
    #: answer or its connection is lost (docs/scaling.md, A RabbitMQ cluster). Also written as
    #: a comma list in ``amqp_url``: ``QFLARE_AMQP_URL=amqp://u:p@a:5672/,amqp://u:p@b:5672/``.
    failover_urls: list[Annotated[str, Field(pattern=r"^amqps?://")]] = []
    #: Members of each quorum queue and stream, fixed when the queue is first declared and capped
    #: by the broker at the cluster's node count; null: the broker's default (every node of the
    #: cluster at that time). Changing it for queues that exist is refused (PRECONDITION_FAILED).
    replicas: int | None = Field(None, ge=1, le=99)


class CryptoSettings(Section):
    kem: str = DEFAULT_KEM.value
    signature: str = DEFAULT_SIG.value
    allowed_kems: list[str] = [KemId.ML_KEM_768, KemId.ML_KEM_1024, KemId.ML_KEM_768_X25519,
                               KemId.FRODOKEM_640_AES]
    allowed_signatures: list[str] = [SigId.ML_DSA_44, SigId.ML_DSA_65, SigId.ML_DSA_87]
    session_ttl_seconds: float = Field(3600.0, gt=0)
    freshness_seconds: float = Field(120.0, gt=0)
    #: Allow on the live path a KEM that only the pure-Python backend serves here (e.g.
    #: FrodoKEM-640-AES without liboqs). Off by default: that backend is not constant time
    #: (docs/crypto.md); the demo turns it on.
    allow_pure_backends: bool = False
    #: The session handshake a device asks for (docs/crypto.md, "KEM handshake"): ``kem-v3``
    #: (kem-v2 with the device authenticated by a MAC key from its enrolment instead of a third
    #: KEM; a device without one falls back to kem-v2), ``kem-v2`` (KEM authentication, key
    #: confirmation, a MACed grant; no coordinator signature per session) or ``sig-v1`` (a
    #: signed request, a coordinator-signed grant).
    handshake: Literal["kem-v3", "kem-v2", "sig-v1"] = "kem-v3"
    #: The handshakes the coordinator answers; a request for another is refused.
    accepted_handshakes: list[Literal["kem-v3", "kem-v2", "sig-v1"]] = Field(["kem-v3", "kem-v2", "sig-v1"],
                                                                              min_length=1)

    @field_validator("kem")
    @classmethod
    def _kem(cls, v: str) -> str:
        return _canonical(v, KemId)

    @field_validator("signature")
    @classmethod
    def _sig(cls, v: str) -> str:
        return _canonical(v, SigId)

    @field_validator("allowed_kems")
    @classmethod
    def _kems(cls, v: list[str]) -> list[str]:
        return [_canonical(x, KemId) for x in v]

    @field_validator("allowed_signatures")
    @classmethod
    def _sigs(cls, v: list[str]) -> list[str]:
        return [_canonical(x, SigId) for x in v]


class FLSettings(Section):
    #: The task federated: ``MODULE:OBJECT`` (common/task.py; docs/tasks.md).
    task: str = Field(DEFAULT_TASK, pattern=SPEC_PATTERN)
    rounds: int = Field(3, ge=1)
    min_updates: int = Field(2, ge=1)
    #: Fewest updates the screening must accept for the enclave to publish a model; fewer
    #: is a failed round (``too_few_accepted``), so one device can never set the model alone.
    min_accepted: int = Field(3, ge=1)
    #: A device's aggregation weight is its claimed sample count capped at this multiple of
    #: the round's median claim and at ``max_num_samples`` (docs/security.md, "Sample counts").
    sample_cap_multiple: float = Field(2.0, ge=1)
    max_num_samples: int = Field(1_000_000, ge=1, le=10**9)
    deadline_seconds: float = Field(60.0, gt=0)
    epochs: int = Field(2, ge=1, le=100)
    lr: float = Field(0.1, gt=0, le=10)
    batch_size: int = Field(16, ge=1)
    aggregator: Literal["fedavg", "median", "trimmed_mean", "multi_krum"] = "fedavg"
    trim_beta: float = Field(0.1, ge=0, lt=0.5)
    krum_f: int = Field(1, ge=0)
    max_norm: float | None = Field(None, gt=0)
    norm_median_multiple: float | None = Field(3.0, gt=1)
    min_cosine: float | None = Field(0.0, ge=-1, le=1)
    #: The robust defence (enclave_worker/defend.py, docs/robustness.md); False: the legacy
    #: norm + cosine-to-median filters with streaming FedAvg.
    defend: bool = True
    outlier_mads: float | None = Field(None, gt=0)
    copy_cosine: float | None = Field(0.99, gt=0, lt=1)
    rescale: Literal["median", "clip", "none"] = "median"
    trust_weighting: bool = True
    trust_power: float = Field(3.0, gt=0, le=8)
    #: Trust weighting applies in a round only if it raises the aggregate's cosine to the
    #: reference by this much (docs/robustness.md): on one-class shards it would lower it.
    #: None: always ``trust_power`` (FLTrust's fixed rule).
    trust_min_gain: float | None = Field(0.02, ge=0, le=1)
    trust_relative: bool = True
    reputation_decay: float = Field(0.7, ge=0, lt=1)
    quarantine_below: float | None = Field(0.5, gt=0, lt=1)
    #: Most floats the defence holds at once: the k x d updates and about 12 k x k for its Gram
    #: matrix and the copies of it (enclave_worker/service.py: defend_floats); larger rounds
    #: close with the legacy streaming filters. 2**28 floats = 1 GiB: about 4,500 updates of 4,810 floats.
    defend_max_floats: int = Field(2**28, ge=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    seed: int = 0
    evaluate: bool = True
    #: How devices encode updates: float32, int8 (a scale per chunk) or top-k, the last two
    #: with error feedback (what was dropped is added to the device's next update).
    compression: Literal["none", "int8", "topk"] = "none"
    topk_fraction: float = Field(0.1, gt=0, le=1)
    #: ``sync``: rounds wait for their expected devices or their deadline. ``async`` (FedBuff):
    #: a round is a window in which devices train whenever online on the latest model, and the
    #: enclave publishes a new model every ``buffer_size`` accepted updates (docs/protocol.md).
    mode: Literal["sync", "async"] = "sync"
    #: Async: accepted updates per new model (the filters run on each buffer).
    buffer_size: int = Field(5, ge=1, le=10_000)
    #: Async: an update trained on a model more than this many versions old is refused
    #: (``too_stale``); younger ones weigh 1/sqrt(1 + staleness).
    max_staleness: int = Field(8, ge=0, le=10_000)


class ChunkingSettings(Section):
    #: Updates and global models larger than this travel as chunks of at most this size
    #: (well under RabbitMQ 4.x's 16 MiB message limit).
    chunk_bytes: int = Field(4 * 1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    #: Chunked updates the enclave reassembles at once (each holds one model-sized buffer);
    #: the first chunk of one more is refused as ``busy``.
    max_in_progress: int = Field(4, ge=1, le=256)
    #: A chunked update whose next chunk takes longer than this is refused as ``incomplete``.
    assembly_timeout_seconds: float = Field(60.0, gt=0)


class RateLimitSettings(Section):
    enroll_per_device_per_s: float = Field(0.2, gt=0)
    enroll_per_device_burst: float = Field(3, ge=1)
    session_per_device_per_s: float = Field(1.0, gt=0)
    session_per_device_burst: float = Field(10, ge=1)
    global_per_s: float = Field(5000.0, gt=0)
    global_burst: float = Field(10000.0, ge=1)


class EnclaveSettings(Section):
    #: Allowed code measurements (hex). Empty: only this installation's own measurement.
    allowed_measurements: list[str] = []
    #: The (simulated) platform's public.json the coordinator trusts; default
    #: ``<platform_dir>/public.json``, which the enclave creates on first start.
    platform_key_file: Path | None = None
    #: Where the simulated platform keeps its private key, apart from every service's state
    #: (that key unseals the enclave's keys); default ``<state_dir>-platform``, a sibling.
    platform_dir: Path | None = None
    #: /healthz, /readyz and /metrics of ``qflare enclave run`` (None: off; 0: any free port).
    http_port: int | None = Field(None, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    #: The coordinator key the enclave obeys (``qflare coordinator fingerprint`` prints it);
    #: default: the coordinator key under this host's state directory, if there is one. The
    #: enclave follows the coordinator's signed key chain from it and trusts nothing else.
    coordinator_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    #: How long ``qflare enclave run`` waits for the coordinator to admit it before giving up.
    attest_timeout_seconds: float = Field(60.0, gt=0)
    #: Enclave workers sharing the namespace's devices (docs/scaling.md, "Sharded enclaves"):
    #: 1 is one enclave doing everything; N > 1 runs N shard workers, each screening the
    #: devices whose ``common.shards.shard_of`` is its index, shard 0 also the root that
    #: combines their partial aggregates and signs the global model. Devices (and
    #: ``qflare device broker-user``) need it too: it picks their updates' routing key.
    shards: int = Field(1, ge=1, le=MAX_SHARDS)
    #: This worker's index in ``0 .. shards - 1`` (``QFLARE_ENCLAVE__SHARD``).
    shard: int = Field(0, ge=0, lt=MAX_SHARDS)
    #: How long the root (shard 0) waits past a round's deadline for the other shards'
    #: partials before it makes the model from those it has (``shard.missing`` for the rest).
    partial_wait_seconds: float = Field(10.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _shard_in_range(self) -> EnclaveSettings:
        if self.shard >= self.shards:
            raise ValueError(f"enclave.shard {self.shard} is not below enclave.shards {self.shards}")
        return self


class CoordinatorSettings(Section):
    #: Requests the coordinator takes from its queue at once (its channel's prefetch). Its
    #: requests are a few KB, and the registry's group commit shares one commit among every
    #: request in flight, so it takes more than ``broker.prefetch``, which is sized for
    #: multi-megabyte updates: kem-v3 sessions cost ~0.17 ms each at 32 in flight, ~0.14 at 128.
    prefetch: int = Field(128, ge=1, le=10_000)
    #: /healthz, /readyz and /metrics of ``qflare coordinator run`` (None: off; 0: any free port).
    http_port: int | None = Field(None, ge=0, le=65535)
    http_host: str = "127.0.0.1"


class EventsSettings(Section):
    #: Body of events on the events exchange: JSON for other systems, or the msgpack envelope.
    format: Literal["json", "msgpack"] = "json"
    #: Bytes of event history the durable events stream keeps for consumers that replay.
    stream_max_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024)
    #: Sessions are announced together: one ``sessions.opened`` event per this many seconds
    #: (when any opened), not one per session, which would cost more than the handshake.
    sessions_every_seconds: float = Field(1.0, gt=0, le=3600)


class DashboardSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: The operator credential the dashboard asks for (required to start it).
    token: SecretStr | None = None


class OperatorSettings(Section):
    """Who may steer the coordinator, and how far (docs/security.md, "Operator requests")."""

    #: Coordinator side: fingerprints of the operator keys whose signed requests it obeys
    #: (``qflare operator init`` prints one). Empty: every operator request is refused.
    pinned_fingerprints: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = []
    #: Operator side: where ``qflare operator init`` keeps the operator key (default
    #: ``<state_dir>/operator``).
    key_dir: Path | None = None
    #: Operator side: the coordinator fingerprint replies must chain to (default: the
    #: coordinator key found under this host's state directory, if any).
    coordinator_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    #: Bounds on every field of ``round start`` (and on a plan resumed after a restart).
    max_rounds: int = Field(100, ge=1, le=10_000)
    max_deadline_seconds: float = Field(3600.0, gt=0, le=7 * 86400)
    max_epochs: int = Field(20, ge=1, le=100)
    max_lr: float = Field(1.0, gt=0, le=10)
    max_batch_size: int = Field(1024, ge=1, le=100_000)
    max_token_ttl_seconds: float = Field(30 * 86400.0, gt=0)


class RecoverySettings(Section):
    """How the parties ride out broker outages, restarts and sleeping devices (docs/operations.md)."""

    #: Seconds between a robust connection's reconnect attempts (services and simulated fleets).
    reconnect_seconds: float = Field(2.0, gt=0, le=300)
    #: A round whose deadline passed while the enclave's broker link was down closes this long
    #: after the link came back, so redelivered and resent updates still count.
    close_grace_seconds: float = Field(15.0, ge=0, le=3600)
    #: Past a round's deadline plus this, a coordinator that heard no close reports
    #: ``round.stalled`` (a warning), asks the enclave again, and keeps waiting.
    stall_report_seconds: float = Field(60.0, gt=0, le=86400)
    #: How long the coordinator waits for an absent enclave before it cancels the plan.
    stall_limit_seconds: float = Field(3600.0, gt=0, le=7 * 86400)
    #: ``qflare agent run``: first and largest pause between broker connection attempts
    #: (exponential, with full jitter), forever.
    agent_backoff_min_seconds: float = Field(1.0, gt=0, le=60)
    agent_backoff_max_seconds: float = Field(60.0, gt=0, le=3600)
    #: A device joins an open round only if this much time is left beyond its last training time.
    join_margin_seconds: float = Field(2.0, ge=0, le=600)


class Settings(BaseSettings):
    """Everything a QFLARE process can be told; one instance per process."""

    model_config = SettingsConfigDict(
        env_prefix="QFLARE_", env_nested_delimiter="__", env_file=".env",
        extra="forbid", validate_default=True,
    )

    amqp_url: str = Field(DEFAULT_AMQP_URL, pattern=r"^amqps?://")
    state_dir: Path = Path(".qflare")
    registry_path: Path | None = None
    #: The registry as a PostgreSQL URL (``postgresql://user@host:5432/db``), shared by several
    #: coordinators (docs/scaling.md); unset: the embedded SQLite file ``registry_path``.
    registry_url: str | None = Field(None, pattern=r"^postgres(ql)?://")
    broker: BrokerSettings = BrokerSettings()
    crypto: CryptoSettings = CryptoSettings()
    fl: FLSettings = FLSettings()
    chunking: ChunkingSettings = ChunkingSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    enclave: EnclaveSettings = EnclaveSettings()
    operator: OperatorSettings = OperatorSettings()
    recovery: RecoverySettings = RecoverySettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    events: EventsSettings = EventsSettings()
    dashboard: DashboardSettings = DashboardSettings()

    @model_validator(mode="before")
    @classmethod
    def _url_list(cls, data: Any) -> Any:
        """``amqp_url`` as a comma list: the first is ``amqp_url``, the others ``broker.failover_urls``."""
        if not isinstance(data, dict) or not isinstance(data.get("amqp_url"), str) or "," not in data["amqp_url"]:
            return data
        first, *rest = [u.strip() for u in data["amqp_url"].split(",") if u.strip()]
        broker = data.get("broker")
        if isinstance(broker, BrokerSettings):
            broker = broker.model_dump(exclude_unset=True)
        broker = dict(broker or {})
        if broker.get("failover_urls"):
            raise ValueError("give the cluster's URLs once: as a comma list in amqp_url or as broker.failover_urls")
        return {**data, "amqp_url": first, "broker": {**broker, "failover_urls": rest}}

    @model_validator(mode="after")
    def _one_scheme(self) -> Settings:
        scheme = self.amqp_url.split("://", 1)[0]
        odd = [u for u in self.broker.failover_urls if u.split("://", 1)[0] != scheme]
        if odd:
            shown = odd[0].split("://", 1)[0] + "://" + odd[0].split("://", 1)[-1].split("@")[-1]  # no password
            raise ValueError(f"every broker URL must use {scheme}:// like amqp_url (got {shown!r})")
        return self

    @property
    def amqp_urls(self) -> list[str]:
        """Every broker URL, in the order clients try them: ``amqp_url``, then the failover ones."""
        return [self.amqp_url, *(u for u in self.broker.failover_urls if u != self.amqp_url)]

    @model_validator(mode="after")
    def _chunks_fit_messages(self) -> Settings:
        if self.chunking.chunk_bytes > self.broker.max_message_bytes - MESSAGE_OVERHEAD:
            raise ValueError(f"chunking.chunk_bytes ({self.chunking.chunk_bytes}) must leave "
                             f"{MESSAGE_OVERHEAD // 1024} KiB under "
                             f"broker.max_message_bytes ({self.broker.max_message_bytes})")
        return self

    @property
    def registry_file(self) -> Path:
        return self.registry_path or self.state_dir / "registry.sqlite3"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings]
        config = _config_path
        if config is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config))
        return tuple(sources)


_config_path: Path | None = None

ENV_PREFIX = "QFLARE_"
#: ``QFLARE_*`` variables that are not fields: the config file, and the namespace's short name.
ENV_EXTRA = {"config", "namespace"}
#: Fields that were renamed, so an old configuration is told what to write instead.
RENAMED = {"metrics_port": "coordinator.http_port and enclave.http_port"}


def unknown_env(environ: dict[str, str] | None = None) -> list[str]:
    """``QFLARE_*`` variables no setting reads (pure): a typo there is otherwise ignored."""
    environ = os.environ if environ is None else environ
    bad = []
    for key in environ:
        if not key.upper().startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        if parts[0] in ENV_EXTRA and len(parts) == 1:
            continue
        model: type[BaseModel] | None = Settings
        for part in parts:
            field = model.model_fields.get(part) if model is not None else None
            if field is None:
                bad.append(key)
                break
            ann = field.annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(bad)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _explain(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "settings"
    if err["type"] == "extra_forbidden":
        *parent, name = [str(p) for p in err["loc"]]
        if not parent and name in RENAMED:
            return f"{name}: was replaced by {RENAMED[name]}"
        model: type[BaseModel] = Settings
        for p in parent:
            ann = model.model_fields[p].annotation if p in model.model_fields else None
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else model
        return f"{where}: unknown setting{_suggest(name, list(model.model_fields))}"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across fields: its input is every setting, secrets included
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {err.get('input')!r})"


def _namespace_alias(overrides: dict[str, Any]) -> None:
    """``QFLARE_NAMESPACE`` is the short name of ``broker.namespace`` (they must agree)."""
    short = next((v for k, v in os.environ.items() if k.upper() == "QFLARE_NAMESPACE"), None)
    if short is None:
        return
    long = next((v for k, v in os.environ.items() if k.upper() == "QFLARE_BROKER__NAMESPACE"), None)
    if long is not None and long != short:
        raise ConfigError(f"QFLARE_NAMESPACE={short!r} and QFLARE_BROKER__NAMESPACE={long!r} disagree; set one")
    broker = overrides.get("broker")
    if isinstance(broker, dict) and "namespace" not in broker:
        overrides["broker"] = {**broker, "namespace": short}
    elif broker is None:
        overrides["broker"] = {"namespace": short}


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from all sources; raise :class:`ConfigError` with one clear line."""
    global _config_path
    bad_env = unknown_env()
    renamed = [k for k in bad_env if k[len(ENV_PREFIX):].lower() in RENAMED]
    if renamed:
        name = renamed[0][len(ENV_PREFIX):].lower()
        raise ConfigError(f"unknown variable {renamed[0]}: {name} was replaced by {RENAMED[name]}")
    if bad_env:
        raise ConfigError(f"unknown variable {bad_env[0]}: no setting reads it"
                          + (f" (and {len(bad_env) - 1} more)" if len(bad_env) > 1 else "")
                          + "; settings are QFLARE_<FIELD>, nested with __, e.g. QFLARE_FL__ROUNDS")
    _namespace_alias(overrides)
    path = config or os.environ.get("QFLARE_CONFIG")
    _config_path = Path(path) if path else None
    if _config_path is not None and not _config_path.is_file():
        raise ConfigError(f"config: file {str(_config_path)!r} does not exist")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors()[0])) from None
    except Exception as exc:  # yaml syntax errors and the like
        raise ConfigError(f"config: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    finally:
        _config_path = None
