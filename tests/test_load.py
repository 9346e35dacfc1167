"""``qflare load``: devices through enrolment, a session and one round, measured per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.report import write_section
from edge_agent.outbox import Outbox
from ops.load import markdown, run_load

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent


async def test_load_drives_every_device_through_the_round_and_reports_each_step(settings, tmp_path):
    png = tmp_path / "load.png"
    report = await run_load(settings, 12, connections=3, concurrency=8, namespace=settings.broker.namespace,
                            plot_path=png)
    assert report["devices"] == 12 and report["round_status"] == "completed"
    assert report["devices_completed"] == 12 and report["accepted"] + sum(report["rejected"].values()) == 12
    assert report["total_seconds"] >= report["enroll_and_session_seconds"] + report["round_seconds"]
    for name in ("enroll", "session", "update"):
        step = report["steps"][name]
        assert step["count"] == 12 and step["rate_per_s"] > 0
        assert 0 < step["p50_ms"] <= step["p95_ms"] <= step["p99_ms"] <= step["max_ms"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the coordinator and the enclave ran in processes of their own, each measured per phase
    phases = report["phases"]
    assert phases["enroll_and_session"]["coordinator_cpu_s"] > 0 and phases["round"]["enclave_cpu_s"] > 0
    assert phases["enroll_and_session"]["enclave_cpu_s"] < phases["enroll_and_session"]["coordinator_cpu_s"]
    assert report["machine_before"]["cpus"] >= 1 and len(report["machine_after"]["loadavg"]) == 3
    doc = tmp_path / "benchmarks.md"
    write_section("load", markdown(report, "qflare load --devices 12"), doc)
    text = doc.read_text()
    assert "<!-- bench:load -->" in text and "**not met**" in text and "| enroll | 12 |" in text


async def test_a_load_split_over_two_device_processes_reports_every_device_of_both(settings):
    report = await run_load(settings, 20, connections=2, concurrency=8, namespace=settings.broker.namespace,
                            device_processes=2)
    assert report["device_processes"] == 2 and report["round_status"] == "completed"
    assert report["devices_completed"] == report["devices"] == 20 and report["updates_sent"] == 20
    assert report["total_seconds"] >= report["enroll_and_session_seconds"] + report["round_seconds"]
    for name in ("enroll", "session", "update"):  # the children's raw times, merged by the parent
        step = report["steps"][name]
        assert step["count"] == 20 and 0 < step["p50_ms"] <= step["p95_ms"] <= step["p99_ms"]
    # the devices' CPU is both children's: they enrolled, trained, sealed and signed
    assert report["phases"]["enroll_and_session"]["devices_cpu_s"] > 0
    assert report["phases"]["round"]["devices_cpu_s"] > 0


def test_a_simulated_fleets_outbox_skips_the_fsync_but_keeps_an_update_across_a_restart(tmp_path):
    box = Outbox(tmp_path / "fleet.sqlite3", power_safe=False)
    box.put("u1", "load-00001", "key", b"sealed", 1)
    box.close()
    again = Outbox(tmp_path / "fleet.sqlite3", power_safe=False)
    assert again.pending() == [("u1", "load-00001", "key", b"sealed")]
    assert again.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: no fsync per commit
    assert Outbox(tmp_path / "device.sqlite3").db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_qflare_load_prints_only_json_and_writes_the_report(settings, tmp_path):
    env = {**os.environ, "QFLARE_AMQP_URL": settings.amqp_url, "QFLARE_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ops.cli", "load", "--devices", "4", "--connections", "2",
                           "--out", str(out), "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "load.json").read_text())
    assert (report["devices"], report["devices_completed"]) == (4, 4) and report["total_seconds"] > 0
    assert (out / "load.png").stat().st_size > 0
