"""The operator plane: signed operator requests in, coordinator-signed replies out.

Requests arrive as ``Signed(<request>)`` on the operator queue (``Names.operator_queue``),
which only operator broker users can write, and are refused unless their broker-verified
``user_id`` is one of ``broker.roles.operator``. Checks run cheapest first, and nothing acts
before all of them passed: the signer's key is pinned (``operator.pinned_fingerprints``),
the signature verifies, ``issued_at`` is inside the freshness window, the nonce was never
seen (the registry remembers it), and every field is within the settings' bounds. Each
accepted request is audited with the operator's fingerprint; each refusal is an event
``operator.rejected.<reason>`` and a typed error reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pqc
from broker.principals import require_role
from common import operator_auth
from common.settings import Settings
from coordinator.registry import Device, RoundRecord
from schemas.codec import CodecError, encode
from schemas.messages import (
    OPERATOR_REQUESTS,
    DeviceInfo,
    DeviceListRequest,
    DeviceRevoke,
    DeviceRevoked,
    DeviceTable,
    EnclaveReport,
    EnclaveReportRequest,
    Message,
    OperatorRequest,
    RootDataForwarded,
    RootDataSubmit,
    RoundCancel,
    RoundCancelled,
    RoundInfo,
    RoundListRequest,
    RoundPlan,
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

if TYPE_CHECKING:
    from coordinator.service import Coordinator

log = logging.getLogger("qflare.coordinator")


def authenticate(signed: Signed, pinned: set[str], freshness_seconds: float, now: float) -> OperatorRequest:
    """The request inside ``signed`` if a pinned operator key signed it and it is fresh.

    The nonce is checked by the caller (it needs the registry); nothing here has effects.
    """
    return operator_auth.authenticate(signed, OPERATOR_REQUESTS, pinned, freshness_seconds, now)


def check_round_start(req: RoundStart, settings: Settings, device_status: Callable[[str], str | None]) -> None:
    """Refuse a plan outside the settings' bounds (pure but for the device look-up).

    ``device_status(id)`` is the registry status of a device, None when not enrolled.
    """
    op, fl = settings.operator, settings.fl

    def refuse(detail: str) -> QflareError:
        return QflareError(Reason.INVALID_FIELD, f"round.start: {detail}")

    if req.rounds > op.max_rounds:
        raise refuse(f"rounds {req.rounds} > operator.max_rounds {op.max_rounds}")
    if req.deadline_seconds > op.max_deadline_seconds:
        raise refuse(f"deadline_seconds {req.deadline_seconds:g} > operator.max_deadline_seconds "
                     f"{op.max_deadline_seconds:g}")
    if req.min_updates < fl.min_updates:
        raise refuse(f"min_updates {req.min_updates} < fl.min_updates {fl.min_updates}")
    if req.epochs > op.max_epochs:
        raise refuse(f"epochs {req.epochs} > operator.max_epochs {op.max_epochs}")
    if req.lr > op.max_lr:
        raise refuse(f"lr {req.lr:g} > operator.max_lr {op.max_lr:g}")
    if req.batch_size > op.max_batch_size:
        raise refuse(f"batch_size {req.batch_size} > operator.max_batch_size {op.max_batch_size}")
    if req.expected:
        if len(set(req.expected)) != len(req.expected):
            raise refuse("a device is named twice in expected")
        if req.min_updates > len(req.expected):
            raise refuse(f"min_updates {req.min_updates} > the {len(req.expected)} expected devices")
        for device_id in req.expected:
            status = device_status(device_id)
            if status != "active":
                raise QflareError(Reason.NOT_ENROLLED if status is None else Reason.REVOKED,
                                  f"round.start: expected device {device_id} is "
                                  f"{'not enrolled' if status is None else status}")


def round_info(r: RoundRecord) -> RoundInfo:
    return RoundInfo(round_id=r.round_id, status=r.status, opened_at=r.opened_at, deadline=r.deadline,
                     min_updates=r.min_updates, expected=r.expected, closed_at=r.closed_at, accepted=r.accepted,
                     rejected=r.rejected, accuracy=r.accuracy, version=r.version, reason=r.reason)


def device_info(d: Device) -> DeviceInfo:
    return DeviceInfo(device_id=d.device_id, status=d.status, sig_alg=d.sig_alg, sig_fp=d.sig_fp,
                      kem_alg=d.kem_alg, kem_fp=d.kem_fp, enrolled_at=d.enrolled_at, rotated_at=d.rotated_at,
                      revoked_at=d.revoked_at)


class OperatorDesk:
    """Serves the operator queue for one coordinator."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.pinned = set(coord.settings.operator.pinned_fingerprints)

    async def handle(self, signed: Signed, caller: str | None = None) -> Signed:
        """Authenticate, check, act; the reply is signed by the coordinator.

        First of all, the broker-verified sender must be an operator broker user (broker.roles).
        """
        try:
            require_role(self.coord.settings, "operator", caller)
            req = authenticate(signed, self.pinned, self.coord.settings.crypto.freshness_seconds, time.time())
            if not self.coord.registry.remember_nonce(
                    req.nonce, window_seconds=self.coord.settings.crypto.freshness_seconds * 2):
                raise QflareError(Reason.REPLAY, f"{req.TYPE} request seen before")
            reply = await self._act(req, signed)
        except CodecError as err:
            raise await self.coord._refuse("operator", err, None) from None
        except QflareError as err:
            raise await self.coord._refuse("operator", err, None) from None
        return self.coord._sign(reply)

    async def _act(self, req: OperatorRequest, signed: Signed) -> Message:
        who = f"operator:{pqc.fingerprint(req.operator_pk, req.operator_alg)[:16]}"
        registry = self.coord.registry
        if isinstance(req, RoundStart):
            check_round_start(req, self.coord.settings, self.coord.device_status)
            first = await self.coord.start_rounds(req)
            registry.audit(who, "round.plan.started", first=first, rounds=req.rounds,
                           deadline_seconds=req.deadline_seconds, min_updates=req.min_updates,
                           expected=len(req.expected))
            return RoundStarted(request_nonce=req.nonce, round_id=first, last_round_id=first + req.rounds - 1)
        if isinstance(req, RoundCancel):
            round_id, skipped = await self.coord.cancel_rounds(req.reason)
            registry.audit(who, "round.plan.cancelled", round_id=round_id, skipped=skipped, reason=req.reason)
            return RoundCancelled(request_nonce=req.nonce, round_id=round_id, skipped=skipped)
        if isinstance(req, RoundListRequest):
            return RoundTable(request_nonce=req.nonce, rounds=[round_info(r) for r in registry.list_rounds(req.limit)],
                              plan=self._plan())
        if isinstance(req, RoundStatusRequest):
            record = registry.get_round(req.round_id) if req.round_id else next(iter(registry.list_rounds(1)), None)
            if record is None:
                raise QflareError(Reason.NO_ROUND, f"no round {req.round_id}" if req.round_id else "no round yet")
            return RoundTable(request_nonce=req.nonce, rounds=[round_info(record)], plan=self._plan())
        if isinstance(req, TokenCreate):
            return self._token(req, who)
        if isinstance(req, DeviceListRequest):
            return DeviceTable(request_nonce=req.nonce,
                               devices=[device_info(d) for d in registry.list_devices(req.status)])
        if isinstance(req, DeviceRevoke):
            try:
                await self.coord.revoke(req.device_id, req.reason)
            except KeyError:
                raise QflareError(Reason.NOT_ENROLLED, f"no device {req.device_id}") from None
            device = registry.get_device(req.device_id)
            return DeviceRevoked(request_nonce=req.nonce, device_id=req.device_id,
                                 revoked_at=device.revoked_at or time.time())
        if isinstance(req, EnclaveReportRequest):
            from coordinator.service import META_ENCLAVE_REPORT

            raw = registry.get_meta(META_ENCLAVE_REPORT)
            if raw is None:
                raise QflareError(Reason.NO_ENCLAVE, "no attested enclave yet: start `qflare enclave run` first")
            return EnclaveReport(request_nonce=req.nonce, report=raw)
        if isinstance(req, RootDataSubmit):
            # forwarded as the operator signed it: the enclave checks that signature itself
            broker = self.coord.broker
            if broker is None:  # pragma: no cover - the desk only serves a running coordinator
                raise QflareError(Reason.TIMEOUT, "the coordinator is not connected to the broker")
            await broker.publisher.publish(broker.names.control_exchange, Names.ENCLAVE_CONTROL_KEY, signed)
            registry.audit(who, "root_data.forwarded", kem_fp=req.kem_fp, samples=req.n_samples)
            return RootDataForwarded(request_nonce=req.nonce, kem_fp=req.kem_fp)
        raise QflareError(Reason.UNKNOWN_TYPE, req.TYPE)  # pragma: no cover - OPERATOR_REQUESTS is exhaustive

    def _plan(self) -> RoundPlan | None:
        plan = self.coord.running_plan()
        return RoundPlan(first_round_id=plan[0], last_round_id=plan[1]) if plan else None

    def _token(self, req: TokenCreate, who: str) -> TokenCreated:
        limit = self.coord.settings.operator.max_token_ttl_seconds
        if req.ttl_seconds > limit:
            raise QflareError(Reason.INVALID_FIELD, f"token.create: ttl_seconds {req.ttl_seconds:g} > "
                                                    f"operator.max_token_ttl_seconds {limit:g}")
        existing = self.coord.registry.get_device(req.device_id)
        if existing is not None and existing.status == "revoked":
            raise QflareError(Reason.REVOKED, f"device {req.device_id} is revoked and can never enroll again")
        self.coord.policy.check_kem(req.reply_kem_alg)
        token = self.coord.registry.create_token(req.device_id, req.ttl_seconds)
        try:
            sealed = pqc.seal(req.reply_kem_alg, req.reply_kem_pk, token.encode(), req.nonce)
        except (ValueError, pqc.errors.QflareCryptoError) as exc:
            self.coord.registry.revoke_token(token)
            raise QflareError(Reason.MALFORMED, f"token.create: reply key refused: {exc}") from None
        self.coord.registry.audit(who, "token.issued", req.device_id, ttl_seconds=req.ttl_seconds)
        return TokenCreated(request_nonce=req.nonce, device_id=req.device_id, sealed_token=sealed,
                            expires_at=time.time() + req.ttl_seconds,
                            coordinator_fingerprint=self.coord.identity.sig_fp,
                            coordinator_keys=encode(self.coord.keys_message))  # one-RPC enrolment
