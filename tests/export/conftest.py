"""Shared fixtures: the tiny Conv-BN model quantized for each ONNX target and exported once per test session."""

from __future__ import annotations

from types import SimpleNamespace

import onnx
import pytest
import torch

from lightning_quant import export_onnx, export_torchscript, quantize
from tests.helpers.models import TinyConvBN, warm_bn


def _batches(seed: int, n: int = 4, batch: int = 16, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) * 2 + 0.5 for _ in range(n)]


@pytest.fixture(scope="package")
def tiny_float() -> torch.nn.Module:
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


@pytest.fixture(scope="package")
def calib_batches() -> list[torch.Tensor]:
    return _batches(seed=1)


@pytest.fixture(scope="package")
def eval_batches() -> list[torch.Tensor]:
    """Held-out inputs (not seen by calibration) for parity checks: 64 images."""
    return _batches(seed=2)


@pytest.fixture(scope="package")
def tiny_exports(tiny_float, calib_batches, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """``{"x86": ..., "tensorrt": ...}``: qmodel, ONNX path (verified on export) and its loaded proto."""
    out = tmp_path_factory.mktemp("tiny_exports")
    exports = {}
    for target in ("x86", "tensorrt"):
        qmodel = quantize(tiny_float, calib_batches, target=target, progress=False)
        path = export_onnx(qmodel, out / f"tiny_{target}.onnx", calib_batches[0][:2])
        exports[target] = SimpleNamespace(qmodel=qmodel, path=path, proto=onnx.load(str(path)), dir=out)
    return exports


@pytest.fixture(scope="package")
def tiny_torchscript(tiny_exports, calib_batches) -> SimpleNamespace:
    x86 = tiny_exports["x86"]
    path = export_torchscript(x86.qmodel, x86.dir / "tiny_x86.pt", calib_batches[0][:2])
    return SimpleNamespace(qmodel=x86.qmodel, path=path, dir=x86.dir)
