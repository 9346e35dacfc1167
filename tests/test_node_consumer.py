"""A non-Python system integrates from the docs alone: a Node.js consumer (amqplib, from the npm
registry) follows ``round.completed`` and ``update.rejected.*`` of a real demo run (issue 12, item 4).

``tests/node`` holds the consumer with an ``npm ci``-able lock; the test installs it at setup
when ``node_modules`` is missing. Node.js and npm must be on the machine (they are in CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.client import BrokerClient
from ops.demo import run_demo

pytestmark = pytest.mark.broker
NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="module")
def node_consumer() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("Node.js and npm are needed for the integration test (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], check=False, cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return NODE_DIR / "consumer.js"


async def test_a_node_consumer_follows_round_results_and_rejections(node_consumer, settings):
    ns = settings.broker.namespace
    b = await BrokerClient.open(settings, name="pytest-topology")  # the exchange exists before the consumer binds
    await b.close()
    proc = await asyncio.create_subprocess_exec(
        "node", str(node_consumer), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AMQP_URL": settings.amqp_url, "NAMESPACE": ns,
             "BINDINGS": "round.completed,update.rejected.*", "UNTIL": "round.completed"})
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert ready == {"ready": True, "exchange": f"{ns}.events", "bindings": ["round.completed",
                                                                              "update.rejected.*"]}
        report = await run_demo(settings, devices=5, rounds=1, malicious=0.4, attack="scale", namespace=ns)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(x) for x in out.decode().splitlines()]
    keys = [x["routingKey"] for x in lines]
    assert keys[-1] == "round.completed" and keys.count("update.rejected.norm_bound") == 2, keys
    for x in lines:
        ce = x["cloudevent"]
        assert x["persistent"] and ce["specversion"] == "1.0" and ce["type"] == x["routingKey"]
        assert ce["datacontenttype"] == "application/json" and ce["id"] and ce["time"].endswith("Z")
        assert ce["source"] == f"/qflare/{ns}/qflare-enclave"
    done = lines[-1]["event"]
    assert done["round_id"] == report.rounds[0].round and done["detail"]["accepted"] == 3
    rejected = [x["event"] for x in lines if x["routingKey"].startswith("update.rejected.")]
    assert {r["reason"] for r in rejected} == {"norm_bound"} and all(r["device_id"] for r in rejected)
