"""The task API (common/task.py, common/training.py), the shipped tasks and ``qflare task check``, in-process.

The end-to-end runs over the broker are in tests/test_user_task.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.data import Partition, load_file
from common.model import get_flat
from common.task import TaskError, TrainConfig, load_task, parse_spec
from common.training import TaskRunner, runner_for
from enclave_worker.aggregate import fedavg
from ops.task_check import check_task

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("tasks.digits:task", "tasks.digits_cnn:task", "tasks.breast_cancer:task")


def user_task_source() -> str:
    """The complete user task of docs/tasks.md (its first python block), as a user would save it."""
    text = (ROOT / "docs" / "tasks.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)


def write_module(directory: Path, name: str, source: str) -> str:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return name


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """A directory outside the repository on sys.path, for modules a test writes."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    load_task.cache_clear()
    runner_for.cache_clear()


def federate(runner: TaskRunner, devices: int = 5, rounds: int = 3) -> list[float]:
    """Plain FedAvg rounds in-process (IID shards); the test accuracy after each."""
    g = runner.initial_params()
    shards = [runner.load_data(i, devices, Partition()) for i in range(devices)]
    out = []
    for r in range(rounds):
        results = [runner.train(g, x, y, TrainConfig(seed=1000 * r + i)) for i, (x, y) in enumerate(shards)]
        g = g + fedavg(np.stack([d for d, _ in results]), np.array([n for _, n in results], dtype=np.float64))
        out.append(runner.evaluate(g, *runner.test_data)["accuracy"])
    return out


# --- shipped tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SHIPPED)
def test_every_shipped_task_learns_in_federated_rounds(spec) -> None:
    runner = runner_for(spec)
    before = runner.evaluate(runner.initial_params(), *runner.test_data)["accuracy"]
    acc = federate(runner)
    print(f"\n{spec}: {before:.3f} -> {[round(a, 3) for a in acc]}")
    assert acc[-1] >= 0.9 and acc[-1] > before + 0.3, acc


def test_the_default_task_keeps_the_digits_figures() -> None:
    """5 devices x 3 rounds of the default task: the figures of the MLP built into the product before."""
    acc = federate(runner_for("tasks.digits:task"))
    assert acc[0] >= 0.85 and acc[-1] >= 0.93, acc


def test_shipped_tasks_have_distinct_layouts_and_fixed_initial_weights() -> None:
    runners = [runner_for(s) for s in SHIPPED]
    assert len({r.layout_id for r in runners}) == len(SHIPPED)
    for r in runners:
        np.testing.assert_array_equal(get_flat(r.build_model()), r.initial_params())


def test_a_dirichlet_partition_reaches_tasks_that_split_bundled_data() -> None:
    runner = runner_for("tasks.breast_cancer:task")
    iid = runner.load_data(0, 4, Partition("iid"))
    skewed = runner.load_data(0, 4, Partition("dirichlet", alpha=0.1, seed=1))
    assert not np.array_equal(iid[1], skewed[1])
    assert abs(skewed[1].mean() - 0.5) > abs(iid[1].mean() - 0.5)


# --- the loader ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tasks.digits", "tasks.digits:", ":task", "tasks digits:task", "a-b:c", 7])
def test_a_task_name_must_be_module_colon_object(spec) -> None:
    with pytest.raises(TaskError, match="MODULE:OBJECT"):
        parse_spec(spec)


def test_a_task_class_is_instantiated_and_optional_hooks_are_used(on_path) -> None:
    write_module(on_path, "hooked_task", """
        import numpy as np, torch
        from torch import nn
        CALLS = []
        class Hooked:
            def build_model(self):
                torch.manual_seed(0)
                return nn.Linear(3, 2)
            def load_data(self, device_index, num_devices):
                return np.ones((4, 3), np.float32) * device_index, np.array([0, 1, 0, 1])
            def load_test(self):
                return None
            def train(self, model, x, y, config):
                CALLS.append(("train", config.epochs, config.lr, config.batch_size, config.seed))
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            def evaluate(self, model, x, y):
                CALLS.append(("evaluate", len(y)))
                return {"score": 0.5}
    """)
    import hooked_task

    runner = runner_for("hooked_task:Hooked")
    g = runner.initial_params()
    delta, n = runner.train(g, *runner.load_data(1, 2), TrainConfig(3, 0.5, 4, 9))
    np.testing.assert_allclose(delta, np.ones_like(g), rtol=1e-6)
    assert n == 4 and runner.test_data is None
    assert runner.evaluate(g, *runner.load_data(0, 2)) == {"score": 0.5}
    calls = hooked_task.CALLS
    assert calls == [("train", 3, 0.5, 4, 9), ("evaluate", 4)]


