"""Shared fixtures for the DPU tests: small calibrated models and their exported XModels."""

from __future__ import annotations

import pytest
import torch

from lightning_quant import export_xmodel, quantize
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
    else:
        model, shape = reference_lenet(), (3, 32, 32)
    return quantize(model, _batches(shape, seed=1), target="dpu", progress=False), shape


@pytest.fixture(scope="session", params=["tiny", "depthwise", "lenet"])
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
