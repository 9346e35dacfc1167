"""The ``qflare`` command line: a thin shell over library functions.

Every command calls one function that tests can call too; ``--json`` prints machine-
readable output only, rich tables are for people. Errors print one line with a reason and
exit with one of the codes below; no traceback reaches the user (``-v`` shows them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.settings import ConfigError, Settings, load_settings
from ops.tuning import limit_blas_threads, tune_allocator

app = typer.Typer(help="QFLARE: quantum-resistant federated learning over RabbitMQ.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
token_app = typer.Typer(help="One-time enrollment tokens.", no_args_is_help=True)
device_app = typer.Typer(help="The device registry: list, show, revoke.", no_args_is_help=True)
coordinator_app = typer.Typer(help="The coordinator service.", no_args_is_help=True)
enclave_app = typer.Typer(help="The enclave worker (simulated TEE).", no_args_is_help=True)
agent_app = typer.Typer(help="The edge agent: enroll, open a session, train and send updates.",
                        no_args_is_help=True)
round_app = typer.Typer(help="Federated rounds.", no_args_is_help=True)
broker_app = typer.Typer(help="The broker: provision it, check it, watch queue depths.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (--write-docs records the figures in docs/benchmarks.md).",
                        no_args_is_help=True)
task_app = typer.Typer(help="Tasks: the model and data a deployment federates (docs/tasks.md).", no_args_is_help=True)
for sub, name in ((token_app, "token"), (device_app, "device"), (coordinator_app, "coordinator"),
                  (enclave_app, "enclave"), (agent_app, "agent"), (round_app, "round"), (broker_app, "broker"),
                  (bench_app, "bench"), (task_app, "task")):
    app.add_typer(sub, name=name)
try:
    from ops.crypto_cmd import crypto_app

    app.add_typer(crypto_app, name="crypto")
except ImportError:  # pragma: no cover - the crypto commands ship with the pqc suite
    pass

# soft_wrap: a long line (a token, a fingerprint, an error) stays one line when piped, to copy or grep
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
_state: dict[str, Any] = {"config": None, "settings": None, "verbose": False}

#: Exit codes (docs/operations.md): refused with a reason code; bad input or configuration;
#: the broker cannot be reached or refused this user; no answer in time; interrupted.
EXIT_REFUSED, EXIT_USAGE, EXIT_BROKER, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


@app.callback()
def main(config: Path | None = typer.Option(None, "--config", "-c", help="YAML settings file (or QFLARE_CONFIG)."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the services do; tracebacks."),
         log_format: str = typer.Option("text", "--log-format", help="text, or json: one object per line.")) -> None:
    from ops.logformat import configure

    if log_format not in ("text", "json"):
        raise fail(f"--log-format is text or json, not {log_format!r}", EXIT_USAGE)
    _state["config"], _state["verbose"] = config, verbose
    tune_allocator()
    limit_blas_threads()
    configure(logging.INFO if verbose else logging.WARNING, log_format)
    if not verbose:  # the client library's own connection errors: ours say it in one line
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def fail(message: str, code: int = EXIT_REFUSED) -> typer.Exit:
    """One plain line on stderr (no markup: ``[a-z0-9]`` in a message stays as written)."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def settings() -> Settings:
    if _state["settings"] is None:
        try:
            _state["settings"] = load_settings(_state["config"])
        except ConfigError as exc:
            raise fail(f"bad configuration: {exc}", EXIT_USAGE) from None
    return _state["settings"]


TASK_HELP = "The task, MODULE:OBJECT (default fl.task; docs/tasks.md)."


def with_task(s: Settings, task: str | None) -> Settings:
    """``s`` with ``--task`` applied, the task loaded once so a broken one stops here, in one line."""
    from common.task import TaskError
    from common.training import runner_for

    if task is not None:
        s = s.model_copy(update={"fl": s.fl.model_copy(update={"task": task})})
    try:
        runner_for(s.fl.task)
    except TaskError as exc:
        raise fail(str(exc), 2) from None
    return s


def reader_gone() -> None:
    """Stdout's reader went away (``qflare events --json | head``): not a failure. Later writes
    (the flush at exit) go nowhere instead of raising again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run(coro: Coroutine) -> Any:
    """Run ``coro``; turn the expected failures into one line and an exit code."""
    import aiormq.exceptions

    from broker.connection import BrokerAccessRefused, BrokerUnavailable, refused
    from common.task import TaskError
    from common.webserver import PortInUse
    from schemas.reasons import QflareError, Reason

    try:
        return asyncio.run(coro)
    except (BrokerUnavailable, BrokerAccessRefused) as exc:
        raise fail(str(exc), EXIT_BROKER) from None
    except TaskError as exc:
        raise fail(str(exc)) from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise fail(str(refused(settings(), exc)), EXIT_BROKER) from None
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        ns = settings().broker.namespace
        raise fail(f"not_found: {_amqp_text(exc)} (namespace {ns!r}: is it spelled right, and has a coordinator "
                   "run there? `qflare broker check` declares the topology)", EXIT_REFUSED) from None
    except QflareError as exc:
        code = EXIT_TIMEOUT if exc.reason == Reason.TIMEOUT else EXIT_REFUSED
        raise fail(f"{exc.reason.value}: {exc.detail}" if exc.detail else exc.reason.value, code) from None
    except (PortInUse, ConfigError) as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        reader_gone()
        raise typer.Exit(0) from None
    except Exception as exc:
        if _state["verbose"]:
            raise
        raise fail(f"internal: {type(exc).__name__}: {exc} (run with -v for details)") from None


def _amqp_text(exc: BaseException) -> str:
    """The broker's own words from an AMQP channel error, e.g. "no queue 'x' in vhost '/'"."""
    text = str(exc.args[-1] if exc.args else exc)
    return text.split(" - ", 1)[-1]


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '24h', '7d' → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 24h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# --- tokens and devices ---------------------------------------------------------------------


def _registry(s: Settings):
    from coordinator.registry import open_registry

    return open_registry(s)


