"""Bad input gets one clear line: its reason, an exit code, no traceback (issue 12, item 6).

Each test drives the real CLI in a subprocess against the real broker (``Shell`` fails any
run whose stderr holds a traceback).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.broker

EXIT_REFUSED, EXIT_USAGE, EXIT_BROKER, EXIT_TIMEOUT = 1, 2, 3, 4


def one_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_round_start_with_negative_rounds_is_one_line(sh):
    res = sh.run("round", "start", "--rounds", "-1", ok=False)
    assert res.returncode == EXIT_USAGE
    line = one_line(res)
    assert "--rounds" in line and "greater than or equal to 1" in line


def test_revoking_an_unknown_device_names_it_instead_of_a_key_error(sh):
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    res = sh.run("device", "revoke", "nope", ok=False)
    assert res.returncode == EXIT_REFUSED
    line = one_line(res)
    assert "not_enrolled" in line and "nope" in line and "KeyError" not in line


def test_a_wrong_broker_password_names_the_user_and_is_not_told_to_start_a_broker(sh, amqp_url):
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    res = sh.run("broker", "status", ok=False, env={"QFLARE_AMQP_URL": wrong})
    assert res.returncode == EXIT_BROKER
    line = one_line(res)
    assert "refused user 'guest'" in line and "rabbitmq-server" not in line and "not-the-password" not in line


def test_refused_broker_access_names_the_user(sh):
    user = sh.json("device", "broker-user", "cam-r")
    try:
        res = sh.run("broker", "check", ok=False, env={"QFLARE_AMQP_URL": user["amqp_url"]})
        assert res.returncode == EXIT_BROKER
        line = one_line(res)
        assert "access_refused" in line and "refused user" in line and "device.cam-r'" in line
    finally:
        sh.run("device", "broker-user", "cam-r", "--delete")


def test_an_attestation_timeout_is_one_line_saying_what_to_start(sh):
    sh.run("coordinator", "fingerprint")  # the key the enclave pins exists; no coordinator runs
    res = sh.run("enclave", "run", ok=False, env={"QFLARE_ENCLAVE__ATTEST_TIMEOUT_SECONDS": "1"})
    assert res.returncode == EXIT_TIMEOUT
    assert "qflare coordinator run" in one_line(res)


def test_rich_markup_in_an_error_is_printed_as_written(sh):
    res = sh.run("broker", "status", ok=False, env={"QFLARE_BROKER__NAMESPACE": "Not Valid"})
    assert res.returncode == EXIT_USAGE
    assert "[a-z0-9]" in one_line(res)


def test_an_enclave_with_no_coordinator_to_pin_is_one_line_saying_which_setting(sh):
    res = sh.run("enclave", "run", ok=False)
    assert res.returncode == EXIT_USAGE
    assert "enclave.coordinator_fingerprint" in one_line(res)


def test_a_typo_in_a_nested_setting_stops_the_cli(sh, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("fl:\n  roundz: 5\n")
    res = sh.run("--config", str(cfg), "token", "list", ok=False)
    assert res.returncode == EXIT_USAGE
    assert "fl.roundz: unknown setting" in one_line(res)
    res = sh.run("token", "list", ok=False, env={"QFLARE_FL__ROUNDZ": "5"})
    assert res.returncode == EXIT_USAGE and "QFLARE_FL__ROUNDZ" in one_line(res)


def test_status_on_a_typod_namespace_creates_no_topology(sh, amqp_url):
    typo = sh.env["QFLARE_BROKER__NAMESPACE"] + "-typo"
    for cmd in (("broker", "status"), ("broker", "dead-letters"), ("events", "--count", "1")):
        res = sh.run(*cmd, ok=False, env={"QFLARE_BROKER__NAMESPACE": typo})
        assert res.returncode == EXIT_REFUSED
        assert "not_found" in one_line(res) and typo in res.stderr
    assert not asyncio.run(_exchange_exists(amqp_url, f"{typo}.rpc"))
    assert not asyncio.run(_exchange_exists(amqp_url, f"{typo}.events"))


async def _exchange_exists(amqp_url: str, name: str) -> bool:
    import aio_pika
    import aiormq

    conn = await aio_pika.connect(amqp_url)
    try:
        ch = await conn.channel()
        await ch.declare_exchange(name, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await conn.close()


def test_json_output_is_only_json(sh):
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    for cmd in (("token", "create", "--device-id", "cam-j"), ("broker", "check"), ("broker", "status"),
                ("device", "list")):
        res = sh.run(*cmd, "--json")
        json.loads(res.stdout)  # nothing before or after the document


def _bench_queues(amqp_url: str) -> set[str]:
    """Queue names of benchmark namespaces on the broker (over its management API)."""
    from broker.queues import management_api
    from common.settings import load_settings

    rows = management_api(load_settings(amqp_url=amqp_url)).request("GET", "/api/queues/%2F?columns=name") or []
    return {q["name"] for q in rows if q.get("name", "").startswith("bench-")}


def test_bench_round_json_prints_only_json_and_leaves_the_docs_alone(sh, amqp_url):
    """... and leaves nothing on the broker: its coordinator used to redeclare its two queues
    while the topology was deleted, two queues more per case and run."""
    from common.report import DOC

    before, queues = DOC.read_text(), _bench_queues(amqp_url)
    res = sh.run("bench", "round", "--quick", "--passes", "2", "--json")
    out = json.loads(res.stdout)
    assert {"cases"} <= set(out) and out["cases"]
    for case in out["cases"]:  # two sealed rounds, each between two plaintext passes
        assert case["status"] == "round.completed" and case["accepted"] == case["updates"]
        assert (len(case["sealed_per_pass"]), len(case["plaintext_per_pass"]), len(case["ratios"])) == (2, 3, 2)
        assert case["ratio"] in case["ratios"]
        # what the host's CPU alone allows: plaintext host CPU per update over sealed
        want = case["cpu_ms_per_update_plaintext"]["host"] / case["cpu_ms_per_update_sealed"]["host"]
        assert case["cpu_bound_ratio"] == pytest.approx(want, abs=0.002)
        assert f"allows a ratio of {case['cpu_bound_ratio']}" in case["bound"]
    assert DOC.read_text() == before, "bench rewrote docs/benchmarks.md without --write-docs"
    left = _bench_queues(amqp_url) - queues
    assert not left, f"left on the broker: {sorted(left)}"


def test_services_log_one_json_line_at_start_with_namespace_fingerprints_and_port(sh):
    p = subprocess.Popen([sys.executable, "-m", "ops.cli", "--log-format", "json", "coordinator", "run"],
                         env={**sh.env, "QFLARE_COORDINATOR__HTTP_PORT": "0"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    sh.procs.append(p)
    line = {}
    while not line.get("message", "").startswith("coordinator started"):
        line = json.loads(p.stderr.readline())  # after the simulated-platform and operator warnings
    assert line["level"] == "info" and line["logger"] == "qflare.coordinator"
    assert line["namespace"] == sh.env["QFLARE_BROKER__NAMESPACE"]
    assert len(line["sig_fp"]) == 64 and len(line["kem_fp"]) == 64 and line["http_port"] > 0


def test_demo_prints_its_namespace_and_accepts_one(sh):
    ns = sh.env["QFLARE_BROKER__NAMESPACE"] + "-demo"
    out = json.loads(sh.run("demo", "--devices", "2", "--rounds", "1", "--namespace", ns, "--json").stdout)
    assert out["namespace"] == ns
    res = sh.run("demo", "--devices", "2", "--rounds", "1")
    assert "demo namespace: demo-" in res.stderr
    bad = sh.run("demo", "--namespace", "No Good", ok=False)
    assert bad.returncode == EXIT_USAGE and "--namespace" in one_line(bad)
