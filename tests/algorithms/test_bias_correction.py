"""Empirical bias correction: per-channel mean error ~0 vs a reference computation, created biases, DPU, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant import quantize
from lightning_quant.algorithms import correct_bias
from lightning_quant.algorithms.bias_correction import weight_error_sum
from lightning_quant.algorithms.layerwise import capture_layer, execution_order, weight_layers
from lightning_quant.config import QuantMode, QuantOptions, scheme_for_target
from lightning_quant.errors import NotCalibratedError
from lightning_quant.quantizers import prepare
from lightning_quant.quantizers.dpu_shifts import check_dpu_shifts
from lightning_quant.quantizers.modules import QuantLinear
from tests.helpers.ptq_nets import calib_data, mobilenet_like, model_sqnr, quantize4, tiny_convbn

NETS = {"tiny_convbn": tiny_convbn, "mobilenet_like": mobilenet_like}


@torch.no_grad()
def _mean_error(qmodel: nn.Module, data: list[torch.Tensor], float_model: nn.Module) -> dict[str, torch.Tensor]:
    """Reference: per layer and output channel, the mean of (fake-quant output - float layer output on the same input).

    The float layer is ``float_model``'s (the quantized model before correction: same weights, float biases).
    """
    sums: dict[str, list] = {}

    def hook(name: str, layer: nn.Module):
        float_layer = copy.deepcopy(float_model.get_submodule(name))
        float_layer.weight_fake_quant.disable_fake_quant()
        if float_layer.bias_fake_quant is not None:
            float_layer.bias_fake_quant.disable_fake_quant()

        def fn(_m, args, out):
            diff = out - float_layer(args[0])
            diff = diff.movedim(-1 if isinstance(layer, QuantLinear) else 1, 0).reshape(out.shape[1], -1)
            sums.setdefault(name, []).append(diff)

        return fn

    layers = {n: m for n, m in qmodel.named_modules() if hasattr(m, "weight_fake_quant")}
    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    for x in data:
        qmodel(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(d, 1).double().mean(1) for n, d in sums.items()}


@pytest.mark.parametrize("batches, left", [(1, 1e-3), (4, 2e-2)])
@pytest.mark.parametrize("net", sorted(NETS))
def test_mean_channel_error_vanishes_and_sqnr_rises(net, batches, left):
    """One batch: the streamed correction is the sequential one, so every layer's mean error is gone. Four batches
    stream: the first ones saw earlier layers corrected on fewer images, which leaves a small fraction."""
    model, data, test = NETS[net](), calib_data()[:batches], torch.cat(calib_data(2, seed=9))
    plain = quantize4(model, data)
    corrected = copy.deepcopy(plain)
    before = _mean_error(plain, data, plain)
    report = correct_bias(corrected, data, progress=False)
    after = _mean_error(corrected, data, plain)
    assert report.layers == list(before) and report.batches == batches and not report.skipped
    for name in report.layers:
        scale = before[name].abs().max().item()
        assert scale > 1e-3  # 4-bit weights: a visible mean shift to remove
        assert after[name].abs().max().item() < left * scale + 1e-6, name
    first = report.layers[0]  # its input does not depend on other corrections: the correction is the mean error
    assert report.corrections[first] == pytest.approx(before[first].norm().item(), rel=1e-4)
    expected = plain.get_submodule(first).bias - before[first].float()
    assert torch.allclose(corrected.get_submodule(first).bias, expected, atol=1e-6)
    assert model_sqnr(model, corrected, test) > model_sqnr(model, plain, test) + 1.0


def test_creates_missing_bias_and_fast_variant():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4, bias=False)
    )
    data = calib_data(2)
    qmodel = quantize4(model.eval(), data)
    plain = copy.deepcopy(qmodel)
    report = correct_bias(qmodel, data, num_batches=1, progress=False)
    assert report.created_bias == ["0", "3"] and report.batches == 1
    assert all(qmodel.get_submodule(n).bias is not None for n in ("0", "3"))
    after = _mean_error(qmodel, data[:1], plain)
    assert max(v.abs().max().item() for v in after.values()) < 1e-5


def test_dpu_bias_quantizers_follow_and_shifts_hold():
    model, data = tiny_convbn(), calib_data()
    both = QuantOptions(bias_correction=True, fast_finetune=True)
    qmodel = quantize(model, data, target="dpu", options=both, progress=False)
    assert check_dpu_shifts(qmodel) == []
    torch.manual_seed(0)
    no_bias = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False)).eval()
    qmodel = quantize(no_bias, data, target="dpu", progress=False)
    report = correct_bias(qmodel, data, progress=False)
    layer = qmodel.get_submodule("0")
    assert report.created_bias == ["0", "2"] and layer.bias_fake_quant is not None
    assert bool(layer.bias_fake_quant.calibrated) and not bool(layer.bias_fake_quant.observer_enabled)


@pytest.mark.parametrize("num_batches", [0, -1, 2.0, True])
def test_bad_num_batches(num_batches):
    data = calib_data(1)
    qmodel = quantize4(tiny_convbn(), data)
    with pytest.raises(ValueError, match=rf"num_batches={num_batches!r} must be an integer >= 1"):
        correct_bias(qmodel, data, num_batches=num_batches, progress=False)


def test_data_and_model_errors():
    model, data = tiny_convbn(), calib_data(1)
    qmodel = quantize4(model, data)
    with pytest.raises(ValueError, match=r"calibration data is empty.*non-empty DataLoader"):
        correct_bias(qmodel, [], progress=False)
    with pytest.raises(ValueError, match=r"batch 0 could not be fed to the model.*transform_fn"):
        correct_bias(qmodel, [torch.randn(2, 5, 16, 16)], progress=False)
    with pytest.raises(NotCalibratedError, match=r"has not been calibrated.*calibrate\(model, data\)"):
        correct_bias(prepare(model, scheme_for_target("x86")), data, progress=False)
    with pytest.raises(ValueError, match=r"needs a model prepared by lightning_quant.*quantize\(model, data\)"):
        correct_bias(model, data, progress=False)
    qat = prepare(model, scheme_for_target("x86", QuantMode.QAT), mode="qat")
    with pytest.raises(ValueError, match=r"works on PTQ models.*QuantConvBn.*convert\(model\) first"):
        correct_bias(qat, data, progress=False)


def _biases(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("bias")}


@torch.no_grad()
def _sequential_reference(qmodel: nn.Module, batch: torch.Tensor) -> None:
    """The textbook algorithm, layer after layer on the whole batch: capture the layer's input in the model whose
    earlier layers are already corrected, take the mean of ``(W_q - W) x_q`` per output channel, set the bias to the
    float bias minus it (re-observing a DPU bias quantizer)."""
    layers = weight_layers(qmodel, "reference")
    for name in execution_order(qmodel, layers, batch):
        layer = layers[name]
        x = layer._maybe_quantize_input(capture_layer(qmodel, layer, [batch], max_samples=10**9, what="input"))
        delta = layer.weight_fake_quant(layer.weight) - layer.weight
        y = F.linear(x, delta) if isinstance(layer, QuantLinear) else layer._conv_forward(x, delta, None)
        mean = y.double().movedim(-1 if isinstance(layer, QuantLinear) else 1, 0).reshape(y.shape[1], -1).mean(1)
        layer.bias.copy_((layer.bias.double() - mean).float())
        if layer.bias_fake_quant is not None:
            layer.bias_fake_quant.observer.reset()
            layer.bias_fake_quant.enable_observer(True)
            layer.bias_fake_quant(layer.bias)
            layer.bias_fake_quant.enable_observer(False)


@pytest.mark.parametrize("target", ["x86", "dpu"])
@pytest.mark.parametrize("net", [tiny_convbn, mobilenet_like])
def test_streamed_correction_equals_the_sequential_algorithm(net, target):
    """On one batch the one streamed pass gives the biases of the layer-by-layer algorithm, DPU bias grid included."""
    data = calib_data()[:1]
    scheme = scheme_for_target(target, weight_bits=4) if target == "x86" else scheme_for_target("dpu")
    base = quantize(net().eval(), data, scheme=scheme, progress=False)
    streamed, sequential = copy.deepcopy(base), copy.deepcopy(base)
    report = correct_bias(streamed, data, progress=False)
    _sequential_reference(sequential, data[0])
    assert report.layers and not report.created_bias
    deployed = {n: m._quant_bias() for n, m in weight_layers(streamed, "test").items()}
    reference = {n: m._quant_bias() for n, m in weight_layers(sequential, "test").items()}
    for name in report.layers:
        assert torch.allclose(deployed[name], reference[name], rtol=1e-4, atol=1e-6), name


def test_one_pass_argument_is_deprecated_and_changes_nothing():
    data = calib_data(2)
    base = quantize4(tiny_convbn(), data)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    correct_bias(a, data, progress=False)
    with pytest.warns(DeprecationWarning, match=r"one_pass.*deprecated and ignored"):
        correct_bias(b, data, progress=False, one_pass=False)
    assert all(torch.equal(x, y) for x, y in zip(_biases(a).values(), _biases(b).values(), strict=True))


def test_batches_of_different_sizes_stream():
    data = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 20, 20)]  # different sizes: no torch.cat needed
    qmodel = quantize4(tiny_convbn(), data)
    report = correct_bias(qmodel, data, progress=False)
    assert report.batches == 2 and report.layers


def test_out_of_memory_is_not_called_a_bad_batch(monkeypatch):
    """Only input mismatches become 'could not be fed' errors; an allocation failure stays itself."""
    data = calib_data(1)
    qmodel = quantize4(tiny_convbn(), data)
    layer = weight_layers(qmodel, "test")[report_first(qmodel, data)]

    def fail(*_args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    layer.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        correct_bias(qmodel, data, progress=False)


def report_first(qmodel: nn.Module, data: list[torch.Tensor]) -> str:
    return execution_order(qmodel, weight_layers(qmodel, "test"), data[0])[0]


def test_quantized_biases_are_corrected_from_their_deployed_value_not_rounded_twice():
    """On the DPU target biases sit on an 8-bit grid. With exactly representable weights the only error left is the
    bias rounding, which a new bias cannot beat: the deployed bias must stay put. Subtracting that rounding error
    from the float bias instead (then rounding again) moved biases one step further away (MobileNetV2 DPU: -23
    points)."""
    torch.manual_seed(0)
    fc = nn.Linear(8, 6)
    with torch.no_grad():
        fc.weight.copy_(torch.randint(-100, 100, (6, 8)) / 128.0)  # on the 2**-7 grid, inside the int8 range
        fc.bias.copy_(torch.tensor([0.36, -0.36, 1.11, -2.2, 7.3, 0.6]))  # a 2**-4 grid: errors over a quarter step
    data = [torch.randn(32, 8) for _ in range(4)]
    plain = quantize(nn.Sequential(fc).eval(), data, target="dpu", progress=False)
    corrected = quantize(
        nn.Sequential(fc).eval(), data, target="dpu", options=QuantOptions(bias_correction=True), progress=False
    )
    deployed = [m.get_submodule("0")._quant_bias().detach() for m in (plain, corrected)]
    assert not torch.equal(deployed[0], fc.bias.detach())  # the grid does round these biases
    assert torch.equal(deployed[1], deployed[0])


def test_unbatched_conv_inputs_are_one_sample():
    """A Conv2d also takes (C, H, W): its weight error must not be summed over the channels as if they were a batch,
    and a model that runs its conv sample by sample is corrected (at each pass's first call) without error."""

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.conv(sample) for sample in x])

    data = calib_data(2)
    layer = quantize4(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), data).get_submodule("0")
    sample = data[0][0]
    total, count = weight_error_sum(layer, sample)
    expected_total, expected_count = weight_error_sum(layer, sample[None])
    assert count == expected_count == 14 * 14 and torch.equal(total, expected_total)
    torch.manual_seed(0)
    qmodel = quantize4(Unbatched().eval(), data)
    report = correct_bias(qmodel, data, progress=False)
    assert report.layers == ["conv"] and report.batches == 2
