"""The default task: a 64 → 64 → 10 ReLU MLP on scikit-learn's 8x8 digits.

Small on purpose: many simulated devices share a 2-core machine, and digits needs no more
to reach ~95 % accuracy (5 devices × 3 rounds: 0.85 → 0.93 → 0.94).
"""

from __future__ import annotations

from torch import nn

from common.model import seeded
from tasks.bundled import BundledTask

N_FEATURES = 64  # 8x8 pixels
N_HIDDEN = 64
N_CLASSES = 10


class Digits(BundledTask):
    dataset = "digits"
    num_classes = N_CLASSES

    def build_model(self) -> nn.Module:
        with seeded(0):
            return nn.Sequential(nn.Linear(N_FEATURES, N_HIDDEN), nn.ReLU(), nn.Linear(N_HIDDEN, N_CLASSES))


task = Digits()
