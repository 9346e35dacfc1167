"""Shared fixtures: a real RabbitMQ, and a fresh namespace per test.

The broker is the one named by QFLARE_AMQP_URL, else the local default; only when neither
answers is one started with testcontainers. With none to be had, broker tests fail with a
message saying how to get one (they are never silently skipped). PostgreSQL the same way:
QFLARE_TEST_PG_URL, else 127.0.0.1:5432 (user postgres), else a testcontainers one; each test
gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from common.settings import DEFAULT_AMQP_URL, Settings, load_settings

VECTORS = Path(__file__).resolve().parent / "vectors"


def _answers(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("QFLARE_AMQP_URL") or DEFAULT_AMQP_URL
    if _answers(url):
        yield url
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:  # pragma: no cover
        pytest.fail(f"no RabbitMQ at {url} and testcontainers is not installed; "
                    "start one with `rabbitmq-server -detached` or set QFLARE_AMQP_URL")
    try:
        container = RabbitMqContainer("rabbitmq:3.13").start()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"no RabbitMQ at {url}, and testcontainers could not start one ({exc}); "
                    "start one with `rabbitmq-server -detached` or set QFLARE_AMQP_URL")
    try:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
        yield f"amqp://guest:guest@{host}:{port}/"
    finally:
        container.stop()


DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL server's maintenance database, where test databases are made."""
    url = os.environ.get("QFLARE_TEST_PG_URL") or DEFAULT_PG_URL
    if _answers(url.replace("postgresql://", "amqp://", 1).rsplit("/", 1)[0] + "/"):
        yield url
        return
    try:
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16", driver=None).start()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"no PostgreSQL at {url}, and testcontainers could not start one ({exc}); "
                    "start one or set QFLARE_TEST_PG_URL")
    try:
        yield container.get_connection_url()
    finally:
        container.stop()


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """The URL of a fresh database of this test's own (dropped, with its connections, after)."""
    import psycopg

    name = "qflare_t" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(amqp_url: str, tmp_path: Path) -> Settings:
    """Settings in a namespace and state directory of the test's own.

    Protocol tests run rounds of one or two devices, so ``fl.min_accepted`` is 1 here; the
    tests of that floor itself (tests/test_model_trust.py) use the product's default, 3.
    """
    ns = "t" + uuid.uuid4().hex[:10]
    return load_settings(amqp_url=amqp_url, state_dir=tmp_path / "state",
                         broker={"namespace": ns, "rpc_timeout": 10.0}, fl={"min_accepted": 1})


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[object]:
    """An open BrokerClient with the topology declared; everything deleted afterwards."""
    from broker.client import BrokerClient
    from broker.topology import delete_topology

    client = await BrokerClient.open(settings, name="pytest")
    try:
        yield client
    finally:
        try:
            ch = await client.connection.channel()
            await delete_topology(ch, client.names)
            await ch.close()
        finally:
            await client.close()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail the test with a clear message on timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def rabbit_node(tmp_path: Path):
    """A factory of private RabbitMQ nodes (tests/rabbitnode.py), each removed after the test.

    For tests that stop a broker or need TLS; the shared node on 5672 is never touched.
    """
    from tests.rabbitnode import RabbitNode

    nodes: list[RabbitNode] = []

    def make(**kw) -> RabbitNode:
        node = RabbitNode(tmp_path / f"rabbit{len(nodes)}", **kw)
        nodes.append(node)
        return node.start()

    try:
        yield make
    finally:
        for node in nodes:
            node.cleanup()


@pytest.fixture
def sh(amqp_url: str, tmp_path: Path):
    """The real CLI in subprocesses, in a namespace and state directory of the test's own."""
    from tests.test_cli_shell import Shell

    shell = Shell(amqp_url, tmp_path / "state")
    try:
        yield shell
    finally:
        shell.close()
