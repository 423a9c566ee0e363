"""Quantized drop-in layers: same parameters as the float layer, weight fake-quant, optional input fake-quant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.config import scheme_for_target
from lightning_quant.quantizers.functional import fake_quantize
from lightning_quant.quantizers.modules import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantLinear,
    quantized_layer_from_float,
)

SCHEME = scheme_for_target("x86")

LAYERS = [
    (lambda: nn.Conv1d(3, 6, 3, padding=1), QuantConv1d, (2, 3, 10)),
    (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, bias=False), QuantConv2d, (2, 3, 9, 9)),
    (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, padding_mode="reflect"), QuantConv2d, (2, 4, 7, 7)),
    (lambda: nn.Conv3d(2, 4, 3), QuantConv3d, (1, 2, 5, 5, 5)),
    (lambda: nn.Linear(7, 5), QuantLinear, (3, 7)),
]
IDS = ["conv1d", "conv2d_dilated_nobias", "conv2d_depthwise_reflect", "conv3d", "linear"]


def _float_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


@pytest.mark.parametrize("make, cls, shape", LAYERS, ids=IDS)
def test_quantized_twin_keeps_parameters_and_hyperparameters(make, cls, shape):
    torch.manual_seed(0)
    layer = make()
    q = quantized_layer_from_float(layer, SCHEME, name="layer")
    assert type(q) is cls
    float_state = layer.state_dict()
    q_state = q.state_dict()
    assert set(float_state) <= set(q_state)
    assert {k for k in q_state if k not in float_state} == {
        f"weight_fake_quant.{k}" for k in q.weight_fake_quant.state_dict()
    }
    for k, v in float_state.items():
        assert torch.equal(q_state[k], v)
    assert q.weight.data_ptr() != layer.weight.data_ptr()  # a copy, the float layer is not shared
    assert q.input_fake_quant is None
    if not isinstance(layer, nn.Linear):
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode"):
            assert getattr(q, attr) == getattr(layer, attr)
    assert q.weight_fake_quant.name == "layer.weight"
    assert q.weight_fake_quant.scale.shape == (layer.weight.shape[0],)  # x86 weights are per output channel


@pytest.mark.parametrize("make, cls, shape", LAYERS, ids=IDS)
def test_quantized_twin_output(make, cls, shape):
    torch.manual_seed(1)
    layer = make()
    q = quantized_layer_from_float(layer, SCHEME, name="layer")
    x = torch.randn(*shape)
    y = q(x)  # the weight quantizer observes the weight, then fake-quantizes it
    assert q.weight_fake_quant.calibrated.item() == 1
    fq = q.weight_fake_quant
    w_q = fake_quantize(layer.weight, fq.scale, fq.zero_point, SCHEME.weight)
    torch.testing.assert_close(y, _float_forward(layer, x, w_q), rtol=0, atol=1e-6)
    # per-channel weights: at most half a step of error per weight, and each channel hits the end of the range
    err = (w_q - layer.weight).abs().flatten(1).amax(1)
    assert torch.all(err <= fq.scale / 2 + 1e-7)
    codes = (w_q / fq.scale.reshape([-1] + [1] * (w_q.dim() - 1))).round().abs().flatten(1).amax(1)
    assert codes.tolist() == [float(SCHEME.weight.quant_range()[1])] * layer.weight.shape[0]
    # weight fake-quant off: exactly the float layer
    fq.disable_fake_quant()
    torch.testing.assert_close(q(x), layer(x), rtol=0, atol=0)


def test_quantize_input_adds_input_quantizer():
    layer = nn.Conv2d(3, 4, 3)
    q = quantized_layer_from_float(layer, SCHEME, name="block.conv", quantize_input=True)
    assert q.input_fake_quant is not None and q.input_fake_quant.name == "block.conv.input"
    assert not q.input_fake_quant.spec.signed  # x86 activations are uint8
    x = torch.rand(2, 3, 6, 6)
    q(x)
    assert q.input_fake_quant.calibrated.item() == 1
    q.weight_fake_quant.disable_fake_quant()
    q.input_fake_quant.disable_observer()
    fq = q.input_fake_quant
    x_q = fake_quantize(x, fq.scale, fq.zero_point, fq.spec)
    assert not torch.equal(x_q, x)
    torch.testing.assert_close(q(x), layer(x_q), rtol=0, atol=1e-6)


def test_quantized_layer_gradients_flow_to_weight_and_input():
    q = quantized_layer_from_float(nn.Linear(4, 3), SCHEME, name="fc", quantize_input=True)
    x = torch.randn(5, 4, requires_grad=True)
    q(x).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert q.bias.grad is not None and x.grad is not None and x.grad.abs().sum() > 0
