"""A federated task: the model and the data a deployment trains, named ``MODULE:OBJECT``.

QFLARE carries one flat float32 vector per update; what that vector means is the task's. A
task is any importable object with

- ``build_model() -> torch.nn.Module``: the model, with deterministic initial weights;
- ``load_data(device_index, num_devices) -> (x, y)``: that device's local training set (a
  real device reads its own files; the simulator passes an index);
- ``load_test() -> (x, y) | None``: held-out data the enclave evaluates on;
- optionally ``train(model, x, y, config)`` (trains ``model`` in place; ``config`` is a
  :class:`TrainConfig`) and ``evaluate(model, x, y) -> dict[str, float]``. Without them
  QFLARE's own SGD loop with cross-entropy runs and reports accuracy and loss.

Optional hooks: ``num_classes`` (an int, for the simulated label-flip attack), and a
keyword ``partition`` (a :class:`common.data.Partition`) on ``load_data`` for tasks that split
a bundled data set and honour ``fl.partition``.

This module does not import torch: the coordinator and the CLI name tasks without training.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: The task a fresh installation federates: the 64-64-10 digits MLP.
DEFAULT_TASK = "tasks.digits:task"
#: ``module.path:object``: Python identifiers, dots only in the module part.
SPEC_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
REQUIRED = ("build_model", "load_data", "load_test")
OPTIONAL = ("train", "evaluate")


class TaskError(ValueError):
    """A task that cannot be used; the message is one line saying what is wrong."""


@dataclass(frozen=True)
class TrainConfig:
    """What a round asks of local training (the round's announced hyper-parameters)."""

    epochs: int = 2
    lr: float = 0.1
    batch_size: int = 16
    #: Differs per device and round, so shuffles are reproducible but not identical.
    seed: int = 0


class Task(Protocol):
    """The three methods every task provides (``train`` and ``evaluate`` are optional)."""

    def build_model(self) -> nn.Module: ...

    def load_data(self, device_index: int, num_devices: int) -> tuple[np.ndarray, np.ndarray]: ...

    def load_test(self) -> tuple[np.ndarray, np.ndarray] | None: ...


def parse_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:obj"`` → ``("pkg.mod", "obj")``, or :class:`TaskError`."""
    if not isinstance(spec, str) or not re.fullmatch(SPEC_PATTERN, spec):
        raise TaskError(f"task {spec!r} is not MODULE:OBJECT (e.g. {DEFAULT_TASK})")
    module, _, obj = spec.partition(":")
    return module, obj


@functools.lru_cache(maxsize=32)
def load_task(spec: str) -> Any:
    """Import the task ``spec`` names and check it has the required methods.

    A class is instantiated with no arguments, so ``MODULE:ClassName`` works as well as
    ``MODULE:instance``. Cached: every part of one process shares the task object.
    """
    module_name, attr = parse_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise TaskError(f"task {spec}: no module named {exc.name!r} (is it on PYTHONPATH?)") from None
        raise TaskError(f"task {spec}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user code: any failure becomes one line
        raise TaskError(f"task {spec}: importing {module_name} raised {one_line(exc)}") from None
    if not hasattr(module, attr):
        raise TaskError(f"task {spec}: module {module_name} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise TaskError(f"task {spec}: {attr}() raised {one_line(exc)}") from None
    missing = [name for name in REQUIRED if not callable(getattr(obj, name, None))]
    if missing:
        raise TaskError(f"task {spec} lacks {', '.join(missing)} (a task provides "
                        f"{', '.join(REQUIRED)}; optionally {', '.join(OPTIONAL)})")
    for name in OPTIONAL:
        if getattr(obj, name, None) is not None and not callable(getattr(obj, name)):
            raise TaskError(f"task {spec}: {name} is not callable")
    return obj


def accepts_partition(task: Any) -> bool:
    """Whether the task's ``load_data`` takes the optional ``partition`` keyword."""
    try:
        return "partition" in inspect.signature(task.load_data).parameters
    except (TypeError, ValueError):
        return False


def one_line(exc: BaseException) -> str:
    """``"Type: message"``, first line only: how a task's failure is reported."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__
