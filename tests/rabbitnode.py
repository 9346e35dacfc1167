"""A private RabbitMQ node for one test: its own name, ports, data, logs, config and cookie.

Fault tests stop and start a broker, and TLS tests need a TLS listener: neither may touch the
node on 5672 that every engineer's tests share. A :class:`RabbitNode` runs the installed
``rabbitmq-server`` in the foreground as a child of the test, with every file it reads or
writes under one directory, so it can be stopped for real (``rabbitmqctl -n NODE stop``, the
whole Erlang VM), started again on the same data, and removed without a trace.

Ports are picked free at creation and kept across restarts (clients reconnect to the same
URL). Readiness is a condition (the AMQP, TLS and management ports accept connections), never
a sleep. On failure the error carries the tail of the node's log.

A :class:`RabbitCluster` is several such nodes sharing one Erlang cookie, joined into one
cluster, each still with its own name, ports and directory; its nodes run small (one scheduler,
no busy waiting) so three fit on a 2-core machine next to everything else.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

#: The installed scripts (Debian's rabbitmq-server); the /usr/sbin wrappers would switch user.
RABBITMQ_BIN = Path(os.environ.get("QFLARE_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
#: Erlang VM flags every private node gets: distribution on loopback only.
BASE_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
#: A small VM for cluster members: one scheduler (dirty CPU and IO ones too), a few async
#: threads, and no busy-waiting schedulers, which would burn a shared core while idle.
SMALL_ERL_ARGS = "+S 1:1 +SDcpu 1:1 +SDio 2 +A 4 +sbwt none +sbwtdcpu none +sbwtdio none"


class NodeError(RuntimeError):
    """The private node did not start or stop; the message holds the log's last lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@dataclass(frozen=True)