@token_app.command("list")
def token_list(all_: bool = typer.Option(False, "--all", help="Include used tokens."),
               json_out: bool = typer.Option(False, "--json")) -> None:
    """List tokens (their hashes only: the registry never stores a token)."""
    reg = _registry(settings())
    rows = reg.list_tokens(include_used=all_)
    reg.close()
    if json_out:
        print_json([r.__dict__ for r in rows])
        return
    t = Table("hash", "device", "expires", "used", "revoked")
    for r in rows:
        t.add_row(r.token_hash[:16], r.device_id, _when(r.expires_at), _when(r.used_at), _when(r.revoked_at))
    console.print(t)


@token_app.command("revoke")
def token_revoke(token: str = typer.Argument(..., help="The token, or a prefix of its hash.")) -> None:
    """Revoke an unused token."""
    reg = _registry(settings())
    try:
        reg.revoke_token(token)
    except Exception as exc:  # noqa: BLE001
        raise fail(str(exc)) from None
    finally:
        reg.close()
    console.print("token revoked")


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


@device_app.command("show")
def device_show(device_id: str, json_out: bool = typer.Option(False, "--json")) -> None:
    """Show one device."""
    reg = _registry(settings())
    d = reg.get_device(device_id)
    reg.close()
    if d is None:
        raise fail(f"no device {device_id!r}")
    info = {k: v for k, v in d.__dict__.items() if not isinstance(v, bytes)}
    if json_out:
        print_json(info)
    else:
        for k, v in info.items():
            console.print(f"{k:>12}: {_when(v) if k.endswith('_at') else v}")


@device_app.command("broker-user")
def device_broker_user(device_id: str, delete: bool = typer.Option(False, "--delete", help="Remove the user."),
                       rotate: bool = typer.Option(False, "--rotate", help="Give an existing user a new password."),
                       force: bool = typer.Option(False, "--force", help="Replace a same-named user's permissions."),
                       json_out: bool = typer.Option(False, "--json")) -> None:
    """Create a broker user confined to this device's routing key and queues (never silently replaced)."""
    import secrets as _secrets

    from broker.users import (
        BrokerAdminError,
        ManagementApi,
        cluster_url_for,
        create_device_user,
        delete_device_user,
        vhost_of,
    )
    from schemas.names import Names

    s = settings()
    api, names = ManagementApi.from_settings(s), Names(s.broker.namespace)
    user = names.device_user(device_id)
    try:
        if delete:
            delete_device_user(api, names, device_id)
            console.print(f"broker user {user} deleted")
            return
        password = create_device_user(api, names, device_id, _secrets.token_urlsafe(24), vhost_of(s.amqp_url),
                                      rotate=rotate, force=force, max_connections=s.broker.device_max_connections,
                                      shards=s.enclave.shards)
    except BrokerAdminError as exc:
        raise fail(str(exc)) from None
    url = cluster_url_for(s, user, password) if password else None
    if json_out:
        print_json({"device_id": device_id, "user": user, "amqp_url": url})
    elif url is None:
        console.print(f"broker user {user} exists with these permissions; unchanged (--rotate for a new password)")
    else:
        console.print(f"broker user {user} ready; give the device (once, privately):\n  QFLARE_AMQP_URL={url}")


# --- services ----------------------------------------------------------------------------


@coordinator_app.command("run")
def coordinator_run() -> None:
    """Serve enrollment, sessions, attestation and rounds until interrupted."""
    from coordinator.service import run as serve
    from ops.logformat import services_say_what_they_do

    services_say_what_they_do()
    run(serve(settings()))


@coordinator_app.command("rotate-keys")
def coordinator_rotate_keys() -> None:
    """Replace the coordinator's keys (run while it is stopped); the old key signs the new."""
    from coordinator.service import rotate_coordinator_keys

    old, new = run(rotate_coordinator_keys(settings()))
    console.print(f"coordinator key rotated:\n  old {old}\n  new {new}\n"
                  "Enrolled devices and the enclave follow the signed chain; give new devices the new fingerprint.")


@enclave_app.command("run")
def enclave_run(task: str | None = typer.Option(None, "--task", help=TASK_HELP)) -> None:
    """Attest to the coordinator, then verify, filter and aggregate updates until interrupted."""
    from enclave_worker.service import run as serve
    from ops.logformat import services_say_what_they_do

    services_say_what_they_do()
    run(serve(with_task(settings(), task)))


@enclave_app.command("root-data")
def enclave_root_data(file: Path | None = typer.Argument(None, help=".npz with x (float32, n x features) and "
                                                                   "y (int64, n); at most 1000 samples."),
                      digits: bool = typer.Option(False, "--digits", help="The digits task's held-out root set "
                                                                           "(what the demo seals).")) -> None:
    """Seal clean root data to the attested enclave, signed by this host's operator key and
    sent over the operator plane (any host): the enclave's trusted reference each round (FLTrust)."""
    import numpy as np

    from common import rootdata
    from ops.operator_client import OperatorClient

    if (file is None) == (not digits):
        raise fail("give a FILE or --digits (one of them)", 2)
    if digits:
        x, y = rootdata.digits_root()
    else:
        try:
            x, y = rootdata.unpack(file.read_bytes())
        except (OSError, ValueError) as exc:
            raise fail(f"{file}: {exc}", 2) from None

    async def go() -> str:
        async with OperatorClient(settings()) as op:
            return await op.send_root_data(np.asarray(x), np.asarray(y))

    fp = run(go())
    console.print(f"{len(y)} root samples sealed to enclave KEM key {fp[:16]} and sent; the enclave obeys "
                  "only operator keys in its own operator.pinned_fingerprints (event enclave.root_data)")


@enclave_app.command("measurement")
def enclave_measurement() -> None:
    """Print this installation's enclave code measurement (for the allow-list)."""
    from enclave_worker.attestation import measurement

    console.print(measurement())


@enclave_app.command("platform-key")
def enclave_platform_key(export: Path | None = typer.Option(
        None, help="Also write the public key to this file (the coordinator's enclave.platform_key_file).")) -> None:
    """Print (creating it on first use) the simulated platform's public key fingerprint."""
    import shutil as _shutil

    from common.attestation import platform_dir
    from enclave_worker.attestation import platform_identity

    s = settings()
    ident = platform_identity(platform_dir(s), legacy=s.state_dir / "platform")
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)
        _shutil.copyfile(platform_dir(s) / "public.json", export)
    console.print(ident.sig_fp)


