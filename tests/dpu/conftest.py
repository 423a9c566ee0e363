"""Shared fixtures for the DPU tests: small calibrated models and their exported XModels."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import mobilenet_v2

from lightning_quant import export_xmodel, quantize
from lightning_quant.models.cifar_resnet import cifar_resnet
from tests.dpu.models import DepthwiseNet, reference_lenet
from tests.helpers.models import TinyConvBN, warm_bn


def _batches(shape: tuple[int, ...], seed: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, *shape, generator=g) * 2 - 1 for _ in range(n)]


def _quantized(name: str):
    if name == "tiny":
        model, shape = warm_bn(TinyConvBN()), (3, 16, 16)
    elif name == "depthwise":
        model, shape = DepthwiseNet().eval(), (3, 28, 28)  # 7x7 global pool: the DPU multiply is exercised
    elif name == "resnet20":
        torch.manual_seed(0)
        model, shape = warm_bn(cifar_resnet(20), size=32), (3, 32, 32)  # option-A shortcuts: slice + pad + add
    elif name == "mobilenet_v2":
        torch.manual_seed(0)  # ReLU6, depthwise, residual adds; 96 px ends in a 3x3 global pool (a multiply)
        model, shape = warm_bn(mobilenet_v2(num_classes=10), size=96), (3, 96, 96)
    else:
        model, shape = reference_lenet(), (3, 32, 32)
    return quantize(model, _batches(shape, seed=1), target="dpu", progress=False), shape


@pytest.fixture(scope="session", params=["tiny", "depthwise", "lenet", "resnet20", "mobilenet_v2"])
def exported(request, tmp_path_factory):
    """(name, qmodel, input shape, xmodel path) for each test model."""
    qmodel, shape = _quantized(request.param)
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.xmodel"
    export_xmodel(qmodel, path, torch.zeros(1, *shape))
    return request.param, qmodel, shape, path


@pytest.fixture(scope="session")
def lenet_export(tmp_path_factory):
    qmodel, shape = _quantized("lenet")
    path = tmp_path_factory.mktemp("lenet_ref") / "LeNet.xmodel"
    export_xmodel(qmodel, path, torch.zeros(1, *shape))
    return qmodel, path
