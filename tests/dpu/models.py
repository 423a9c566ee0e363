"""Models for the DPU tests: the reference LeNet (Vitis AI 3.5 artefacts in shared/reference/vitis_lenet)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.paths import shared_dir


class LeNet(nn.Module):
    """The LeNet of shared/reference/vitis_lenet/README.md (input 1x3x32x32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DepthwiseNet(nn.Module):
    """Depthwise + pointwise convs, a concat, a 2x2 and a global average pool: the ops LeNet lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(16, 8, 1)
        self.avg = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.stem(x))
        z = F.relu(self.dw(y))
        y = F.relu(self.pw(torch.cat([y, z], dim=1)))
        y = self.gap(self.avg(y))
        return self.fc(torch.flatten(y, 1))


def reference_dir() -> Path:
    """shared/reference/vitis_lenet, or skip the test with the reason."""
    shared = shared_dir()
    if shared is None:
        pytest.skip("no shared assets folder (set LIGHTNING_QUANT_SHARED): the Vitis AI LeNet reference is needed")
    ref = shared / "reference" / "vitis_lenet"
    if not (ref / "LeNet_int.xmodel").is_file():
        pytest.skip(f"{ref} lacks LeNet_int.xmodel: the Vitis AI LeNet reference is needed")
    return ref


def reference_lenet() -> LeNet:
    model = LeNet()
    model.load_state_dict(torch.load(reference_dir() / "lenet.pt", map_location="cpu", weights_only=True))
    return model.eval()