# --- agent -------------------------------------------------------------------------------


async def _with_rpc(s: Settings, fn, device_id: str | None = None):
    from broker.client import BrokerClient

    async with await BrokerClient.open(s, name="qflare-agent", declare=device_id is None, client_id=device_id) as broker:
        return await fn(broker, await broker.rpc())


@agent_app.command("enroll")
def agent_enroll(device_id: str | None = typer.Option(None, "--device-id"),
                 token: str | None = typer.Option(None, "--token"),
                 coordinator_fingerprint: str | None = typer.Option(
                     None, "--coordinator-fingerprint", help="As printed by `qflare token create`; with "
                     "--token-file, the pin the file must match."),
                 token_file: Path | None = typer.Option(
                     None, "--token-file", help="The JSON of `qflare token create --json`: device id, token, "
                     "fingerprint and the coordinator's keys (enrolment in one round trip).")) -> None:
    """Enroll this device with a one-time token; keys are kept under the state directory."""
    from edge_agent import client
    from edge_agent.storage import save_device
    from ops.claim import keys_message, parse_token
    from schemas.reasons import QflareError

    keys = None
    if token_file is not None:
        if device_id is not None or token is not None:
            raise fail("--token-file gives the device id and token: not with --device-id or --token", EXIT_USAGE)
        try:
            tok = parse_token(token_file.read_text())
            keys = keys_message(tok.coordinator_keys)
        except OSError as exc:
            raise fail(f"--token-file: {exc}", EXIT_USAGE) from None
        except QflareError as exc:
            raise fail(f"--token-file {token_file}: {exc.detail}", EXIT_USAGE) from None
        if coordinator_fingerprint is not None and coordinator_fingerprint != tok.coordinator_fingerprint:
            raise fail("bad_signature: the token file names another coordinator than --coordinator-fingerprint")
        device_id, token, coordinator_fingerprint = tok.device_id, tok.token, tok.coordinator_fingerprint
    elif device_id is None or token is None or coordinator_fingerprint is None:
        raise fail("give --token-file, or --device-id, --token and --coordinator-fingerprint", EXIT_USAGE)
    s = settings()

    async def go(broker, rpc):
        return await client.enroll(rpc, broker.names, device_id, token, coordinator_fingerprint,
                                   sig_alg=s.crypto.signature, kem_alg=s.crypto.kem, timeout=s.broker.rpc_timeout,
                                   suite=s.crypto.handshake, keys_message=keys)

    dev = run(_with_rpc(s, go, device_id))
    path = save_device(s.state_dir, dev)
    console.print(f"enrolled {device_id}; keys in {path}")


@agent_app.command("session")
def agent_session(device_id: str = typer.Option(..., "--device-id"),
                  json_out: bool = typer.Option(False, "--json")) -> None:
    """Open a forward-secret session (the seed's challenge step) and print the grant."""
    from edge_agent import client
    from edge_agent.storage import load_device, save_device

    s = settings()
    dev = load_device(s.state_dir, device_id) if _exists(s, device_id) else None
    if dev is None:
        raise fail(f"device {device_id} is not enrolled here; run `qflare agent enroll` first")

    async def go(broker, rpc):
        return await client.open_session(rpc, broker.names, dev, kem_alg=s.crypto.kem, timeout=s.broker.rpc_timeout,
                                   suite=s.crypto.handshake)

    sess = run(_with_rpc(s, go, device_id))
    save_device(s.state_dir, dev)
    out = {"device_id": device_id, "session_id": sess.session_id, "not_after": sess.not_after}
    if json_out:
        print_json(out)
    else:
        console.print(f"session {sess.session_id} open until {_when(sess.not_after)}")


def _exists(s: Settings, device_id: str) -> bool:
    from edge_agent.storage import device_dir

    return (device_dir(s.state_dir, device_id) / "device.json").exists()


@agent_app.command("status")
def agent_status(device_id: str = typer.Option(..., "--device-id"),
                 json_out: bool = typer.Option(False, "--json")) -> None:
    """Ask the coordinator where this device stands, under a fresh session's key."""
    from edge_agent import client
    from edge_agent.storage import load_device

    s = settings()
    if not _exists(s, device_id):
        raise fail(f"device {device_id} is not enrolled here; run `qflare agent enroll` first")
    dev = load_device(s.state_dir, device_id)

    async def go(broker, rpc):
        await client.open_session(rpc, broker.names, dev, kem_alg=s.crypto.kem, timeout=s.broker.rpc_timeout,
                                   suite=s.crypto.handshake)
        return await client.status(rpc, broker.names, dev, timeout=s.broker.rpc_timeout)

    st = run(_with_rpc(s, go, device_id))
    if json_out:
        print_json(st.model_dump())
    else:
        console.print(f"{st.device_id}: {st.status}; session until {_when(st.session_not_after)}; "
                      f"last round {st.last_round_id}; enclave KEM key {(st.enclave_kem_fp or '-')[:16]}")


@agent_app.command("rotate")
def agent_rotate(device_id: str = typer.Option(..., "--device-id")) -> None:
    """Rotate this device's keys (the request is signed by the old key)."""
    from edge_agent import client
    from edge_agent.storage import load_device, save_device

    s = settings()
    if not _exists(s, device_id):
        raise fail(f"device {device_id} is not enrolled here")
    dev = load_device(s.state_dir, device_id)
    run(_with_rpc(s, lambda broker, rpc: client.rotate_keys(rpc, broker.names, dev, timeout=s.broker.rpc_timeout),
                  device_id))
    save_device(s.state_dir, dev)
    console.print(f"keys of {device_id} rotated; new fingerprint {dev.identity.sig_fp}")


