"""The operator's side of the operator plane: its key, and signed requests over the broker.

Any host holding the operator key can steer the coordinator: requests are signed by that key
(which the coordinator pins), sent on the operator exchange, and every reply must be signed
by the coordinator key this host pins (``operator.coordinator_fingerprint``, reached through
the coordinator's signed rotation chain) and name the request's nonce. Nothing here reads
the registry file, so the coordinator may run elsewhere.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import numpy as np

import pqc
from broker.client import BrokerClient
from common import handshake, rootdata
from common.attestation import local_coordinator_fingerprint
from common.settings import Settings
from pqc.identity import Identity
from schemas import signing
from schemas.messages import (
    CoordinatorKeys,
    EnclaveReport,
    EnclaveReportRequest,
    KeyChain,
    KeysRequest,
    Message,
    OperatorRequest,
    RootDataForwarded,
    RootDataSubmit,
    Signed,
)
from schemas.names import Names
from schemas.reasons import QflareError, Reason

R = TypeVar("R", bound=Message)


def operator_dir(settings: Settings) -> Path:
    """Where the operator key lives: ``operator.key_dir``, else ``<state_dir>/operator``."""
    return settings.operator.key_dir or settings.state_dir / "operator"


def init_operator(settings: Settings) -> tuple[Identity, bool]:
    """The operator key, made (0600, like every identity) if there is none yet; (key, made?)."""
    directory = operator_dir(settings)
    if (directory / "public.json").exists():
        return Identity.load(directory), False
    ident = Identity.generate(settings.crypto.signature, settings.crypto.kem)
    ident.save(directory)
    return ident, True


def load_operator(settings: Settings) -> Identity:
    directory = operator_dir(settings)
    if not (directory / "public.json").exists():
        raise FileNotFoundError(f"no operator key in {directory}; run `qflare operator init` and pin its "
                                "fingerprint in the coordinator's operator.pinned_fingerprints")
    return Identity.load(directory)


def pinned_coordinator(settings: Settings) -> str:
    """The coordinator fingerprint replies must chain to; a clear error when none is known."""
    fp = settings.operator.coordinator_fingerprint or local_coordinator_fingerprint(settings)
    if fp is None:
        raise QflareError(Reason.BAD_SIGNATURE, "no coordinator fingerprint to verify replies with: set "
                          "operator.coordinator_fingerprint (`qflare coordinator fingerprint` prints it)")
    return fp


class OperatorClient:
    """Signed operator requests over the broker; use as ``async with OperatorClient(s) as op``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.identity = load_operator(settings)
        self.pinned = pinned_coordinator(settings)
        self.broker: BrokerClient | None = None
        self.coordinator: CoordinatorKeys | None = None

    async def __aenter__(self) -> OperatorClient:
        self.broker = await BrokerClient.open(self.settings, name="qflare-operator", declare=False,
                                              client_id="operator")
        try:
            await self._require_operator_exchange()
            rpc = await self.broker.rpc()
            chain = await rpc.call(self.broker.names.rpc_exchange, Names.COORDINATOR_KEY, KeysRequest(), KeyChain,
                                   self.settings.broker.rpc_timeout)
            self.coordinator = handshake.follow_key_chain(chain.current, chain.rotations, self.pinned)
        except BaseException:
            await self.broker.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.broker is not None:
            await self.broker.close()

    async def _require_operator_exchange(self) -> None:
        """Say plainly that no coordinator serves this namespace (instead of a channel error)."""
        assert self.broker is not None
        channel = await self.broker.connection.channel()
        try:
            await channel.get_exchange(self.broker.names.operator_exchange, ensure=True)
        except aio_pika.exceptions.ChannelClosed:
            raise QflareError(Reason.TIMEOUT, f"no coordinator serves namespace {self.broker.names.namespace!r} "
                              f"({self.broker.names.operator_exchange} does not exist): start `qflare coordinator "
                              "run`") from None
        finally:
            if not channel.is_closed:
                await channel.close()

    def sign(self, request_type: type[OperatorRequest], **fields: Any) -> tuple[OperatorRequest, Signed]:
        """A fresh request (new nonce, current time) signed by the operator key."""
        i = self.identity
        req = request_type(operator_alg=i.sig_alg, operator_pk=i.sig_pk, nonce=secrets.token_bytes(32),
                           issued_at=time.time(), **fields)
        return req, signing.sign(req, i.sig_alg, i.sig_sk, i.sig_pk)

    async def send(self, req: OperatorRequest, signed: Signed, reply_type: type[R]) -> R:
        """Send a signed request; the reply, verified against the pinned coordinator key."""
        assert self.broker is not None and self.coordinator is not None, "use `async with`"
        rpc = await self.broker.rpc()
        reply = await rpc.call(self.broker.names.operator_exchange, Names.OPERATOR_KEY, signed, Signed,
                               self.settings.broker.rpc_timeout)
        answer = signing.verify(reply, reply_type, self.coordinator.sig_alg, self.coordinator.sig_pk)
        if getattr(answer, "request_nonce", None) != req.nonce:
            raise QflareError(Reason.BAD_SIGNATURE, f"the {reply_type.TYPE} reply answers another request")
        return answer

    async def call(self, request_type: type[OperatorRequest], reply_type: type[R], **fields: Any) -> R:
        req, signed = self.sign(request_type, **fields)
        return await self.send(req, signed, reply_type)

    async def send_root_data(self, x: np.ndarray, y: np.ndarray) -> str:
        """Seal root data to the enclave the coordinator admitted, sign it with the operator key
        and have the coordinator forward it; the enclave KEM fingerprint it was sealed to.

        The enclave obeys it only if this key is in its own ``operator.pinned_fingerprints``;
        its verdict is the event ``enclave.root_data`` (or ``enclave.root_data.rejected.*``)."""
        report = await self.call(EnclaveReportRequest, EnclaveReport)
        kem_fp, sealed = rootdata.seal_to(report.report, x, y)
        sent = await self.call(RootDataSubmit, RootDataForwarded, kem_fp=kem_fp, sealed=sealed, n_samples=len(y))
        return sent.kem_fp

    def open_token(self, sealed: bytes, request_nonce: bytes) -> str:
        """The token the coordinator sealed to this operator's KEM key."""
        i = self.identity
        return pqc.open_sealed(i.kem_sk, sealed, request_nonce, policy=pqc.Policy(kems={i.kem_alg})).decode()
