"""Spatial windows for layer-wise tuning: blocks are exact slices of the layer's output; tuning with them still
lowers the error, deterministically."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_quant import quantize
from lightning_quant.algorithms import adaround, fast_finetune
from lightning_quant.algorithms.windows import HeldSamples
from lightning_quant.config import scheme_for_target
from lightning_quant.quantizers.modules import quantized_layer_from_float


def _layer(conv: nn.Conv2d, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    layer = quantized_layer_from_float(conv, scheme_for_target("x86", weight_bits=4), "conv")
    layer(x)  # calibrates its quantizers
    for fq in (layer.weight_fake_quant, getattr(layer, "input_fake_quant", None)):
        if fq is not None:
            fq.disable_observer()
    return layer


def _qweight(layer: nn.Module) -> torch.Tensor:
    return layer.weight_fake_quant(layer.weight)


CONVS = {
    "3x3 pad 1": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "stride 2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "dilation 2": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "rect kernel": lambda: nn.Conv2d(4, 6, (1, 5), padding=(0, 2)),
    "no pad 7x7 stride 2": lambda: nn.Conv2d(4, 6, 7, stride=2),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_whole_maps_and_blocks_reproduce_the_layer_output(name):
    torch.manual_seed(1)
    x = torch.randn(5, 4, 23, 21)
    layer = _layer(CONVS[name](), x)
    with torch.no_grad():
        y = layer(x)
        held = HeldSamples.of(layer, x, y, window=4)
        assert held.window == 4
        whole = held.forward(layer, held.x, _qweight(layer), layer._quant_bias())
        torch.testing.assert_close(whole, y, atol=1e-5, rtol=1e-5)
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):
            idx = torch.tensor([4, 1])
            xw, yw = held.draw(idx, generator)
            assert yw.shape[-2:] == (4, 4)
            block = held.forward(layer, xw, _qweight(layer), layer._quant_bias())
            torch.testing.assert_close(block, yw, atol=1e-5, rtol=1e-5)
            # the target block is a slice of the rows' own outputs
            assert any(
                torch.equal(yw, y[idx, :, i : i + 4, j : j + 4])
                for i in range(y.shape[-2] - 3)
                for j in range(y.shape[-1] - 3)
            )


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: nn.Conv2d(4, 6, 3, padding="same"), "string padding"),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "non-zero padding"),
        (lambda: nn.Conv2d(4, 6, 3, padding=1), "maps no larger than the window"),
    ],
)
def test_whole_maps_where_windows_do_not_apply(make, why):
    x = torch.randn(3, 4, 8, 8)
    layer = _layer(make(), x)
    with torch.no_grad():
        y = layer(x)
    held = HeldSamples.of(layer, x, y, window=8)
    assert held.window is None, why
    assert held.x is x
    xw, yw = held.draw(torch.tensor([0, 2]), torch.Generator())
    assert torch.equal(xw, x[[0, 2]]) and torch.equal(yw, y[[0, 2]])


def test_linear_and_none_fall_back_to_whole_rows():
    linear = quantized_layer_from_float(nn.Linear(4, 3), scheme_for_target("x86"), "fc")
    x = torch.randn(6, 4)
    assert HeldSamples.of(linear, x, linear(x).detach(), window=2).window is None
    conv = _layer(nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 30, 30))
    assert HeldSamples.of(conv, torch.randn(2, 4, 30, 30), torch.randn(2, 6, 30, 30), window=None).window is None


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 24, 24, generator=g) for _ in range(2)]


@pytest.mark.parametrize("tune", ["adaround", "fast_finetune"])
def test_windowed_tuning_lowers_error_and_is_deterministic(tune):
    data = _data()
    base = quantize(_model(), data, scheme=scheme_for_target("tensorrt", weight_bits=4), progress=False)

    def run(m):
        if tune == "adaround":
            return adaround(m, data, steps=150, window=6, progress=False, seed=2)
        return fast_finetune(m, data, steps=40, lr=1e-3, window=6, progress=False, seed=2)

    a, b = copy.deepcopy(base), copy.deepcopy(base)
    report = run(a)
    run(b)
    assert [t.name for t in report.layers] == ["0", "2", "6"]
    assert all(t.mse_after <= t.mse_before for t in report.layers)
    assert any(t.kept and t.mse_after < 0.97 * t.mse_before for t in report.layers), report.layers
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), base.parameters(), strict=True))


@pytest.mark.parametrize("window", [0, -2, 1.5, True])
def test_bad_window_is_refused(window):
    data = _data()
    qmodel = quantize(_model(), data, scheme=scheme_for_target("tensorrt", weight_bits=4), progress=False)
    with pytest.raises(ValueError, match=f"window={window!r} must be an integer >= 1"):
        adaround(qmodel, data, window=window, progress=False)
    with pytest.raises(ValueError, match=f"window={window!r} must be an integer >= 1"):
        fast_finetune(qmodel, data, window=window, progress=False)


def test_probe_holds_every_row_once_on_fixed_blocks():
    layer = _layer(nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 30, 30))
    x = torch.randn(10, 4, 30, 30)
    held = HeldSamples.of(layer, x, layer(x).detach(), window=8)
    probe = held.probe(4, torch.Generator().manual_seed(0))
    assert [tuple(xb.shape[:1]) + tuple(yb.shape[1:]) for xb, yb in probe] == [(4, 6, 8, 8), (4, 6, 8, 8), (2, 6, 8, 8)]
    weight = _qweight(layer)
    direct = sum((held.forward(layer, xb, weight, layer.bias) - yb).double().pow(2).sum().item() for xb, yb in probe)
    assert held.probe_mse(layer, weight, layer.bias, probe) == pytest.approx(direct / (10 * 6 * 8 * 8))
    whole = HeldSamples.of(layer, x, layer(x).detach(), window=None)
    with pytest.raises(ValueError, match="whole maps"):
        whole.probe(4, torch.Generator())


def test_windowed_fast_finetune_reports_the_whole_map_error_it_keeps():
    data = _data()
    base = quantize(_model(), data, scheme=scheme_for_target("tensorrt", weight_bits=4), progress=False)
    tuned = copy.deepcopy(base)
    report = fast_finetune(tuned, data, steps=40, lr=1e-3, window=6, progress=False, seed=2)
    # a second pass measures the first layer's whole-map error (same inputs, same float targets) before its step;
    # later layers' float targets would come from the tuned first layer
    first = fast_finetune(copy.deepcopy(tuned), data, steps=1, lr=1e-12, progress=False).layers[0]
    assert first.name == "0" and first.mse_before == pytest.approx(report.layers[0].mse_after, rel=1e-6)
    base_modules, tuned_modules = dict(base.named_modules()), dict(tuned.named_modules())
    for tuning in report.layers:
        if not tuning.kept:
            assert tuning.mse_after == tuning.mse_before
            assert torch.equal(tuned_modules[tuning.name].weight, base_modules[tuning.name].weight)
    assert any(t.kept and t.mse_after < t.mse_before for t in report.layers)