def test_attacks_work_through_any_task() -> None:
    """sign-flip, scale and noise transform the trained delta; label-flip trains on flipped labels."""
    runner = runner_for("tasks.breast_cancer:task")
    x, y = runner.load_data(0, 5)
    g, cfg = runner.initial_params(), TrainConfig(seed=5)
    honest, _ = runner.train(g, x, y, cfg)
    np.testing.assert_array_equal(runner.train(g, x, y, cfg, "sign-flip")[0], honest * np.float32(-4))
    np.testing.assert_array_equal(runner.train(g, x, y, cfg, "scale")[0], honest * np.float32(20))
    assert abs(runner.train(g, x, y, cfg, "noise")[0].std() / honest.std() - 3.0) < 0.3
    flipped, _ = runner.train(g, x, y, cfg, "label-flip")
    trained_on_flips, _ = runner.train(g, x, 1 - y, cfg)
    np.testing.assert_array_equal(flipped, trained_on_flips)
    np.testing.assert_array_equal(runner.train(g, x, y, cfg, lambda d, seed: -d)[0], -honest)
    with pytest.raises(ValueError, match="unknown attack"):
        runner.train(g, x, y, cfg, "backdoor")


def test_a_user_task_without_a_partition_refuses_dirichlet(on_path) -> None:
    write_module(on_path, "plain_task", user_task_source())
    runner = runner_for("plain_task:task")
    runner.load_data(0, 2, Partition("iid", seed=3))  # its own split: the seed does not apply, iid is fine
    with pytest.raises(TaskError, match="splits its own data"):
        runner.load_data(0, 2, Partition("dirichlet"))


def test_a_task_error_in_training_names_the_task_and_the_cause(on_path) -> None:
    write_module(on_path, "shape_task", """
        import numpy as np, torch
        from torch import nn
        class T:
            def build_model(self):
                return nn.Linear(5, 2)
            def load_data(self, i, n):
                return np.zeros((8, 3), np.float32), np.zeros(8, np.int64)
            def load_test(self):
                return None
        task = T()
    """)
    runner = runner_for("shape_task:task")
    with pytest.raises(TaskError, match=r"^shape_task:task: train\(\) raised RuntimeError"):
        runner.train(runner.initial_params(), *runner.load_data(0, 1), TrainConfig())


# --- device files ----------------------------------------------------------------------------


def test_a_device_reads_its_data_from_npz_and_csv(tmp_path) -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    y = np.array([0, 1, 1, 0])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "d.csv").write_text("a,label,b,c\n" + "".join(
        f"{r[0]},{lab},{r[1]},{r[2]}\n" for r, lab in zip(x, y, strict=True)))
    for name in ("d.npz", "d.csv"):
        got_x, got_y = load_file(tmp_path / name)
        assert got_x.dtype == np.float32 and got_y.dtype == np.int64
        np.testing.assert_array_equal(got_x, x.astype(np.float32))
        np.testing.assert_array_equal(got_y, y)


@pytest.mark.parametrize("name,content,message", [
    ("d.csv", "a,b\n1,2\n", "no label column 'label'"),
    ("d.csv", "a,label\n1,x\n", "every value must be a number"),
    ("d.csv", "a,label\n1,0\n2\n", "line 3 has 1 values, the header 2"),
    ("d.txt", "1,2\n", "expected a .npz or .csv"),
    ("missing.csv", None, "does not exist"),
])
def test_a_bad_data_file_is_refused_with_its_reason(tmp_path, name, content, message) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_file(tmp_path / name)


