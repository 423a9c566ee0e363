"""File sizes: int8 ONNX and TorchScript against float exports of the same model (ratio measured and bounded).

A model with ~0.5 M weights keeps the run short while the weights dominate the file, as in real networks;
ResNet50 / MobileNetV2 ratios are checked in test_torchvision_parity.py (slow).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import export_onnx, export_torchscript, quantize
from tests.export.utils import export_float_onnx, export_float_torchscript

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def _wide_net() -> nn.Module:
    torch.manual_seed(7)

    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(
        *block(3, 64), *block(64, 128, 2), *block(128, 128), *block(128, 256, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)))
    return model.eval()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    model = _wide_net()
    g = torch.Generator().manual_seed(8)
    data = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(3)]
    return model, quantize(model, data, progress=False), data[0][:2], tmp_path_factory.mktemp("sizes")


def test_int8_onnx_is_about_a_quarter_of_float(wide, record_property):
    model, qmodel, x, out = wide
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert weights > 500_000
    int8 = export_onnx(qmodel, out / "int8.onnx", x).stat().st_size
    fp32 = export_float_onnx(model, out / "fp32.onnx", x).stat().st_size
    ratio = int8 / fp32
    record_property("onnx_int8_over_fp32", round(ratio, 4))
    print(f"ONNX int8 {int8:,} B / fp32 {fp32:,} B = {ratio:.3f}")
    assert 0.25 <= ratio <= 0.27  # int8 weights + per-channel scales + int32 biases; 0.25 is the floor


def test_int8_torchscript_is_about_a_quarter_of_float(wide, record_property):
    model, qmodel, x, out = wide
    int8 = export_torchscript(qmodel, out / "int8.pt", x).stat().st_size
    fp32 = export_float_torchscript(model, out / "fp32.pt", x).stat().st_size
    ratio = int8 / fp32
    record_property("torchscript_int8_over_fp32", round(ratio, 4))
    print(f"TorchScript int8 {int8:,} B / fp32 {fp32:,} B = {ratio:.3f}")
    assert ratio <= 0.30
