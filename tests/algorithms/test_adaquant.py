"""Fast finetuning (AdaQuant): layer error and model SQNR improve, exact reverts, determinism, bounds, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_quant.algorithms import correct_bias, fast_finetune
from lightning_quant.algorithms.layerwise import capture_layer
from lightning_quant.config import QuantMode, QuantOptions, scheme_for_target
from lightning_quant.errors import NotCalibratedError
from lightning_quant.quantizers import prepare, set_fake_quant
from tests.helpers.ptq_nets import calib_data, mobilenet_like, model_sqnr, quantize4, tiny_convbn

NETS = {"tiny_convbn": tiny_convbn, "mobilenet_like": mobilenet_like}


@torch.no_grad()
def _layer_io(model: nn.Module, name: str, data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a layer's input and output over full forward passes (no early stop)."""
    xs, ys = [], []

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        xs.append(args[0])
        ys.append(out)

    handle = model.get_submodule(name).register_forward_hook(hook)
    for x in data:
        model(x)
    handle.remove()
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _mse_with(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias) -> float:
    saved = layer.weight.clone(), None if layer.bias is None else layer.bias.clone()
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    mse = (layer(x) - target).pow(2).mean().item()
    layer.weight.copy_(saved[0])
    if saved[1] is not None:
        layer.bias.copy_(saved[1])
    return mse


@pytest.mark.parametrize("net", sorted(NETS))
def test_kept_layers_get_closer_to_float_and_model_sqnr_rises(net):
    model, data, test = NETS[net](), calib_data(), torch.cat(calib_data(2, seed=9))
    plain = quantize4(model, data)
    tuned = copy.deepcopy(plain)
    report = fast_finetune(tuned, data, progress=False)
    assert [t.name for t in report.layers] and report.kept and not report.skipped
    reference = copy.deepcopy(plain)
    set_fake_quant(reference, False)  # the float model, as prepared (BN folded)
    for t in report.layers:
        x, _ = _layer_io(tuned, t.name, data)
        _, target = _layer_io(reference, t.name, data)
        layer, old = tuned.get_submodule(t.name), plain.get_submodule(t.name)
        now = _mse_with(layer, x, target, layer.weight, layer.bias)
        before = _mse_with(layer, x, target, old.weight, old.bias)
        assert now == pytest.approx(t.mse_after, rel=1e-3) and before == pytest.approx(t.mse_before, rel=1e-3)
        assert (now < before) == t.kept
        assert t.samples == 64
    assert model_sqnr(model, tuned, test) > model_sqnr(model, plain, test) + 1.0


def test_reverted_layers_are_exactly_unchanged():
    model, data = tiny_convbn(), calib_data()
    plain = quantize4(model, data)
    tuned = copy.deepcopy(plain)
    report = fast_finetune(tuned, data, steps=2, lr=10.0, progress=False)  # absurd steps: every layer gets worse
    assert report.reverted == ["conv1", "conv2", "fc"] and report.kept == []
    for t in report.layers:
        assert t.mse_after == t.mse_before
    for key, value in plain.state_dict().items():
        assert torch.equal(value, tuned.state_dict()[key]), key


def test_same_seed_gives_identical_weights():
    model, data = mobilenet_like(), calib_data()
    runs = []
    for _ in range(2):
        qmodel = quantize4(model, data)
        fast_finetune(qmodel, data, steps=10, batch_size=8, seed=3, progress=False)
        runs.append(qmodel.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_sample_cap_and_early_stop():
    model, data = tiny_convbn(), calib_data()
    qmodel = quantize4(model, data)
    calls = {"conv1": 0, "fc": 0}
    hooks = [
        qmodel.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: calls.update({n: calls[n] + 1}))
        for n in calls
    ]
    x = capture_layer(qmodel, qmodel.get_submodule("conv1"), data, max_samples=20, what="input")
    for h in hooks:
        h.remove()
    assert x.shape[0] == 20 and calls == {"conv1": 2, "fc": 0}  # 2 of 4 batches, stopped before the head
    report = fast_finetune(qmodel, data, steps=5, max_samples=5, progress=False)
    assert [t.samples for t in report.layers] == [5, 5, 5]


