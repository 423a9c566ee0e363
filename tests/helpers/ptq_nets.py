"""Shared fixtures for the layer-wise PTQ algorithm tests: tiny nets, seeded data, 4-bit quantization, SQNR."""

from __future__ import annotations

import torch
from torch import nn

from lightning_quant import quantize
from lightning_quant.config import QuantOptions, scheme_for_target
from lightning_quant.quantizers.functional import sqnr_db
from tests.helpers.models import TinyConvBN, warm_bn


def mobilenet_like() -> nn.Module:
    """Stem conv, two depthwise-separable blocks (ReLU6), pooling and a linear head; BN statistics warmed."""
    torch.manual_seed(0)

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6(),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6(),
        ]  # fmt: skip

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        *block(8, 16, 1), *block(16, 16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    return warm_bn(model)


def tiny_convbn() -> nn.Module:
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


def calib_data(batches: int = 4, batch: int = 16, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) * 2 + 0.5 for _ in range(batches)]


def quantize4(model: nn.Module, data: list[torch.Tensor], **kwargs) -> nn.Module:
    """4-bit per-channel weights, so weight rounding error dominates and the algorithms' effect is clear; no
    refinement unless ``options=`` names one (the default call would correct biases)."""
    kwargs.setdefault("options", QuantOptions(bias_correction=False))
    return quantize(model, data, scheme=scheme_for_target("x86", weight_bits=4), progress=False, **kwargs)


@torch.no_grad()
def model_sqnr(model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> float:
    return sqnr_db(model(x), qmodel(x))
