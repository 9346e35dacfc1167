"""Tasks over the real broker: a user's task from outside the repository, every shipped task
learning in the demo, and devices that refuse a model of another task."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from common.training import runner_for
from coordinator.service import META_ENCLAVE_REPORT
from edge_agent.fleet import Fleet, Member
from edge_agent.outbox import Outbox
from ops.demo import run_demo
from tests.conftest import wait_for
from tests.services import coordinator, enclave, enrolled
from tests.test_cli_shell import Shell
from tests.test_devices import start_round
from tests.test_tasks import ROOT, user_task_source

pytestmark = pytest.mark.broker


@pytest.fixture
def user_sh(amqp_url, tmp_path):
    """A shell whose PYTHONPATH holds a user's own module, ``their_task``, written outside the repository."""
    outside = tmp_path / "their_code"
    outside.mkdir()
    (outside / "their_task.py").write_text(user_task_source())
    shell = Shell(amqp_url, tmp_path / "state")
    shell.env["PYTHONPATH"] = f"{outside}:{ROOT}"
    shell.env["QFLARE_FL__TASK"] = "tasks.digits:task"  # the task comes from --task alone
    try:
        yield shell, outside
    finally:
        shell.close()


def test_user_task_outside_the_repository_trains_end_to_end_in_the_demo(user_sh):
    sh, _ = user_sh
    out = json.loads(sh.run("demo", "--task", "their_task:task", "--devices", "3", "--rounds", "2",
                            "--json").stdout)
    assert out["task"] == "their_task:task"
    assert [r["status"] for r in out["rounds"]] == ["completed"] * 2
    assert all(r["accepted"] == 3 for r in out["rounds"])
    # the enclave evaluated through the user's own evaluate(): its metric is in every round
    assert all(set(r["metrics"]) == {"accuracy", "positive_rate"} for r in out["rounds"])
    assert out["rounds"][-1]["accuracy"] >= 0.8


def test_user_task_outside_the_repository_trains_through_agent_and_enclave_processes(user_sh, monkeypatch):
    sh, outside = user_sh
    monkeypatch.syspath_prepend(str(outside))  # this test reads the user's module too, to make the device's file
    from their_task import blobs

    x, y = blobs(120, seed=42)
    data = outside / "their-cam.csv"
    data.write_text("f0,f1,f2,f3,label\n" + "".join(",".join(map(str, [*row, lab])) + "\n"
                                                  for row, lab in zip(x.tolist(), y.tolist(), strict=True)))
    runner = runner_for("their_task:task")
    before = runner.evaluate(runner.initial_params(), *runner.test_data)["accuracy"]
    runner_for.cache_clear()
    sh.env["QFLARE_FL__MIN_UPDATES"] = "1"  # a one-device fleet
    sh.env["QFLARE_FL__MIN_ACCEPTED"] = "1"  # (the enclave's floor, 3 by default, lowered on purpose)
    sh.start("coordinator", "run")
    sh.wait_for_coordinator()
    sh.start("enclave", "run", "--task", "their_task:task")
    tok = sh.json("token", "create", "--device-id", "their-cam")
    sh.run("agent", "enroll", "--device-id", "their-cam", "--token", tok["token"],
           "--coordinator-fingerprint", tok["coordinator_fingerprint"])
    agent = sh.start("agent", "run", "--device-id", "their-cam", "--task", "their_task:task", "--data", str(data))
    state = Path(sh.env["QFLARE_STATE_DIR"])
    _poll(lambda: _meta(state / "registry.sqlite3", META_ENCLAVE_REPORT), 30)
    sh.run("round", "start", "--rounds", "1", "--min-updates", "1", "--deadline", "30", "--device", "their-cam")
    result = _poll(lambda: _round(state / "enclave" / "enclave.sqlite3", 1), 60)
    assert agent.poll() is None
    assert result["accepted"] == 1 and result["rejected"] == {}
    assert set(result["metrics"]) == {"accuracy", "positive_rate"}  # the user's evaluate, in the enclave
    assert result["accuracy"] > before  # one round on the device's own file moved the model


def _round(db_path: Path, round_id: int) -> dict | None:
    if not db_path.exists():
        return None
    db = sqlite3.connect(db_path)
    try:
        row = db.execute("SELECT status, result FROM rounds WHERE round_id=?", (round_id,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return json.loads(row[1]) if row and row[0] == "completed" else None


def _meta(db_path: Path, key: str):
    if not db_path.exists():
        return None
    db = sqlite3.connect(db_path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()


def _poll(fetch, timeout: float):
    end = time.time() + timeout
    while time.time() < end:
        got = fetch()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("task", ["tasks.digits_cnn:task", "tasks.breast_cancer:task"])
async def test_every_shipped_task_learns_in_the_demo(settings, task, capsys):
    s = settings.model_copy(update={"fl": settings.fl.model_copy(update={"task": task})})
    runner = runner_for(task)
    before = runner.evaluate(runner.initial_params(), *runner.test_data)["accuracy"]
    report = await run_demo(s, devices=5, rounds=3)
    acc = [r.accuracy for r in report.rounds]
    with capsys.disabled():
        print(f"\n{task}: before {before:.3f}, by round {acc}")
    assert [r.status for r in report.rounds] == ["completed"] * 3 and all(r.accepted == 5 for r in report.rounds)
    assert acc[0] > before + 0.3 and acc[-1] >= acc[0] and acc[-1] >= 0.9
    assert set(report.rounds[-1].metrics) == {"accuracy", "loss"}


async def test_a_device_refuses_a_model_of_another_task(broker, settings, tmp_path):
    """An enclave on digits, a device on breast cancer: the device says why and sends nothing."""
    async with coordinator(settings) as coord, enclave(settings):
        dev = await enrolled(broker, coord, "mixed-up")
        refused: list[tuple[str, str]] = []
        other = runner_for("tasks.breast_cancer:task")
        outbox = Outbox(tmp_path / "o.sqlite3")
        fleet = Fleet(broker, outbox, task=other, on_reject=lambda d, r: refused.append((d, r)))
        fleet.add(Member(dev, *other.load_data(0, 2)))
        await fleet.listen()
        await start_round(coord, broker, 1, ["mixed-up"])
        await wait_for(lambda: refused, 20)  # the round's announcement: the first model the enclave publishes
        await fleet.drain()
        assert refused == [("mixed-up", "layout_mismatch")]
        assert fleet.members["mixed-up"].last_round == 0 and list(outbox.pending()) == []