@agent_app.command("run")
def agent_run(device_id: str = typer.Option(..., "--device-id"),
              task: str | None = typer.Option(None, "--task", help=TASK_HELP),
              data: Path | None = typer.Option(None, "--data", help="This device's data: .npz (x, y) or .csv "
                                                                    "(header, a 'label' column); default: the "
                                                                    "task's load_data(shard, of)."),
              shard: int = typer.Option(0, help="Device index passed to the task's load_data."),
              of: int = typer.Option(1, help="Number of devices passed to the task's load_data."),
              attack: str | None = typer.Option(None, help="Simulate a malicious device (tests, demos).")) -> None:
    """Train on every round this device is part of, across any number of broker outages.

    Retries the broker forever (capped exponential backoff with jitter), logs each step (joined,
    trained, sent, confirmed, model applied); stops on SIGTERM/SIGINT, or when revoked.
    """
    import signal

    from common.training import ATTACKS
    from edge_agent.agent import run_agent

    if attack is not None and attack not in ATTACKS:
        raise fail(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}", 2)
    if not 0 <= shard < of:
        raise fail(f"--shard {shard} is not in [0, --of {of})", 2)
    s = with_task(settings(), task)
    if not _exists(s, device_id):
        raise fail(f"device {device_id} is not enrolled here; run `qflare agent enroll` first")
    # What the device does is always logged; -v adds the details.
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    logging.getLogger("qflare.agent").setLevel(logging.DEBUG if verbose else logging.INFO)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_agent(s, device_id, shard, of, attack, stop=stop, data=data)

    run(go())


@agent_app.command("join")
def agent_join(token_dir: Path = typer.Option(..., "--token-dir", help="Directory of token files "
                                             "(`qflare token create --json`), one per device."),
               attack: str | None = typer.Option(None, help="Simulate a malicious device (tests, demos).")) -> None:
    """Claim one token from a shared directory, enroll with it (once), then run: for scaled services."""
    import socket as _socket

    from edge_agent import client
    from edge_agent.agent import run_agent
    from edge_agent.storage import save_device
    from ops.claim import claim, keys_message, remember
    from schemas.reasons import QflareError

    s = settings()
    try:
        c = claim(token_dir, s.state_dir, _socket.gethostname())
        keys = keys_message(c.coordinator_keys)  # checked by client.enroll against the pinned fingerprint
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    except QflareError as exc:
        raise fail(f"{exc.reason.value}: {exc.detail}") from None
    if not c.enrolled or not _exists(s, c.device_id):
        async def go(broker, rpc):
            return await client.enroll(rpc, broker.names, c.device_id, c.token, c.coordinator_fingerprint,
                                       sig_alg=s.crypto.signature, kem_alg=s.crypto.kem, timeout=s.broker.rpc_timeout,
                                       suite=s.crypto.handshake, keys_message=keys)

        dev = run(_with_rpc(s, go, c.device_id))
        save_device(s.state_dir, dev)
        remember(s.state_dir, type(c)(**{**c.__dict__, "enrolled": True}))
    from ops.logformat import services_say_what_they_do

    services_say_what_they_do()
    run(run_agent(s, c.device_id, c.shard, c.of, attack))


# --- broker ------------------------------------------------------------------------------


@broker_app.command("check")
def broker_check(json_out: bool = typer.Option(False, "--json")) -> None:
    """Connect, declare the topology, and ping the coordinator if one runs."""
    from broker.client import BrokerClient
    from broker.connection import redact
    from schemas.messages import Ping, Pong
    from schemas.names import Names
    from schemas.reasons import QflareError

    s = settings()

    async def go():
        async with await BrokerClient.open(s, name="qflare-check") as b:
            rpc = await b.rpc()
            try:
                t0 = time.perf_counter()
                pong = await rpc.call(b.names.rpc_exchange, Names.COORDINATOR_KEY, Ping(nonce=b"check"), Pong, 2.0)
                return {"broker": redact(s.amqp_url), "coordinator": pong.version,
                        "rpc_ms": round((time.perf_counter() - t0) * 1e3, 2)}
            except QflareError:
                return {"broker": redact(s.amqp_url), "coordinator": None}

    out = run(go())
    if json_out:
        print_json(out)
    else:
        console.print(f"broker OK at {out['broker']}; topology declared; coordinator: "
                      f"{'answers in %s ms' % out['rpc_ms'] if out['coordinator'] else 'not running'}")


@broker_app.command("setup")
def broker_setup(rotate: bool = typer.Option(False, "--rotate", help="New passwords for existing users."),
                 force: bool = typer.Option(False, "--force", help="Replace same-named users' permissions."),
                 json_out: bool = typer.Option(False, "--json")) -> None:
    """Provision the namespace (run with the broker's admin credentials): topology, the coordinator's,
    enclave's and operator's users with least privilege, client queue policies, the vhost queue cap."""
    import secrets as _secrets

    from broker.client import BrokerClient
    from broker.users import BrokerAdminError, ManagementApi, cluster_url_for, provision_services

    s = settings()

    async def declare():
        async with await BrokerClient.open(s, name="qflare-setup"):
            pass

    run(declare())
    try:
        made = provision_services(ManagementApi.from_settings(s), s, lambda: _secrets.token_urlsafe(24),
                                  rotate=rotate, force=force)
    except BrokerAdminError as exc:
        raise fail(str(exc)) from None
    urls = {user: cluster_url_for(s, user, pw) if pw else None for user, pw in made.items()}
    if json_out:
        print_json({"namespace": s.broker.namespace, "users": urls})
        return
    console.print(f"namespace {s.broker.namespace}: topology declared, client queue policies set")
    for user, url in urls.items():
        console.print(f"  {user}: " + (f"QFLARE_AMQP_URL={url}" if url else "exists, unchanged (--rotate for a new password)"))
    if any(urls.values()):
        console.print("Give each URL (once, privately) to the process of that role; devices get theirs from "
                      "`qflare device broker-user D`.")


@broker_app.command("status")
def broker_status(json_out: bool = typer.Option(False, "--json")) -> None:
    """Queue depths and consumers: what an operator watches."""
    from broker.client import BrokerClient

    s = settings()

    async def go():
        # declare=False: looking must not create a topology (a typo'd namespace is an error)
        async with await BrokerClient.open(s, name="qflare-status", declare=False) as b:
            n = b.names
            rows = []
            for q in (n.coordinator_queue, n.updates_queue, n.enclave_control_queue, n.dead_letter_queue):
                ch = await b.connection.channel()
                decl = await ch.declare_queue(q, passive=True)
                res = decl.declaration_result
                rows.append({"queue": q, "messages": res.message_count, "consumers": res.consumer_count})
                await ch.close()
            return rows

    rows = run(go())
    if json_out:
        print_json(rows)
        return
    t = Table("queue", "messages", "consumers")
    for r in rows:
        t.add_row(r["queue"], str(r["messages"]), str(r["consumers"]))
    console.print(t)