async def test_a_device_file_the_model_cannot_take_stops_the_agent_before_the_broker(tmp_path) -> None:
    from common.settings import load_settings
    from edge_agent.agent import run_agent

    (tmp_path / "d.csv").write_text("a,b,label\n0.1,0.2,1\n0.3,0.4,0\n")  # 2 features; digits takes 64
    s = load_settings(state_dir=tmp_path / "s", amqp_url="amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(TaskError, match=r"tasks.digits:task: train\(\) raised RuntimeError"):
        await run_agent(s, "cam-1", 0, 1, data=tmp_path / "d.csv")


def test_an_npz_without_x_and_y_is_refused(tmp_path) -> None:
    np.savez(tmp_path / "d.npz", features=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="needs arrays 'x' and 'y'"):
        load_file(tmp_path / "d.npz")


# --- qflare task check -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", SHIPPED)
def test_task_check_passes_the_shipped_tasks(spec) -> None:
    report = check_task(spec)
    assert report.n_params == runner_for(spec).n_params and report.test_samples > 0
    assert set(report.metrics) == {"accuracy", "loss"}


HEAD = """
import numpy as np, torch
from torch import nn
class T:
    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(2, 2)
    def load_data(self, i, n):
        return np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
    def load_test(self):
        return None
"""
#: name -> (the task module's source, what the one line must say)
BROKEN = {
    "no_load_test": (HEAD.replace("def load_test", "def other"), "lacks load_test"),
    "not_a_module": (HEAD.replace("return nn.Linear(2, 2)", "return 3"), "returned int, not a torch.nn.Module"),
    "random_init": (HEAD.replace("torch.manual_seed(0)", "pass"), "not deterministic"),
    "bad_data": (HEAD.replace("return np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])", "return [1, 2], [0, 1]"),
                 "must give numpy arrays"),
    "lazy_train": (HEAD + "    def train(self, model, x, y, config):\n        pass\n", "changed no weight"),
    "bad_metrics": (HEAD + "    def evaluate(self, model, x, y):\n        return 0.5\n", "must return a non-empty dict"),
    "float64": (HEAD.replace("nn.Linear(2, 2)", "nn.Linear(2, 2).double()"), "is torch.float64; updates carry float32"),
    "import_fails": ("import numpy_but_misspelt\n",
                     "importing broken_import_fails failed: No module named 'numpy_but_misspelt'"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_task_check_reports_a_broken_task_in_one_line(tmp_path, name) -> None:
    source, message = BROKEN[name]
    module = write_module(tmp_path, f"broken_{name}", source + ("task = T()\n" if "class T" in source else ""))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "COLUMNS": "60"}
    done = subprocess.run([sys.executable, "-m", "ops.cli", "task", "check", f"{module}:task"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


@pytest.mark.parametrize("command", [("demo",), ("enclave", "run"), ("agent", "run", "--device-id", "cam-1")])
def test_a_broken_task_stops_demo_enclave_and_agent_at_start_in_one_line(tmp_path, command) -> None:
    write_module(tmp_path, "broken_at_start", HEAD.replace("torch.manual_seed(0)", "raise OSError('no weights')")
                 + "task = T()\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "COLUMNS": "60", "QFLARE_STATE_DIR": str(tmp_path / "s"),
           "QFLARE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}  # no broker is needed to refuse it
    done = subprocess.run([sys.executable, "-m", "ops.cli", *command, "--task", "broken_at_start:task"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: broken_at_start:task: build_model() raised OSError: no weights"], done.stderr


def test_task_check_says_ok_in_one_line_for_the_documented_user_task(tmp_path) -> None:
    write_module(tmp_path, "their_task", user_task_source())
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "COLUMNS": "60"}
    done = subprocess.run([sys.executable, "-m", "ops.cli", "task", "check", "their_task:task"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("ok their_task:task: 10 parameters")


def test_the_documented_user_task_is_complete_in_under_30_lines() -> None:
    source = user_task_source()
    assert len(source.strip().splitlines()) < 30
    assert "qflare" not in source.lower() and "common" not in source  # it needs nothing of QFLARE


def test_a_model_with_buffers_is_checked_with_a_note(on_path) -> None:
    write_module(on_path, "bn_task", """
        import numpy as np, torch
        from torch import nn
        class T:
            def build_model(self):
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
            def load_data(self, i, n):
                return np.random.default_rng(0).normal(size=(32, 2)).astype(np.float32), np.arange(32) % 2
            def load_test(self):
                return None
        task = T()
    """)
    report = check_task("bn_task:task")
    assert "1.running_mean" in report.unfederated_buffers and "not federated" in report.line()
