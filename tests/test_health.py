"""/healthz, /readyz and /metrics of the coordinator and the enclave (issue 12, items 1 and 3)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from common import health, metrics
from tests.services import coordinator

pytestmark = pytest.mark.broker


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def aget(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, port, path)


async def test_coordinator_health_readiness_and_metrics_paths(settings, broker):
    # (``broker`` deletes the namespace's topology afterwards: the coordinator declared it)
    async with coordinator(settings) as coord:
        http = await health.serve("coordinator", coord.readiness_checks(), metrics.COORDINATOR, "127.0.0.1", 0,
                                  "coordinator.http_port")
        try:
            assert await aget(http.port, "/healthz") == (200, json.dumps({"status": "alive",
                                                                         "service": "coordinator"},
                                                                        separators=(",", ":")))
            status, body = await aget(http.port, "/readyz")
            assert status == 200 and json.loads(body)["checks"] == {"broker": "ok", "registry": "ok"}
            status, text = await aget(http.port, "/metrics")
            assert status == 200 and "# TYPE qflare_handshake_duration_seconds histogram" in text
            assert "qflare_model_accuracy" not in text, "the coordinator cannot know the model's accuracy"
            assert "qflare_updates_total" not in text  # the enclave's figure
            for path in ("/", "/health", "/metrics/x", "/status"):
                assert (await aget(http.port, path))[0] == 404, path
            await coord.broker.connection.close()  # the broker goes away: not ready, and why
            status, body = await aget(http.port, "/readyz")
            assert status == 503 and json.loads(body)["failing"] == "broker"
        finally:
            await http.stop()


async def test_readiness_names_the_first_failing_check():
    ok, body = await health.readiness([health.Check("broker", lambda: None),
                                       health.Check("attested", lambda: "not admitted yet"),
                                       health.Check("store", lambda: 1 / 0)])
    assert not ok and body["failing"] == "attested" and body["reason"] == "attested: not admitted yet"
    assert body["checks"]["store"].startswith("ZeroDivisionError")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_status(port: int, path: str, want: int, timeout: float = 60, has: str = "") -> str:
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = get(port, path)
            if last[0] == want and has in last[1]:
                return last[1]
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path} on {port} did not answer {want}; last {last}")


def test_coordinator_and_enclave_on_one_host_each_on_its_own_port(sh):
    cport, eport = free_port(), free_port()
    sh.env["QFLARE_COORDINATOR__HTTP_PORT"], sh.env["QFLARE_ENCLAVE__HTTP_PORT"] = str(cport), str(eport)
    sh.run("coordinator", "fingerprint")  # the coordinator's key, which the enclave pins, exists
    sh.start("enclave", "run")  # first: alive, but not ready until a coordinator admits it
    wait_status(eport, "/healthz", 200)
    body = json.loads(wait_status(eport, "/readyz", 503, has='"failing":"attested"'))
    assert body["failing"] == "attested" and "not admitted" in body["reason"]
    sh.start("coordinator", "run")
    assert json.loads(wait_status(cport, "/readyz", 200))["status"] == "ready"
    checks = json.loads(wait_status(eport, "/readyz", 200))["checks"]
    assert checks == {"broker": "ok", "attested": "ok", "store": "ok"}
    text = wait_status(eport, "/metrics", 200)
    assert "qflare_model_version 0.0" in text and "qflare_model_accuracy_ratio" not in text  # none evaluated yet


def test_a_port_in_use_is_one_line_naming_the_setting(sh):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "ops.cli", "coordinator", "run"], check=False, capture_output=True,
                             text=True,
                             env={**sh.env, "QFLARE_COORDINATOR__HTTP_PORT": str(port)}, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert f"coordinator.http_port: cannot listen on 127.0.0.1:{port}" in res.stderr