@broker_app.command("dead-letters")
def broker_dead_letters(limit: int = typer.Option(20, min=1, max=10_000, help="How many to show."),
                        purge: bool = typer.Option(False, help="Remove the ones shown."),
                        json_out: bool = typer.Option(False, "--json")) -> None:
    """Show dead-lettered messages with their queue and reason (left in place unless --purge)."""
    from broker.client import BrokerClient
    from schemas.codec import peek_type
    from schemas.names import BODY_BYTES_HEADER, DETAIL_HEADER, REASON_HEADER

    s = settings()

    async def go():
        async with await BrokerClient.open(s, name="qflare-dead-letters", declare=False) as b:
            ch = await b.connection.channel()
            await ch.set_qos(prefetch_count=limit)
            q = await ch.declare_queue(b.names.dead_letter_queue, passive=True)
            rows, held = [], []
            while len(rows) < limit:
                m = await q.get(fail=False, no_ack=False)
                if m is None:
                    break
                h = m.headers or {}
                rows.append({"queue": h.get("x-qflare-queue"), "reason": h.get(REASON_HEADER),
                             "detail": h.get(DETAIL_HEADER), "type": peek_type(bytes(m.body)),
                             "bytes": h.get(BODY_BYTES_HEADER, len(m.body))})
                held.append(m)
            for m in held:
                await (m.ack() if purge else m.nack(requeue=True))
            await ch.close()
            return rows

    rows = run(go())
    if json_out:
        print_json(rows)
        return
    t = Table("queue", "reason", "detail", "type", "bytes", title="dead letters" + (" (purged)" if purge else ""))
    for r in rows:
        t.add_row(*(str(r[k]) for k in ("queue", "reason", "detail", "type", "bytes")))
    console.print(t)


@app.command()
def events(binding: list[str] = typer.Argument(None, help="Topic bindings, e.g. 'update.rejected.#' (default #)."),
           count: int = typer.Option(0, help="Stop after this many events (0: until interrupted)."),
           json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
           from_: str | None = typer.Option(None, "--from", help="Replay the events stream from an offset: "
                                            "first, last, next, or a number.")) -> None:
    """Follow the events exchange live (or replay its stream): what an operator or another system sees."""
    from broker.client import BrokerClient
    from common.events import decode_event, topic_matches
    from schemas.codec import CodecError

    s = settings()
    offset: str | int | None = from_
    if from_ is not None and from_ not in ("first", "last", "next"):
        if not from_.isdigit():
            raise fail(f"--from takes first, last, next or an offset number, not {from_!r}", EXIT_USAGE)
        offset = int(from_)
    keys = binding or ["#"]

    async def go():
        async with await BrokerClient.open(s, name="qflare-events", declare=False) as b:
            if offset is None:
                q = await b.channel.declare_queue(exclusive=True, auto_delete=True)
                for key in keys:
                    await q.bind(b.names.events_exchange, key)
                stream_args, no_ack = None, True
            else:  # a stream is read with acks and a prefetch, from the offset asked for
                q = await b.channel.declare_queue(b.names.events_stream, passive=True)
                stream_args, no_ack = {"x-stream-offset": offset}, False
            seen = 0
            # our own buffer, not q.iterator(): leaving an iterator early nacks what it prefetched,
            # which a stream refuses (NOT_IMPLEMENTED); closing the connection simply drops them
            inbox: asyncio.Queue = asyncio.Queue()
            await q.consume(inbox.put, no_ack=no_ack, arguments=stream_args)
            while True:
                message = await inbox.get()
                if not no_ack:
                    await message.ack()
                if not any(topic_matches(k, message.routing_key or "") for k in keys):
                    continue
                try:
                    ev = decode_event(message.body, message.content_type)
                except CodecError:
                    continue
                try:
                    if json_out:
                        sys.stdout.write(json.dumps(ev.model_dump()) + "\n")
                        sys.stdout.flush()
                    else:
                        extra = " ".join(f"{k}={v}" for k, v in ev.detail.items())
                        console.print(f"{time.strftime('%H:%M:%S', time.localtime(ev.at))} [bold]{ev.type}[/] "
                                      f"{ev.device_id or ''} "
                                      f"{('round ' + str(ev.round_id)) if ev.round_id else ''} "
                                      f"{ev.reason or ''} {extra}".rstrip())
                except BrokenPipeError:  # the reader went away (`| head`): done, not failed
                    reader_gone()
                    return
                seen += 1
                if count and seen >= count:
                    return

    run(go())


@app.command()
def dashboard(host: str | None = typer.Option(None, help="Address to listen on (default dashboard.host)."),
              port: int | None = typer.Option(None, help="Port (default dashboard.port; 0: any free port).")) -> None:
    """A live, read-only web dashboard: fleet, rounds, queues, enclave, dead letters (needs dashboard.token)."""
    from ops.dashboard.app import serve

    s = settings()
    if port is not None and not 0 <= port <= 65535:
        raise fail(f"--port must be 0-65535 (got {port})", EXIT_USAGE)
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    s = s.model_copy(update={"dashboard": s.dashboard.model_copy(update=update)})
    if s.dashboard.token is None or not s.dashboard.token.get_secret_value():
        raise fail("dashboard.token: the operator credential is required (set QFLARE_DASHBOARD__TOKEN or "
                   "dashboard.token in the config file)", EXIT_USAGE)
    from ops.logformat import services_say_what_they_do

    services_say_what_they_do()
    run(serve(s))


# --- demo --------------------------------------------------------------------------------


