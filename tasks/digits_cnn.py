"""A small CNN on the 8x8 digits: two 3x3 convolutions and a linear head (about 6 k weights).

Takes the same flat 64-pixel rows as the MLP (a device's ``.npz`` or ``.csv`` need not know
the image shape) and reshapes them to 1x8x8 images itself.
"""

from __future__ import annotations

import torch
from torch import nn

from common.model import seeded
from tasks.bundled import BundledTask


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 4 x 4
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        )
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


class DigitsCNN(BundledTask):
    dataset = "digits"
    num_classes = 10

    def build_model(self) -> nn.Module:
        with seeded(0):
            return _CNN()


task = DigitsCNN()
