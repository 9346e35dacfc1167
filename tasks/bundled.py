"""What the shipped tasks share: a scikit-learn bundled data set, split across simulated devices."""

from __future__ import annotations

import numpy as np

from common.data import Partition, bundled_shard, load_bundled_split


class BundledTask:
    """A task on one of ``common.data.BUNDLED``; subclasses say which and build the model.

    ``load_data`` gives device i of n its shard of the training split (honouring
    ``fl.partition``); ``load_test`` the held-out 20 %.
    """

    dataset: str = "digits"
    num_classes: int = 10

    def load_data(self, device_index: int, num_devices: int, *,
                  partition: Partition | None = None) -> tuple[np.ndarray, np.ndarray]:
        return bundled_shard(self.dataset, device_index, num_devices, partition or Partition())

    def load_test(self) -> tuple[np.ndarray, np.ndarray]:
        _, _, x_test, y_test = load_bundled_split(self.dataset)
        return x_test, y_test