@app.command()
def demo(devices: int = typer.Option(5, min=1, max=5000, help="Simulated devices."),
         rounds: int = typer.Option(3, min=1, max=1000, help="Federated rounds."),
         malicious: float = typer.Option(0.0, min=0.0, max=0.5, help="Fraction of malicious devices."),
         attack: str = typer.Option("sign-flip", help="An attack of common/attacks.py: sign-flip, scale, noise, "
                                    "alie, ipm, min-max, min-sum, adaptive, label-flip, backdoor, backdoor-boosted."),
         deadline: float | None = typer.Option(None, help="Seconds a round waits (default fl.deadline_seconds)."),
         aggregator: str | None = typer.Option(None, help="fedavg | median | trimmed_mean | multi_krum."),
         partition: str | None = typer.Option(None, help="iid | dirichlet (non-IID, fl.dirichlet_alpha)."),
         namespace: str | None = typer.Option(None, help="Broker namespace to run in (default: a new demo-<hex>)."),
         task: str | None = typer.Option(None, "--task", help=TASK_HELP),
         json_out: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """Coordinator, enclave and N devices over RabbitMQ: enroll, run rounds, show accuracy."""
    from common.attacks import NAMES as ATTACKS
    from common.settings import BrokerSettings
    from ops.demo import new_namespace, run_demo

    if attack not in ATTACKS:
        raise fail(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}", 2)
    try:
        ns = BrokerSettings(namespace=namespace or new_namespace()).namespace
    except ValidationError:
        raise fail(f"--namespace {namespace!r}: 1-41 characters of a-z 0-9 _ -, starting with a letter or digit",
                   2) from None
    s = with_task(settings(), task)
    err_console.print(f"demo namespace: {ns} (follow it: QFLARE_NAMESPACE={ns} qflare events)",
                      highlight=False, markup=False, soft_wrap=True)
    overrides = {k: v for k, v in (("aggregator", aggregator), ("partition", partition)) if v is not None}
    if overrides:
        try:
            s = s.model_copy(update={"fl": type(s.fl).model_validate({**s.fl.model_dump(), **overrides})})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise fail(f"--{err['loc'][0]}: {err['msg']} (got {err.get('input')!r})", 2) from None
    if json_out:
        report = run(run_demo(s, devices=devices, rounds=rounds, malicious=malicious, attack=attack,
                              deadline=deadline, namespace=ns))
        print_json(report.as_json())
        return
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console) as bar:
        tasks: dict[str, int] = {}
        labels = {"broker": "broker check", "enroll": "enrolling devices", "rounds": "federated rounds"}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels[stage], total=total)
            bar.update(tasks[stage], completed=done, total=total)

        report = run(run_demo(s, devices=devices, rounds=rounds, malicious=malicious, attack=attack,
                              deadline=deadline, progress=progress, namespace=ns))
    console.print(f"{report.devices} devices enrolled through the real protocol in {report.enroll_seconds:.2f}s"
                  + (f"; malicious ({report.attack}): {', '.join(report.malicious)}" if report.malicious else ""))
    t = Table("round", "status", "accuracy", "metrics", "accepted", "rejected (reason: count)", "seconds",
              title=f"QFLARE rounds: {report.task}")
    for r in report.rounds:
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(r.rejected.items())) or "-"
        other = ", ".join(f"{k} {v:.4g}" for k, v in sorted(r.metrics.items()) if k != "accuracy") or "-"
        t.add_row(str(r.round), r.status, f"{r.accuracy:.3f}" if r.accuracy is not None else "-", other,
                  str(r.accepted), rej, f"{r.seconds:.2f}")
    console.print(t)


@app.command()
def load(devices: int = typer.Option(100, min=2, max=100_000, help="Simulated devices."),
         connections: int = typer.Option(4, min=1, max=64, help="Broker connections the devices share."),
         concurrency: int = typer.Option(64, min=1, max=10_000, help="Enrolments and sessions in flight at once."),
         deadline: float | None = typer.Option(None, help="Seconds the round waits (default max(fl.deadline_seconds, 120))."),
         out: Path = typer.Option(Path("qflare-load"), help="Directory for load.json and load.png."),
         namespace: str | None = typer.Option(None, help="Broker namespace (default: a new load-<hex>)."),
         task: str | None = typer.Option(None, "--task", help=TASK_HELP),
         compression: str = typer.Option("int8", help="fl.compression of the devices' updates: none, int8, topk."),
         prefetch: int = typer.Option(256, min=1, max=10_000, help="broker.prefetch of the enclave and coordinator.prefetch."),
         publish_channels: int = typer.Option(4, min=1, max=64, help="broker.publish_channels of each connection's devices."),
         device_processes: int | None = typer.Option(None, min=1, max=64, help="Processes the devices are split over "
                                                     "(default: 2 on 2 cores or more, else 1)."),
         write_docs: bool = typer.Option(False, "--write-docs", help="Write docs/benchmarks.md's load section."),
         json_out: bool = typer.Option(False, "--json", help="Print only the JSON report.")) -> None:
    """Load test: N devices enrol, open sessions and send one round's update through the real
    protocol, multiplexed over a few connections; rates and p50/p95/p99 per step."""
    from ops.load import run_load

    s = with_task(settings(), task)
    out.mkdir(parents=True, exist_ok=True)
    if compression not in ("none", "int8", "topk"):
        raise typer.BadParameter("none, int8 or topk", param_hint="--compression")
    kw = {"connections": connections, "concurrency": concurrency, "deadline": deadline, "namespace": namespace,
          "plot_path": out / "load.png", "compression": compression, "prefetch": prefetch,
          "publish_channels": publish_channels, "device_processes": device_processes}
    if json_out:
        report = run(run_load(s, devices, **kw))
    else:
        with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console) as bar:
            tasks: dict[str, int] = {}
            labels = {"enroll": "enrol + session", "update": "updates sent"}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(labels[stage], total=total)
                bar.update(tasks[stage], completed=done, total=total)

            report = run(run_load(s, devices, progress=progress, **kw))
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    if write_docs:
        import shutil

        from common.report import DOC, write_section
        from ops.load import markdown

        write_section("load", markdown(report, "qflare load " + " ".join(sys.argv[2:])))
        if report.get("plot"):  # the section shows it as bench-load.png beside benchmarks.md
            shutil.copyfile(report["plot"], DOC.parent / "bench-load.png")
    if json_out:
        print_json(report)
        return
    t = Table("step", "count", "per s", "p50 ms", "p95 ms", "p99 ms", title=(
        f"qflare load: {report['devices_completed']}/{report['devices']} devices through the round "
        f"({report['round_status']}) in {report['total_seconds']} s"))
    for name, st in report["steps"].items():
        t.add_row(name, str(st["count"]), str(st["rate_per_s"]), *(str(st[k]) for k in ("p50_ms", "p95_ms", "p99_ms")))
    console.print(t)
    console.print(f"report: {out / 'load.json'}, plot: {out / 'load.png'}")


