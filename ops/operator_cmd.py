"""Operator commands: ``qflare operator init``, ``token create``, ``device list|revoke`` and
``round start|list|status|cancel``, all signed by the operator key and sent over the broker
(:mod:`ops.operator_client`), so they work from any host holding that key.

The commands are registered on the CLI's groups by :func:`register`, which also hands over
the CLI's shell helpers (settings, error lines, JSON output).
"""

from __future__ import annotations

import base64
import re
import time
from types import ModuleType

import typer
from pydantic import ValidationError
from rich.table import Table

operator_app = typer.Typer(help="The operator key that signs every state-changing request.", no_args_is_help=True)


def register(app: typer.Typer, token_app: typer.Typer, device_app: typer.Typer, round_app: typer.Typer,
             coordinator_app: typer.Typer, shell: ModuleType) -> None:
    """Add the operator commands to the CLI; ``shell`` is :mod:`ops.cli` (settings, run, fail...)."""
    from ops.operator_client import OperatorClient, init_operator, local_coordinator_fingerprint

    app.add_typer(operator_app, name="operator")

    def call(request_type, reply_type, **fields):
        """Sign and send one request; the verified reply (errors become one line)."""
        from schemas.reasons import QflareError, Reason

        s = shell.settings()

        async def go():
            async with OperatorClient(s) as op:
                try:
                    req, signed = op.sign(request_type, **fields)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    raise QflareError(Reason.INVALID_FIELD, f"{request_type.TYPE}.{'.'.join(map(str, err['loc']))}: "
                                                            f"{err['msg']}") from None
                return op, req, await op.send(req, signed, reply_type)

        return shell.run(go())

    @operator_app.command("init")
    def operator_init(json_out: bool = typer.Option(False, "--json")) -> None:
        """Make this host's operator key (once) and print the fingerprint the coordinator pins."""
        from ops.operator_client import operator_dir

        s = shell.settings()
        ident, made = init_operator(s)
        out = {"fingerprint": ident.sig_fp, "key_dir": str(operator_dir(s)), "created": made,
               "coordinator_fingerprint": s.operator.coordinator_fingerprint or local_coordinator_fingerprint(s)}
        if json_out:
            shell.print_json(out)
            return
        shell.console.print(
            f"operator key {'created' if made else 'already present'} in {out['key_dir']} (mode 0600)\n"
            f"fingerprint:\n  {ident.sig_fp}\n"
            "pin it in the coordinator's settings:\n"
            f"  operator:\n    pinned_fingerprints: [{ident.sig_fp}]\n"
            "or in its environment:\n"
            f"  export QFLARE_OPERATOR__PINNED_FINGERPRINTS='[\"{ident.sig_fp}\"]'",
            highlight=False, markup=False, soft_wrap=True)  # soft_wrap: lines stay whole, to copy

    @coordinator_app.command("fingerprint")
    def coordinator_fingerprint(json_out: bool = typer.Option(False, "--json")) -> None:
        """Print the coordinator's key fingerprint (for devices, the enclave's
        enclave.coordinator_fingerprint and operator.coordinator_fingerprint); makes the key on
        first use, so the enclave and devices can be provisioned before the coordinator starts."""
        from coordinator.service import load_identity

        s = shell.settings()
        fp = local_coordinator_fingerprint(s)
        if fp is None:
            fp = load_identity(s).sig_fp
            shell.err_console.print(f"made the coordinator's keys in {s.state_dir / 'coordinator'} (mode 0600)",
                                    highlight=False, markup=False)
        if json_out:
            shell.print_json({"coordinator_fingerprint": fp})
        else:
            shell.console.print(fp, highlight=False, markup=False)

    @token_app.command("create")
    def token_create(device_id: str = typer.Option(..., "--device-id", help="The device this token enrolls."),
                     ttl: str = typer.Option("24h", help="Lifetime: 90s, 15m, 24h, 7d."),
                     json_out: bool = typer.Option(False, "--json")) -> None:
        """Create a one-time token (signed request; the token comes back sealed to this operator)."""
        from schemas.messages import TokenCreate, TokenCreated

        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", device_id):
            raise shell.fail("device id must be 1-128 characters of A-Z a-z 0-9 _ . -", 2)
        seconds = shell.parse_duration(ttl)
        s = shell.settings()
        from ops.operator_client import load_operator

        me = load_operator(s)
        op, req, reply = call(TokenCreate, TokenCreated, device_id=device_id, ttl_seconds=seconds,
                              reply_kem_alg=me.kem_alg, reply_kem_pk=me.kem_pk)
        token = op.open_token(reply.sealed_token, req.nonce)
        out = {"device_id": device_id, "token": token, "expires_in_seconds": seconds, "expires_at": reply.expires_at,
               "coordinator_fingerprint": reply.coordinator_fingerprint}
        if reply.coordinator_keys is not None:  # the device checks them against the fingerprint (one-RPC enrolment)
            out["coordinator_keys"] = base64.b64encode(reply.coordinator_keys).decode()
        if json_out:
            shell.print_json(out)
        else:
            shell.console.print(f"token for {device_id} (one use, expires in {ttl}):\n  {token}\n"
                                f"coordinator fingerprint to pin:\n  {reply.coordinator_fingerprint}\n"
                                "(--json writes a token file for `qflare agent enroll --token-file`, which also "
                                "carries the coordinator's keys: enrolment in one round trip)",
                                highlight=False, markup=False)

    @device_app.command("list")
    def device_list(status: str | None = typer.Option(None, help="active or revoked"),
                    json_out: bool = typer.Option(False, "--json")) -> None:
        """List enrolled devices (signed request to the coordinator), with the enclave's
        reputation of each when the enclave's state directory is on this host."""
        from enclave_worker import reputation
        from schemas.messages import DeviceListRequest, DeviceTable

        if status not in (None, "active", "revoked"):
            raise shell.fail(f"--status is active or revoked, not {status!r}", 2)
        s = shell.settings()
        _, _, table = call(DeviceListRequest, DeviceTable, status=status)
        reps = reputation.load(s.state_dir / "enclave")
        below = s.fl.quarantine_below
        rows = [{**d.model_dump(), "reputation": reps.get(d.device_id),
                 "quarantined": reputation.quarantined(reps, d.device_id, below) if d.device_id in reps else None}
                for d in table.devices]
        if json_out:
            shell.print_json(rows)
            return
        t = Table("device", "status", "signature", "fingerprint", "enrolled", "revoked", "reputation")
        for d, row in zip(table.devices, rows, strict=True):
            rep = "-" if row["reputation"] is None else f"{row['reputation']:.2f}" + (
                " quarantined" if row["quarantined"] else "")
            t.add_row(d.device_id, d.status, d.sig_alg, d.sig_fp[:16], shell._when(d.enrolled_at),
                      shell._when(d.revoked_at), rep)
        shell.console.print(t)

    @device_app.command("revoke")
    def device_revoke(device_id: str,
                      reason: str = typer.Option("operator", help="Recorded in the audit log.")) -> None:
        """Revoke a device at once: registry, the enclave's notice, its broker user, an event."""
        from schemas.messages import DeviceRevoke, DeviceRevoked

        call(DeviceRevoke, DeviceRevoked, device_id=device_id, reason=reason[:200])
        shell.console.print(f"device {device_id} revoked", highlight=False, markup=False)

    @round_app.command("start")
    def round_start(rounds: int = typer.Option(None, min=1, help="How many rounds (default: fl.rounds)."),
                    min_updates: int = typer.Option(None, min=1, help="Fewest updates a round needs "
                                                                      "(at least fl.min_updates)."),
                    deadline: float = typer.Option(None, min=0.001, help="Seconds a round waits for updates."),
                    expected: list[str] | None = typer.Option(None, "--device", help="Expected device (repeat)."),
                    epochs: int = typer.Option(None, min=1, help="Local epochs (default: fl.epochs)."),
                    lr: float = typer.Option(None, min=0.0, help="Learning rate (default: fl.lr)."),
                    batch_size: int = typer.Option(None, min=1, help="Batch size (default: fl.batch_size)."),
                    json_out: bool = typer.Option(False, "--json")) -> None:
        """Ask the coordinator to run rounds (a signed operator request, bounded by its settings)."""
        from schemas.messages import RoundStart, RoundStarted

        fl = shell.settings().fl
        _, _, started = call(RoundStart, RoundStarted, rounds=rounds or fl.rounds,
                             min_updates=min_updates or fl.min_updates, deadline_seconds=deadline or fl.deadline_seconds,
                             expected=expected or [], epochs=epochs or fl.epochs, lr=lr or fl.lr,
                             batch_size=batch_size or fl.batch_size)
        if json_out:
            shell.print_json({"first_round_id": started.round_id, "last_round_id": started.last_round_id})
        else:
            shell.console.print(f"rounds {started.round_id}..{started.last_round_id} started")

    def show_rounds(table, json_out: bool) -> None:
        rows = [r.model_dump() for r in table.rounds]
        plan = table.plan.model_dump() if table.plan else None
        if json_out:
            shell.print_json({"rounds": rows, "plan": plan})
            return
        t = Table("round", "status", "accepted", "rejected", "accuracy", "opened", "closed", "reason")
        for r in table.rounds:
            rej = ", ".join(f"{k}: {v}" for k, v in sorted(r.rejected.items())) or "-"
            t.add_row(str(r.round_id), r.status, "-" if r.accepted is None else str(r.accepted), rej,
                      "-" if r.accuracy is None else f"{r.accuracy:.3f}", shell._when(r.opened_at),
                      shell._when(r.closed_at), r.reason or "-")
        shell.console.print(t)
        shell.console.print(f"running plan: rounds {plan['first_round_id']}..{plan['last_round_id']}" if plan
                            else "no plan running")

    @round_app.command("list")
    def round_list(limit: int = typer.Option(20, min=1, max=1000, help="How many, newest first."),
                   json_out: bool = typer.Option(False, "--json")) -> None:
        """The latest rounds and the running plan."""
        from schemas.messages import RoundListRequest, RoundTable

        _, _, table = call(RoundListRequest, RoundTable, limit=limit)
        show_rounds(table, json_out)

    @round_app.command("status")
    def round_status(round_id: int | None = typer.Argument(None, min=1, help="A round id (default: the latest)."),
                     json_out: bool = typer.Option(False, "--json")) -> None:
        """One round (the latest by default) and the running plan."""
        from schemas.messages import RoundStatusRequest, RoundTable

        _, _, table = call(RoundStatusRequest, RoundTable, round_id=round_id)
        show_rounds(table, json_out)

    @round_app.command("cancel")
    def round_cancel(reason: str = typer.Option("operator", help="Recorded with the cancelled round."),
                     json_out: bool = typer.Option(False, "--json")) -> None:
        """Stop the running plan; the enclave closes the open round as cancelled."""
        from schemas.messages import RoundCancel, RoundCancelled

        _, _, done = call(RoundCancel, RoundCancelled, reason=reason[:200])
        if json_out:
            shell.print_json({"round_id": done.round_id, "skipped": done.skipped, "at": time.time()})
        else:
            shell.console.print(f"cancelled at round {done.round_id if done.round_id else '-'}; "
                                f"{done.skipped} round(s) of the plan not run")
