"""AdaRound: learned weight rounding against nearest rounding, on the grid, deterministic, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_quant import quantize
from lightning_quant.algorithms import adaround
from lightning_quant.algorithms.adaround import _LearnedRounding, _soft_offset
from lightning_quant.config import QuantOptions, scheme_for_target
from lightning_quant.errors import NotCalibratedError
from lightning_quant.quantizers import prepare
from lightning_quant.quantizers.prepare import iter_quantizers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).eval()  # fmt: skip


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _w4(model: nn.Module, data) -> nn.Module:
    scheme = scheme_for_target("tensorrt", weight_bits=4)  # nearest rounding, nothing else
    return quantize(model, data, scheme=scheme, options=QuantOptions(bias_correction=False), progress=False)


def _codes(layer: nn.Module) -> torch.Tensor:
    scale = layer.weight_fake_quant.scale.detach().reshape(-1, *[1] * (layer.weight.dim() - 1))
    return layer.weight.detach() / scale


def test_rounding_variables_start_at_nearest_rounding():
    """Reference: h(V) equals the fractional part of w / s at init, so the hard weight is nearest rounding."""
    qmodel = _w4(_model(), _data())
    layer = qmodel.get_submodule("2")
    rounding = _LearnedRounding(layer)
    rest = _codes(layer) - torch.floor(_codes(layer))
    inside = (rest > 0.01) & (rest < 0.99)
    torch.testing.assert_close(_soft_offset(rounding.v)[inside], rest[inside], atol=1e-5, rtol=0)
    away_from_ties = (rest - 0.5).abs() > 1e-3
    nearest = layer.weight_fake_quant(layer.weight).detach()
    assert torch.equal(rounding.weight(hard=True)[away_from_ties], nearest[away_from_ties])


def test_learned_rounding_lowers_layer_error_and_model_error():
    data = _data()
    model = _model()
    nearest = _w4(model, data)
    learned = copy.deepcopy(nearest)
    report = adaround(learned, data, steps=300, progress=False)
    assert [t.name for t in report.layers] == ["0", "2", "5"]
    assert all(t.mse_after <= t.mse_before for t in report.layers)
    assert any(t.kept and t.mse_after < 0.95 * t.mse_before for t in report.layers), report.layers
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(7))  # held-out inputs
    with torch.no_grad():
        ref = model(x)
        err_nearest = (nearest(x) - ref).pow(2).mean()
        err_learned = (learned(x) - ref).pow(2).mean()
    assert err_learned < err_nearest


def test_weights_stay_on_the_grid_within_one_step_of_nearest():
    data = _data()
    qmodel = _w4(_model(), data)
    before = {n: _codes(qmodel.get_submodule(n)).clone() for n in ("0", "2", "5")}
    report = adaround(qmodel, data, steps=200, progress=False)
    for name, original in before.items():
        layer = qmodel.get_submodule(name)
        codes = _codes(layer)
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
        assert codes.round().abs().max() <= 7  # 4-bit narrow range
        assert ((codes.round() - torch.floor(original)).abs() <= 1).all()  # floor or ceil of w / s
        assert torch.equal(layer.weight_fake_quant(layer.weight), layer.weight)  # the exporters see these values
    assert set(report.flipped) == set(report.kept)
    assert all(0 < f < 0.5 for f in report.flipped.values())


def test_same_seed_same_weights_and_scales_untouched():
    data = _data()
    a, b = _w4(_model(), data), _w4(_model(), data)
    scales = {n: fq.scale.clone() for n, fq in iter_quantizers(a)}
    adaround(a, data, steps=50, progress=False, seed=3)
    adaround(b, data, steps=50, progress=False, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert all(torch.equal(fq.scale, scales[n]) for n, fq in iter_quantizers(a))


def test_quantize_flag_runs_adaround():
    data = _data(2)
    plain = _w4(_model(), data)
    w4 = scheme_for_target("tensorrt", weight_bits=4)
    tuned = quantize(_model(), data, scheme=w4, progress=False, options=QuantOptions(adaround=True))
    assert any(not torch.equal(p, t) for p, t in zip(plain.parameters(), tuned.parameters(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
        ({"lr": -1.0}, "lr=-1.0 must be a finite number > 0"),
        ({"reg_weight": -0.1}, "reg_weight=-0.1 must be a number >= 0"),
        ({"warmup": 1.0}, r"warmup=1.0 must be a fraction in \[0, 1\)"),
    ],
)
def test_bad_options(kwargs, match):
    data = _data(1)
    with pytest.raises(ValueError, match=match):
        adaround(_w4(_model(), data), data, progress=False, **kwargs)


def test_uncalibrated_and_qat_models_refused():
    with pytest.raises(NotCalibratedError, match="cannot adaround"):
        adaround(prepare(_model(), scheme_for_target("x86")), _data(1), progress=False)
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="adaround works on PTQ models"):
        adaround(prepare(bn, scheme_for_target("x86", mode="qat"), mode="qat"), _data(1), progress=False)


def _outlier_data() -> list[torch.Tensor]:
    data = _data()
    data[0][:2] *= 100.0  # two images with huge activations, as in ResNet50 on Imagenette
    return data


def test_per_sample_error_is_the_mean_relative_error_of_each_sample():
    """Reference: mean over samples of ||W_q x_i - y_i||^2 / ||y_i||^2 (whole maps), against the pooled MSE."""
    from lightning_quant.algorithms.adaround import _held_error, _row_power
    from lightning_quant.algorithms.windows import HeldSamples

    layer = _w4(_model(), _outlier_data()).get_submodule("2")
    x = torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    x[0] *= 50.0
    y = torch.nn.functional.conv2d(x, layer.weight.detach() * 1.01, layer.bias.detach(), padding=1)
    held = HeldSamples.of(layer, x, y, window=4)
    weight = layer.weight_fake_quant(layer.weight).detach()
    with torch.no_grad():
        out = layer(x)
    per_sample = ((out - y).double().pow(2).flatten(1).sum(1) / y.double().pow(2).flatten(1).sum(1)).mean().item()
    pooled = (out - y).double().pow(2).mean().item()
    assert _held_error(layer, weight, held, 4, _row_power(held)) == pytest.approx(per_sample, rel=1e-6)
    assert _held_error(layer, weight, held, 4, None) == pytest.approx(pooled, rel=1e-6)


def test_per_sample_weighting_serves_the_typical_images_when_a_few_are_huge():
    data = _outlier_data()
    model = _model()
    pooled, per_sample = _w4(model, data), _w4(model, data)
    adaround(pooled, data, steps=300, progress=False)
    report = adaround(per_sample, data, steps=300, per_sample=True, progress=False)
    assert all(t.mse_after <= t.mse_before for t in report.layers) and report.kept
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(7))  # typical held-out images
    with torch.no_grad():
        ref = model(x)

        def typical_error(qmodel):
            return ((qmodel(x) - ref).pow(2).sum(1) / ref.pow(2).sum(1)).mean().item()

        assert typical_error(per_sample) < typical_error(pooled)
    again = _w4(model, data)
    adaround(again, data, steps=300, per_sample=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), per_sample.parameters(), strict=True))


def test_quantize_and_callback_pass_adaround_per_sample_on():
    from lightning_quant.callbacks import QuantCallback

    data = _outlier_data()
    w4 = scheme_for_target("tensorrt", weight_bits=4)
    no_bc = {"bias_correction": False}  # as _w4: AdaRound alone
    pooled = quantize(_model(), data, scheme=w4, progress=False, options=QuantOptions(adaround=True, **no_bc))
    both = QuantOptions(adaround=True, adaround_per_sample=True, **no_bc)
    per_sample = quantize(_model(), data, scheme=w4, progress=False, options=both)
    direct = _w4(_model(), data)
    adaround(direct, data, per_sample=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(per_sample.parameters(), direct.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(per_sample.parameters(), pooled.parameters(), strict=True))
    assert QuantCallback("ptq", options=both).state_dict()["options"]["adaround_per_sample"] is True


def test_adaround_per_sample_without_adaround_is_refused():
    # the options refuse it when built, before quantize() or QuantCallback() sees them
    with pytest.raises(ValueError, match="adaround_per_sample=True .* set adaround=True too"):
        QuantOptions(adaround_per_sample=True)
