"""``qflare task check MODULE:OBJECT``: will this task federate? Find out before a fleet does.

Loads the task, builds its model twice (initial weights must be deterministic), loads one
device's data, trains one batch, flattens and restores the result, and evaluates it. The
first thing wrong is raised as one :class:`TaskError` line; on success a short report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common.model import get_flat, layout_id
from common.task import TaskError, TrainConfig, load_task
from common.training import TaskRunner


@dataclass
class CheckReport:
    task: str
    layout_id: str
    n_params: int
    train_samples: int
    test_samples: int | None
    metrics: dict[str, float]
    #: State the model keeps outside its parameters (e.g. BatchNorm statistics): not federated.
    unfederated_buffers: list[str]

    def as_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        test = f"{self.test_samples} test samples" if self.test_samples is not None else "no test data"
        scores = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        note = (f"; note: buffers {', '.join(self.unfederated_buffers[:3])} are not federated"
                if self.unfederated_buffers else "")
        return (f"ok {self.task}: {self.n_params} parameters, layout {self.layout_id}, {self.train_samples} training "
                f"samples, {test}; after one batch {scores}{note}")


#: One epoch over one batch: enough to see weights move.
CHECK_CONFIG = TrainConfig(epochs=1)


def check_task(spec: str, device_index: int = 0, num_devices: int = 1,
               config: TrainConfig = CHECK_CONFIG) -> CheckReport:
    """Exercise every part of the task API once; :class:`TaskError` names the first failure."""
    runner = TaskRunner(load_task(spec), spec)
    again = runner.build_model()
    if layout_id(again) != runner.layout_id or not np.array_equal(get_flat(again), runner.initial_params()):
        raise TaskError(f"{spec}: build_model() is not deterministic: two calls gave different initial weights "
                        "(build it under common.model.seeded(0))")
    x, y = runner.load_data(device_index, num_devices)
    batch = slice(0, config.batch_size)
    start = runner.initial_params()
    delta, _ = runner.train(start, x[batch], y[batch], config)
    if not np.any(delta):
        raise TaskError(f"{spec}: training one batch changed no weight (does train() step an optimiser over "
                        "model.parameters()?)")
    trained = start + delta
    restored = get_flat(runner.model_from(trained))
    if not np.array_equal(restored, trained):
        raise TaskError(f"{spec}: the model does not give back the weights it was given (flatten and restore "
                        "differ): do not share or tie parameters across modules")
    held_out = runner.test_data
    metrics = runner.evaluate(trained, *(held_out or (x, y)))
    buffers = [name for name, _ in runner.template.named_buffers()]
    return CheckReport(spec, runner.layout_id, runner.n_params, len(y),
                       len(held_out[1]) if held_out is not None else None, metrics, buffers)