# --- tasks -------------------------------------------------------------------------------


@task_app.command("check")
def task_check(spec: str = typer.Argument(..., metavar="MODULE:OBJECT", help="The task to check."),
               device: int = typer.Option(0, help="Device index for load_data."),
               of: int = typer.Option(1, help="Number of devices for load_data."),
               json_out: bool = typer.Option(False, "--json")) -> None:
    """Build the task's model, train one batch, flatten and restore, evaluate: say what is wrong in one line."""
    from common.task import TaskError
    from ops.task_check import check_task

    try:
        report = check_task(spec, device, of)
    except TaskError as exc:
        raise fail(str(exc)) from None
    if json_out:
        print_json(report.as_json())
    else:
        console.print(report.line(), markup=False, highlight=False, soft_wrap=True)


# --- benchmarks --------------------------------------------------------------------------

WRITE_DOCS_HELP = "Record the figures in docs/benchmarks.md (otherwise they are only printed)."

try:
    from ops.crypto_cmd import bench_crypto_cmd

    bench_app.command("crypto")(bench_crypto_cmd)
except ImportError:  # pragma: no cover
    pass


@bench_app.command("handshake")
def bench_handshake(seconds: float = typer.Option(5.0, help="Time per measurement."),
                    json_out: bool = typer.Option(False, "--json"),
                    write_docs: bool = typer.Option(False, "--write-docs", help=WRITE_DOCS_HELP)) -> None:
    """Enrollments/s and sessions/s per algorithm suite (in-process and over the broker)."""
    from ops.bench_handshake import run_bench

    result = run(run_bench(settings(), seconds=seconds, write_docs=write_docs))
    if json_out:
        print_json(result)


@bench_app.command("fleet")
def bench_fleet(sizes: str = typer.Option("100,500,1000", help="Fleet sizes, comma-separated."),
                json_out: bool = typer.Option(False, "--json"),
                write_docs: bool = typer.Option(False, "--write-docs", help=WRITE_DOCS_HELP)) -> None:
    """Enrollments/s and round times for simulated fleets of growing size."""
    from ops.bench_fleet import run_bench

    try:
        parsed = tuple(int(x) for x in sizes.split(","))
    except ValueError:
        raise fail(f"--sizes takes numbers like 100,500,1000, not {sizes!r}", 2) from None
    result = run(run_bench(settings(), parsed, write_docs=write_docs))
    if json_out:
        print_json(result)


@bench_app.command("round")
def bench_round(json_out: bool = typer.Option(False, "--json"),
                quick: bool = typer.Option(False, help="Fewer updates, for a smoke run."),
                params: str = typer.Option("100000,1000000", help="Update sizes (parameters), comma-separated."),
                passes: int | None = typer.Option(None, min=1, max=20, help="Sealed rounds, each between two "
                                                  "plaintext passes (default 5; 1 with --quick)."),
                write_docs: bool = typer.Option(False, "--write-docs", help="Write docs/benchmarks.md.")) -> None:
    """Updates/s through the enclave, sealed vs plaintext, which stage bounds it, memory."""
    from ops.bench_round import run_bench

    try:
        sizes = tuple(int(x) for x in params.split(","))
    except ValueError:
        raise fail(f"--params takes numbers like 100000,1000000, not {params!r}", 2) from None
    result = run(run_bench(settings(), quick=quick, sizes=sizes, write_docs=write_docs, passes=passes))
    if not json_out:
        for r in result["cases"]:
            console.print(f"{r['params']:>9,} parameters: sealed {r['sealed_updates_per_s']}/s, plaintext "
                          f"{r['plaintext_updates_per_s']}/s, ratio {r['ratio']}; bounded by {r['bound']}")
            stages = ", ".join(f"{st} {ms}" for st, ms in {**r["device_ms_per_update"],
                                                           "publish": r["publish_ms_per_update"],
                                                           **r["stage_ms_per_update"]}.items())
            console.print(f"{'':>9}  ms per update: {stages} (window {r['window_ms_per_update']})")
        return
    print_json(result)


@bench_app.command("shards")
def bench_shards(json_out: bool = typer.Option(False, "--json", help="Print only JSON."),
                 quick: bool = typer.Option(False, help="Fewer updates, for a smoke run."),
                 params: int = typer.Option(100_000, min=1, help="Parameters per update."),
                 write_docs: bool = typer.Option(False, "--write-docs", help="Write docs/benchmarks.md.")) -> None:
    """Updates/s of one enclave vs two sharded enclave workers, in the same run (docs/scaling.md)."""
    from ops.bench_shards import run_bench

    result = run(run_bench(settings(), quick=quick, d=params, write_docs=write_docs))
    if not json_out:
        for r in result["cases"]:
            console.print(f"{r['shards']} enclave worker(s): {r['updates_per_s']} updates/s "
                          f"(cores per enclave {r['enclave_cores']}, host {r['host_cores']} of {r['cpu_count']})")
        console.print(f"speed-up {result['speedup']}x (goal {result['goal']}x); load average "
                      f"{result['load_average']}")
        return
    print_json(result)


@bench_app.command("compression")
def bench_compression(devices: int = typer.Option(5, min=2, help="Devices in the demo."),
                      rounds: int = typer.Option(5, min=1, help="Rounds per encoding."),
                      tasks: str = typer.Option(None, help="Tasks, comma-separated (default: every shipped task)."),
                      write_docs: bool = typer.Option(False, "--write-docs", help="Write docs/benchmarks.md."),
                      json_out: bool = typer.Option(False, "--json")) -> None:
    """Bytes per update and accuracy of int8 and top-k against float32 (the demo, per task and encoding)."""
    from ops.bench_compression import SHIPPED_TASKS, run_bench

    result = run(run_bench(settings(), devices=devices, rounds=rounds,
                           tasks=tuple(tasks.split(",")) if tasks else SHIPPED_TASKS, write_docs=write_docs))
    if json_out:
        print_json(result)
        return
    for r in result["cases"]:
        acc = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.3f}"
        console.print(f"{r['task']} {r['compression']:>5}: {r['payload_bytes']:>7,} B payload "
                      f"({r['payload_ratio']}x), {r['message_bytes']:>7,} B message ({r['message_ratio']}x), "
                      f"accuracy {acc} ({r['accuracy_change_points']} points)")


