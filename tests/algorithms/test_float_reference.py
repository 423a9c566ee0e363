"""The float parameters refinements replace: recorded once, swapped back in for every float reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import quantize
from lightning_quant.algorithms import adaround, correct_bias, fast_finetune
from lightning_quant.algorithms.float_reference import (
    float_bias,
    float_parameters_swapped_in,
    record_float_parameters,
    recorded_float_parameters,
    restore_float_parameters,
)
from lightning_quant.config import scheme_for_target
from lightning_quant.quantizers.modules import quantized_layer_from_float


def _layer_root() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(quantized_layer_from_float(nn.Conv2d(2, 3, 1, bias=False), scheme_for_target("x86"), "0"))


def test_the_first_recorded_value_is_kept():
    root = _layer_root()
    first = root[0].weight.detach().clone()
    record_float_parameters(root, "0", root[0], ("weight", "bias"))
    root[0].weight.data.add_(1.0)
    record_float_parameters(root, "0", root[0], ("weight",))  # a second refinement: the float value stays
    saved = recorded_float_parameters(root)["0"]
    assert torch.equal(saved["weight"], first) and saved["bias"] is None
    assert float_bias(root, "0", root[0]) is None


def test_swap_puts_the_refined_parameters_back_also_after_an_error():
    root = _layer_root()
    record_float_parameters(root, "0", root[0], ("weight", "bias"))
    float_weight = root[0].weight.detach().clone()
    root[0].weight.data.mul_(2.0)
    root[0].bias = nn.Parameter(torch.ones(3))  # bias correction created a bias
    weight, bias = root[0].weight, root[0].bias
    with pytest.raises(RuntimeError, match="boom"), float_parameters_swapped_in(root) as swapped:
        assert swapped == 1
        assert torch.equal(root[0].weight, float_weight) and root[0].bias is None
        raise RuntimeError("boom")
    assert root[0].weight is weight and root[0].bias is bias  # the same Parameter objects (optimizers keep them)
    assert torch.equal(weight, float_weight * 2.0) and torch.equal(bias, torch.ones(3))


def test_restore_writes_the_float_values_into_a_copy():
    root = _layer_root()
    record_float_parameters(root, "0", root[0], ("weight", "bias"))
    float_weight = root[0].weight.detach().clone()
    root[0].weight.data.add_(3.0)
    root[0].bias = nn.Parameter(torch.ones(3))
    copy = _layer_root()
    copy[0].bias = nn.Parameter(torch.zeros(3))
    copy.load_state_dict(root.state_dict())
    restore_float_parameters(copy, root)
    assert torch.equal(copy[0].weight, float_weight) and copy[0].bias is None


def test_nothing_recorded_swaps_nothing():
    root = _layer_root()
    weight = root[0].weight.detach().clone()
    with float_parameters_swapped_in(root) as swapped:
        assert swapped == 0
    assert torch.equal(root[0].weight, weight)


@pytest.fixture(scope="module")
def refined():
    """A 4-bit model after bias correction, AdaRound and fast finetune, with its float original."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    data = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    qmodel = quantize(model, data, scheme=scheme_for_target("x86", weight_bits=4), progress=False)
    correct_bias(qmodel, data, progress=False)
    adaround(qmodel, data, steps=30, progress=False)
    fast_finetune(qmodel, data, steps=30, progress=False)
    return model, qmodel, data


def test_every_refinement_records_what_it_changed(refined):
    model, qmodel, _ = refined
    record = recorded_float_parameters(qmodel)
    assert set(record) == {"0", "2", "4"}
    for name, saved in record.items():  # the recorded values are the float model's own
        assert torch.allclose(saved["weight"], model.get_submodule(name).weight)
        assert torch.allclose(saved["bias"], model.get_submodule(name).bias)
    changed = [n for n in record if not torch.equal(record[n]["weight"], qmodel.get_submodule(n).weight)]
    assert changed  # the refinements did move float weights, which is why the record exists


def test_swapped_in_model_with_fake_quant_off_is_the_float_model(refined):
    from lightning_quant.quantizers.prepare import set_fake_quant

    model, qmodel, data = refined
    set_fake_quant(qmodel, False)
    try:
        with torch.no_grad(), float_parameters_swapped_in(qmodel):
            swapped = qmodel(data[0])
        with torch.no_grad():
            refined_float = qmodel(data[0])
    finally:
        set_fake_quant(qmodel, True)
    expected = model(data[0])
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(refined_float, expected, rtol=1e-3, atol=1e-3)
