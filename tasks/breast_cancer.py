"""A tabular task: an MLP on scikit-learn's Wisconsin breast cancer set (30 features, 2 classes).

Features are standardised with the training split's statistics (``common.data``); a device
bringing its own file gives features on that scale.
"""

from __future__ import annotations

from torch import nn

from common.model import seeded
from tasks.bundled import BundledTask

N_FEATURES = 30
N_HIDDEN = 32


class BreastCancer(BundledTask):
    dataset = "breast_cancer"
    num_classes = 2

    def build_model(self) -> nn.Module:
        with seeded(0):
            return nn.Sequential(nn.Linear(N_FEATURES, N_HIDDEN), nn.ReLU(), nn.Linear(N_HIDDEN, 2))


task = BreastCancer()