@bench_app.command("large")
def bench_large(updates: str = typer.Option("1,3", help="Updates per run, comma-separated."),
                write_docs: bool = typer.Option(False, "--write-docs", help="Write docs/benchmarks.md."),
                json_out: bool = typer.Option(False, "--json")) -> None:
    """A 25 M-parameter (100 MB) model's round trip in chunks, and the enclave's memory per update count."""
    from ops.bench_large import run_bench

    try:
        counts = tuple(int(x) for x in updates.split(","))
    except ValueError:
        raise fail(f"--updates takes numbers like 1,3, not {updates!r}", 2) from None
    result = run(run_bench(settings(), counts, write_docs=write_docs))
    if json_out:
        print_json(result)
        return
    for r in result["cases"]:
        console.print(f"{r['updates']} x 100 MB: round trip {r['round_trip_s']} s, enclave peak RSS "
                      f"{r['enclave_peak_rss_mib']} MiB ({r['rss_in_models']} model sizes)")


@bench_app.command("robust")
def bench_robust(json_out: bool = typer.Option(False, "--json", help="Print only JSON."),
                 quick: bool = typer.Option(False, help="A tiny grid, for a smoke run."),
                 seeds: int = typer.Option(2, min=1, max=20, help="Seeds per cell."),
                 defences: str = typer.Option("fedavg,legacy,fltrust,qflare-noroot,qflare",
                                              help="Defences compared, comma-separated (fedavg is the baseline)."),
                 write_docs: bool = typer.Option(False, "--write-docs",
                                                 help="Write the table and heat-map into docs/benchmarks.md.")) -> None:
    """Attacks x defences x {20 %, 30 %} malicious on digits (Dirichlet 0.5): accuracy gaps,
    backdoor success, false positives and negatives, and the issue-11 goals."""
    from ops.bench_robust import render, run_bench

    try:
        result = run_bench(quick=quick, seeds=seeds, write_docs=write_docs, defences=tuple(defences.split(",")),
                           progress=lambda msg: err_console.print(msg))
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if json_out:
        print_json(result)
    else:
        console.print(render(result))



@bench_app.command("intermittent")
def bench_intermittent(json_out: bool = typer.Option(False, "--json", help="Print only JSON."),
                       devices: int = typer.Option(20, min=2, help="Simulated devices."),
                       offline: float = typer.Option(0.5, min=0.0, max=0.95,
                                                     help="Share of devices offline at any moment."),
                       mean_online: float = typer.Option(10.0, min=0.1, help="Mean online period (s), exponential."),
                       seconds: float = typer.Option(90.0, min=5, help="Length of each mode's run (s)."),
                       deadline: float = typer.Option(10.0, min=1, help="Sync: each round's deadline (s)."),
                       buffer_size: int = typer.Option(5, min=1, help="Async: fl.buffer_size."),
                       max_staleness: int = typer.Option(4, min=0, help="Async: fl.max_staleness."),
                       target: float = typer.Option(0.9, min=0.0, max=1.0, help="Target test accuracy."),
                       seed: int = typer.Option(0, help="Seed of the trace and the data."),
                       train_seconds: float = typer.Option(2.0, min=0.0, help="Mean time a simulated device's "
                                                           "training takes (slower hardware than this machine)."),
                       trace: Path | None = typer.Option(None, help="A trace file (JSON: {\"horizon\": s, "
                                                                    "\"devices\": [[[start, end], ...], ...]}) "
                                                                    "instead of the exponential one."),
                       write_docs: bool = typer.Option(False, "--write-docs", help="Write the table and the plot "
                                                                                   "into docs/benchmarks.md.")) -> None:
    """Sync rounds against async (FedBuff) on a fleet whose devices come and go: time to a target
    accuracy, updates sent and wasted, bytes, and a plot of accuracy against time."""
    from edge_agent.availability import TraceError, load
    from ops.bench_intermittent import run_bench

    try:
        if trace is not None:
            load(trace, devices)  # a bad file is a usage error, before any service starts
        result = run(run_bench(settings(), devices=devices, offline_fraction=offline, mean_online=mean_online,
                               budget=seconds, deadline=deadline, buffer_size=buffer_size,
                               max_staleness=max_staleness, target=target, seed=seed, trace_file=trace,
                               train_seconds=train_seconds,
                               write_docs=write_docs))
    except TraceError as exc:
        raise fail(str(exc), 2) from None
    if json_out:
        print_json(result)
        return
    for mode in ("sync", "async"):
        r = result[mode]
        reached = "never" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s"
        console.print(f"{mode:>5}: target {target:g} reached {reached}, final accuracy {r['final_accuracy']:.3f}, "
                      f"{r['models']} models, {r['updates_sent']} updates sent, {r['updates_wasted']} wasted, "
                      f"{r['update_bytes']:,} bytes")
    console.print(f"speed-up {result['speedup']}x, accuracy {result['accuracy_change_points']:+.2f} points: goal "
                  f"{'met' if result['goal_met'] else 'not met'}")


from ops.operator_cmd import register as _register_operator_commands

_register_operator_commands(app, token_app, device_app, round_app, coordinator_app, sys.modules[__name__])

def cli(argv: list[str] | None = None) -> None:
    """The ``qflare`` entry point: a usage error (a bad option or value) is one line too."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    from typer.exceptions import Abort

    try:
        code = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as exc:
        sys.stdout.write(exc.ctx.get_help() + "\n" if exc.ctx else "")
        code = 0
    except UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        fail(f"{exc.format_message()}{where}", EXIT_USAGE)
        code = EXIT_USAGE
    except ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
        code = exc.exit_code
    except Abort:
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    cli()
