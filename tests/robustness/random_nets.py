"""Small random CNNs for the property-based tests: a plan of blocks drawn by hypothesis, built into an ``nn.Module``.

A plan is plain data (tuples of strings and ints), so hypothesis can shrink it and print it when a property fails.
Blocks: conv (+BN) (+activation), depthwise conv, residual add, two-branch concat, max/avg pooling, and the
constructs that broke exports of models beyond torchvision: a positional encoding computed from a coordinate grid (its
projection's weight read for device and dtype), one conv called twice, a conv whose weight is also read directly. The
head is global average pooling or flatten, then one or two linear layers. Every block keeps the spatial size >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = ("none", "relu", "relu6", "hardswish")


def _activation(name: str) -> nn.Module:
    return {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}[name]()


@dataclass(frozen=True)
class NetPlan:
    """What to build: input shape, blocks, head. ``blocks`` items are ``(kind, width, kernel, stride, act, bn)``."""

    channels: int
    height: int
    width: int
    blocks: tuple[tuple[str, int, int, int, str, bool], ...]
    head: str  # "gap" (global average pool) or "flatten"
    hidden: int  # 0: one linear layer; else a hidden linear layer of this width with ReLU
    classes: int

    def example(self, batch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.channels, self.height, self.width, generator=g) * 1.5 + 0.25


def _conv_unit(c_in: int, c_out: int, kernel: int, stride: int, act: str, bn: bool, groups: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(_activation(act))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``act(conv(bn)(x) + x)``: the add is a quantized residual add."""

    def __init__(self, channels: int, act: str, bn: bool) -> None:
        super().__init__()
        self.body = _conv_unit(channels, channels, 3, 1, "none", bn)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + x)


class Concat(nn.Module):
    """Two conv branches (1x1 and 3x3) joined by ``torch.cat`` on channels."""

    def __init__(self, c_in: int, width: int, act: str, bn: bool) -> None:
        super().__init__()
        self.a = _conv_unit(c_in, width, 1, 1, act, bn)
        self.b = _conv_unit(c_in, width, 3, 1, act, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class GridEncoding(nn.Module):
    """``x + proj(grid)``: a grid built from the input's shape (timm's Fourier positional encodings), projected by a
    1x1 conv whose weight is read for its device and dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        device, dtype = self.proj.weight.device, self.proj.weight.dtype
        ys = torch.linspace(-1.0, 1.0, h, device=device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=device).view(1, 1, 1, w).expand(b, 1, h, w)
        grid = torch.cat([ys, xs, (3 * ys).sin(), (3 * xs).cos()], dim=1)
        return x + self.proj(grid.to(dtype))


class SharedConv(nn.Module):
    """One conv called twice: ``conv(act(conv(x)))``."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.conv(x)))


class TiedConv(nn.Module):
    """A conv whose weight is also read directly: ``conv(x) + 0.5 * F.conv2d(x, conv.weight)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + 0.5 * F.conv2d(x, self.conv.weight, None, padding=1)


class RandomNet(nn.Module):
    def __init__(self, plan: NetPlan) -> None:
        super().__init__()
        channels, h, w = plan.channels, plan.height, plan.width
        layers: list[nn.Module] = []
        for kind, width, kernel, stride, act, bn in plan.blocks:
            if kind == "conv":
                layers.append(_conv_unit(channels, width, kernel, stride, act, bn))
                channels = width
                h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
            elif kind == "depthwise":
                layers.append(_conv_unit(channels, channels, 3, stride, act, bn, groups=channels))
                h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
            elif kind == "residual":
                layers.append(Residual(channels, act, bn))
            elif kind == "concat":
                layers.append(Concat(channels, width, act, bn))
                channels = 2 * width
            elif kind == "grid":
                layers.append(GridEncoding(channels))
            elif kind == "shared":
                layers.append(SharedConv(channels, act))
            elif kind == "tied":
                layers.append(TiedConv(channels))
            elif kind in ("maxpool", "avgpool"):
                if min(h, w) < 2:
                    continue
                layers.append(nn.MaxPool2d(2) if kind == "maxpool" else nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            else:  # pragma: no cover - the strategy draws only the kinds above
                raise ValueError(kind)
        self.features = nn.Sequential(*layers)
        if plan.head == "gap":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            features = channels
        else:
            self.pool = nn.Identity()
            features = channels * h * w
        self.flatten = nn.Flatten()
        if plan.hidden:
            self.head = nn.Sequential(nn.Linear(features, plan.hidden), nn.ReLU(), nn.Linear(plan.hidden, plan.classes))
        else:
            self.head = nn.Linear(features, plan.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


def build(plan: NetPlan, seed: int) -> nn.Module:
    """Seeded weights; BatchNorm running statistics warmed on a few batches; eval mode."""
    torch.manual_seed(seed)
    model = RandomNet(plan)
    model.train()
    with torch.no_grad():
        for i in range(2):
            model(plan.example(8, seed=1000 + i))
    return model.eval()


_block = st.tuples(
    st.sampled_from(
        ("conv", "conv", "depthwise", "residual", "concat", "maxpool", "avgpool", "grid", "shared", "tied")
    ),
    st.integers(2, 8),  # width
    st.sampled_from((1, 3)),  # kernel (conv only)
    st.sampled_from((1, 1, 2)),  # stride (conv / depthwise)
    st.sampled_from(ACTIVATIONS),
    st.booleans(),  # BatchNorm
)

net_plans = st.builds(
    NetPlan,
    channels=st.sampled_from((1, 3, 4)),
    height=st.integers(4, 12),
    width=st.integers(4, 12),
    blocks=st.lists(_block, min_size=1, max_size=4).map(tuple),
    head=st.sampled_from(("gap", "flatten")),
    hidden=st.sampled_from((0, 0, 6)),
    classes=st.integers(2, 6),
)