class TlsFiles:
    """PEM files made for a test: a CA, a server certificate for ``localhost``/127.0.0.1, and
    a client certificate, all signed by that CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate and key (``<name>.pem``, ``<name>.key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _write(directory, name, cert, key)


def issue(directory: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca``: a server one for localhost and 127.0.0.1, or a client one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(directory, name, builder.sign(ca_key, hashes.SHA256()), key)


def _write(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def make_tls_files(directory: Path, ca_name: str = "test-ca") -> TlsFiles:
    ca = make_ca(directory, ca_name)
    server = issue(directory, "server", ca, server=True)
    client = issue(directory, "client", ca, server=False)
    return TlsFiles(ca[0], *server, *client)


class RabbitNode:
    """One private RabbitMQ node under ``base``; see the module docstring.

    ``tls`` adds a TLS listener (peer verification on; a client certificate is asked for and
    checked when given, required when ``require_client_cert``); ``plain=False`` drops the plain
    AMQP listener; ``management`` enables the management plugin on its own port.
    """

    def __init__(self, base: Path, *, tls: TlsFiles | None = None, plain: bool = True, management: bool = False,
                 require_client_cert: bool = False, cookie: str | None = None, small: bool = False,
                 name: str | None = None) -> None:
        self.base = base
        self.name = name or f"qft{uuid.uuid4().hex[:10]}@localhost"
        #: The Erlang cookie (shared by the members of one cluster); None: the node makes its own.
        self.cookie = cookie
        self.small = small
        self.tls = tls
        self.plain = plain
        self.management = management
        self.require_client_cert = require_client_cert
        self.amqp_port = free_port()
        self.tls_port = free_port() if tls else None
        self.mgmt_port = free_port() if management else None
        self.dist_port = free_port()
        ctl = random.randrange(40000, 60000, 20)
        self.ctl_ports = (ctl, ctl + 19)
        self.proc: subprocess.Popen | None = None
        self._write_files()

    # --- files ----------------------------------------------------------------------------

    @property
    def log_file(self) -> Path:
        return self.base / "log" / f"{self.name}.log"

    def _write_files(self) -> None:
        for d in ("home", "mnesia", "log", "plugins-expand"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        if self.cookie is not None:
            cookie = self.base / "home" / ".erlang.cookie"
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        plugins = "[rabbitmq_management]." if self.management else "[]."
        (self.base / "enabled_plugins").write_text(plugins + "\n")
        (self.base / "rabbitmq-env.conf").write_text("")  # never the system's
        lines = ["loopback_users.guest = true", "log.file.level = info", "log.console = false",
                 "disk_free_limit.absolute = 10MB"]
        lines.append(f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}" if self.plain else "listeners.tcp = none")
        if self.tls:
            lines += [f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                      f"ssl_options.cacertfile = {self.tls.ca}",
                      f"ssl_options.certfile = {self.tls.server_cert}",
                      f"ssl_options.keyfile = {self.tls.server_key}",
                      "ssl_options.verify = verify_peer",
                      f"ssl_options.fail_if_no_peer_cert = {str(self.require_client_cert).lower()}"]
        if self.management:
            lines += [f"management.tcp.port = {self.mgmt_port}", "management.tcp.ip = 127.0.0.1"]
        (self.base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def env(self) -> dict[str, str]:
        """The environment of this node's server and CLI: every path and port its own."""
        b = self.base
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(b / "home"),  # the Erlang cookie lives here: private to this node
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(b / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(b / "node.pid"),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_ports[0]),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_ports[1]),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": BASE_ERL_ARGS + (" " + SMALL_ERL_ARGS if self.small else ""),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    # --- URLs -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None, "node has no TLS listener"
        return f"amqps://guest:guest@localhost:{self.tls_port}/"

    # --- life -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ports(self) -> list[int]:
        return [p for p in ((self.amqp_port if self.plain else None), self.tls_port, self.mgmt_port) if p]

    def start(self, timeout: float = 90.0) -> RabbitNode:
        """Start (or start again on the same data) and return once every listener accepts."""
        if self.running:
            return self
        out = open(self.base / "server.out", "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env(), stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        end = time.monotonic() + timeout
        waiting = self._ports()
        while waiting:
            if self.proc.poll() is not None:
                raise NodeError(f"node {self.name} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > end:
                self.kill()
                raise NodeError(f"node {self.name} not listening on {waiting} within {timeout:g}s: {self.tail()}")
            waiting = [p for p in waiting if not _listening(p)]
            if waiting:
                time.sleep(0.1)
        return self

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``rabbitmqctl -n NODE ...`` against this node only."""
        return subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """A full node stop (the Erlang VM ends), as ``rabbitmqctl stop`` does in production."""
        if not self.running:
            return
        assert self.proc is not None
        res = self.ctl("stop", timeout=timeout)
        try:
            self.proc.wait(timeout if res.returncode == 0 else 5)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        for port in self._ports():  # the OS has released every listener before we return
            end = time.monotonic() + 10
            while _listening(port) and time.monotonic() < end:
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the node's process group (a crash, or cleanup of a node that will not stop)."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # our own child's group: the sh wrapper and its beam

    def cleanup(self) -> None:
        """Stop if running and remove every file of the node."""
        try:
            self.stop()
        finally:
            if self.running:
                self.kill()
            shutil.rmtree(self.base, ignore_errors=True)

    def tail(self, lines: int = 15) -> str:
        for f in (self.log_file, self.base / "server.out"):
            if f.exists() and f.stat().st_size:
                return " | ".join(f.read_text(errors="replace").strip().splitlines()[-lines:])
        return "(no log)"

    def __enter__(self) -> RabbitNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RabbitCluster:
    """``size`` private nodes under ``base`` joined into one RabbitMQ cluster.

    Every node has its own name, ports and directory (a :class:`RabbitNode`); they share one
    Erlang cookie, written into each node's home. :meth:`start` boots the first node, then
    joins each other one to it (``stop_app``, ``join_cluster``, ``start_app``) and returns once
    every member reports the whole cluster running. :meth:`cleanup` ends every node (SIGKILL:
    its data is deleted next, nothing needs saving) and removes ``base``, also after a failed
    start: call it from a ``finally``.
    """

    def __init__(self, base: Path, size: int = 3) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.base = base
        cookie = secrets.token_hex(16).upper()
        tag = uuid.uuid4().hex[:8]
        self.nodes = [RabbitNode(base / f"node{i}", cookie=cookie, small=True, name=f"qfc{tag}n{i}@localhost")
                      for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: the form ``QFLARE_AMQP_URL`` takes for a cluster."""
        return ",".join(self.urls)

    def node_of(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.name == name)

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``rabbitmqctl`` against the first running member (cluster-wide commands)."""
        node = next((n for n in self.nodes if n.running), None)
        if node is None:
            raise NodeError("no member of the cluster is running")
        return node.ctl(*args, timeout=timeout)

    def queues(self) -> dict[str, dict]:
        """Queue name → ``type``, ``members``, ``leader``, ``online`` members, as the cluster reports them."""
        import json

        res = self.ctl("list_queues", "name", "type", "members", "online", "leader", "messages",
                       "--formatter", "json", "--silent")
        if res.returncode != 0:
            raise NodeError(f"list_queues failed: {res.stderr.strip()[-300:]}")
        return {q["name"]: q for q in json.loads(res.stdout or "[]")}

    def start(self, timeout: float = 120.0) -> RabbitCluster:
        atexit.register(self.cleanup)  # even if the caller's finally never runs (an internal error)
        first, *others = self.nodes
        first.start(timeout)
        for node in others:
            node.start(timeout)
            for step in (("stop_app",), ("join_cluster", first.name), ("start_app",)):
                res = node.ctl(*step, timeout=timeout)
                if res.returncode != 0:
                    raise NodeError(f"{node.name}: rabbitmqctl {' '.join(step)} failed: "
                                    f"{(res.stderr or res.stdout).strip()[-500:]} | {node.tail()}")
        self.wait_running(len(self.nodes), timeout)
        return self

    def running_members(self, via: RabbitNode | None = None) -> set[str]:
        """The cluster's running nodes, as one running member sees them (empty if it cannot say)."""
        import json

        via = via or next((n for n in self.nodes if n.running), None)
        if via is None:
            return set()
        res = via.ctl("cluster_status", "--formatter", "json", timeout=30)
        if res.returncode != 0:
            return set()
        try:
            return set(json.loads(res.stdout).get("running_nodes", []))
        except ValueError:
            return set()

    def wait_running(self, count: int, timeout: float = 120.0) -> None:
        """Until ``count`` members run, as seen by every running node."""
        end = time.monotonic() + timeout
        while True:
            views = [self.running_members(n) for n in self.nodes if n.running]
            if views and all(len(v) >= count for v in views):
                return
            if time.monotonic() > end:
                raise NodeError(f"cluster not at {count} running nodes within {timeout:g}s: {views}")
            time.sleep(0.5)

    def cleanup(self) -> None:
        """End every node and remove every file of the cluster (safe to call twice)."""
        atexit.unregister(self.cleanup)
        try:
            for node in self.nodes:
                node.kill()
        finally:
            for node in self.nodes:
                shutil.rmtree(node.base, ignore_errors=True)
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:  # noqa: PYI034 - as RabbitNode's
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
