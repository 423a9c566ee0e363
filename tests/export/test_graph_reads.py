"""Anything quantize() returns also exports: graphs that read a quantized layer's parameters outside its call (a
positional encoding built from a coordinate grid, a tied weight, a layer called twice), and export errors that name
the real cause."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant import export_onnx, export_torchscript, quantize
from lightning_quant.export.onnx import explain_export_failure


class GridPositionalEncoding(nn.Module):
    """timm's Fourier positional encoding (EdgeNeXt/XCiT): a grid from the input's shape, projected by a conv whose
    weight is read only for its device and dtype."""

    def __init__(self, hidden: int = 8, dim: int = 16) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden * 2, dim, 1)
        self.hidden = hidden

    def forward(self, shape: tuple[int, int, int]) -> torch.Tensor:
        device, dtype = self.token_projection.weight.device, self.token_projection.weight.dtype
        ones = torch.ones(shape, device=device)
        y = ones.cumsum(1) / shape[1] * 2 * math.pi
        x = ones.cumsum(2) / shape[2] * 2 * math.pi
        freq = 10000 ** (torch.arange(self.hidden, device=device).float() / self.hidden)
        pos = torch.cat([(y[..., None] / freq).sin(), (x[..., None] / freq).cos()], dim=3).permute(0, 3, 1, 2)
        return self.token_projection(pos.to(dtype))


class GridNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pos = GridPositionalEncoding()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        b, _, h, w = y.shape
        y = y + self.pos((b, h, w))
        return self.head(y.mean((2, 3)))


class SharedLayerNet(nn.Module):
    """One Linear called twice, and its weight also read directly (tied output projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        h = self.proj(F.relu(self.proj(h)))
        return F.linear(h, self.proj.weight)


def _check_exports(model: nn.Module, tmp_path, size: int = 16) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    data = [torch.randn(2, 3, size, size) for _ in range(3)]
    qmodel = quantize(model.eval(), data, progress=False)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = qmodel(x).numpy()
    export_onnx(qmodel, tmp_path / "m.onnx", data[0])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max() + 1e-4
    export_torchscript(qmodel, tmp_path / "m.pt", data[0])
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert np.abs(scripted(x).numpy() - expected).max() <= 0.02 * np.abs(expected).max() + 1e-4


def test_positional_encoding_from_a_grid_exports(tmp_path):
    """The reported case: ``Node referenced nonexistent target ...token_projection.weight`` at export."""
    _check_exports(GridNet(), tmp_path)


def test_layer_called_twice_and_its_weight_read_directly_exports(tmp_path):
    _check_exports(SharedLayerNet(), tmp_path)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Node referenced nonexistent target blocks.1.pos.weight", r"reads blocks.1.pos.weight, which the deployable"),
        ("Constraints violated (batch)! For more information", r"pass dynamic_batch=False"),
        ("Could not guard on data-dependent expression Eq(u0, 1)", r"control flow on a tensor value"),
        ("aten.foo is not supported", r"an operator torch.export or the ONNX exporter does not support"),
    ],
)
def test_export_failures_are_explained_by_their_cause(message, expected):
    import re

    assert re.search(expected, explain_export_failure(RuntimeError(message)))


def test_an_unknown_export_failure_is_not_blamed_on_control_flow():
    text = explain_export_failure(RuntimeError("something new went wrong"))
    assert "something new went wrong" in text and "control flow" not in text