def test_one_shot_iterable_and_pairs():
    model = tiny_convbn()
    pairs = [(x, torch.zeros(len(x))) for x in calib_data()]
    qmodel = quantize4(model, pairs)
    report = fast_finetune(qmodel, (p for p in pairs), steps=5, progress=False)  # a generator is replayed per layer
    assert len(report.layers) == 3


def test_quantize_options_improve_sqnr_and_leave_input_untouched():
    model, data, test = tiny_convbn(), calib_data(), torch.cat(calib_data(2, seed=9))
    before = copy.deepcopy(model.state_dict())
    plain = quantize4(model, data)
    both = quantize4(model, data, options=QuantOptions(bias_correction=True, fast_finetune=True))
    corrected = quantize4(model, data, options=QuantOptions(bias_correction=True))
    assert model_sqnr(model, both, test) > model_sqnr(model, corrected, test) > model_sqnr(model, plain, test)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_after_correct_bias_the_target_is_still_the_float_model():
    model, data = tiny_convbn(), calib_data()
    qmodel = quantize4(model, data)
    float_bias = qmodel.get_submodule("conv1").bias.detach().clone()
    correct_bias(qmodel, data, progress=False)
    report = fast_finetune(qmodel, data, steps=1, lr=1e-9, progress=False)
    reference = quantize4(model, data)
    set_fake_quant(reference, False)
    x, _ = _layer_io(qmodel, "conv1", data)  # the first layer's (quantized) input does not depend on any tuning
    _, target = _layer_io(reference, "conv1", data)
    layer = qmodel.get_submodule("conv1")
    assert not torch.equal(layer.bias, float_bias)
    assert report.layers[0].mse_before == pytest.approx(_mse_with(layer, x, target, layer.weight, layer.bias), rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, r"steps=0 must be an integer >= 1"),
        ({"steps": 1.5}, r"steps=1.5 must be an integer"),
        ({"steps": True}, r"steps=True must be an integer"),
        ({"lr": 0.0}, r"lr=0.0 must be a finite number > 0"),
        ({"lr": -1e-3}, r"lr=-0.001 must be a finite number > 0"),
        ({"lr": float("nan")}, r"lr=nan must be a finite number"),
        ({"lr": "1e-3"}, r"lr='1e-3' must be a finite number"),
        ({"num_batches": 0}, r"num_batches=0 must be an integer >= 1"),
        ({"batch_size": -2}, r"batch_size=-2 must be an integer >= 1"),
        ({"max_samples": 0}, r"max_samples=0 must be an integer >= 1"),
        ({"seed": 1.0}, r"seed=1.0 must be an integer"),
    ],
)
def test_bad_options(kwargs, match):
    qmodel = quantize4(tiny_convbn(), calib_data(1))
    with pytest.raises(ValueError, match=match):
        fast_finetune(qmodel, calib_data(1), progress=False, **kwargs)


def test_data_and_model_errors():
    model, data = tiny_convbn(), calib_data(1)
    qmodel = quantize4(model, data)
    with pytest.raises(ValueError, match=r"calibration data is empty.*non-empty DataLoader"):
        fast_finetune(qmodel, [], progress=False)
    with pytest.raises(ValueError, match=r"batch 0 could not be fed to the model.*transform_fn"):
        fast_finetune(qmodel, [torch.randn(2, 5, 16, 16)], progress=False)
    with pytest.raises(NotCalibratedError, match=r"has not been calibrated.*calibrate\(model, data\)"):
        fast_finetune(prepare(model, scheme_for_target("x86")), data, progress=False)
    with pytest.raises(ValueError, match=r"needs a model prepared by lightning_quant.*quantize\(model, data\)"):
        fast_finetune(model, data, progress=False)
    qat = prepare(model, scheme_for_target("x86", QuantMode.QAT), mode="qat")
    with pytest.raises(ValueError, match=r"works on PTQ models.*QuantConvBn.*convert\(model\) first"):
        fast_finetune(qat, data, progress=False)
