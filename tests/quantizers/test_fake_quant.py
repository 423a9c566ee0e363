"""FakeQuantize: switches, calibration flag, checkpoint round trip, learnable (LSQ) scales."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_quant.config import QuantSpec
from lightning_quant.quantizers import FakeQuantize
from lightning_quant.quantizers.functional import fake_quantize, qparams_from_range

ASYM = QuantSpec(symmetric=False, signed=False)
PER_CHANNEL = QuantSpec(granularity="per_channel", ch_axis=0, narrow_range=True)


def _x(seed: int = 0, shape=(4, 3, 5, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def test_uncalibrated_is_identity_and_first_batch_calibrates():
    fq = FakeQuantize(ASYM, name="a")
    assert fq.calibrated.item() == 0
    fq.disable_observer()
    x = _x()
    assert torch.equal(fq(x), x)  # never saw data: pass-through
    assert fq.calibrated.item() == 0
    fq.enable_observer()
    y = fq(x)  # observes, then quantizes with the new range
    assert fq.calibrated.item() == 1
    scale, zp = qparams_from_range(x.min(), x.max(), ASYM)
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp)
    assert torch.equal(y, fake_quantize(x, scale, zp, ASYM))
    assert not torch.equal(y, x)


def test_empty_batch_does_not_calibrate():
    fq = FakeQuantize(ASYM)
    fq(torch.empty(0, 4))
    assert fq.calibrated.item() == 0


def test_disabled_fake_quant_is_identity():
    fq = FakeQuantize(PER_CHANNEL, num_channels=4, name="w")
    x = _x()
    fq(x)
    fq.disable_observer()
    fq.disable_fake_quant()
    assert torch.equal(fq(x), x)
    fq.enable_fake_quant()
    assert not torch.equal(fq(x), x)


def test_disabled_observer_freezes_range():
    fq = FakeQuantize(ASYM)
    fq(_x())
    fq.disable_observer()
    scale = fq.scale.clone()
    wide = _x(1) * 100
    out = fq(wide)
    assert torch.equal(fq.scale, scale)
    assert out.max().item() <= fq.observer.max_val.item() + scale.item()  # clipped to the frozen range
    fq.enable_observer()
    fq(wide)
    assert fq.scale.item() > scale.item()


@pytest.mark.parametrize(
    "spec, channels",
    [
        (ASYM, None),
        (PER_CHANNEL, 4),
        (QuantSpec(observer="moving_average", averaging_constant=0.3), None),
        (QuantSpec(learnable=True), None),
    ],
    ids=["asym", "per_channel", "moving_average", "learnable"],
)
def test_state_dict_round_trip_gives_identical_output(spec, channels):
    fq = FakeQuantize(spec, num_channels=channels, name="src")
    for seed in range(3):
        fq(_x(seed) * (seed + 1))
    fq.disable_observer()
    state = fq.state_dict()
    assert {
        "scale",
        "zero_point",
        "observer.min_val",
        "observer.max_val",
        "observer_enabled",
        "fake_quant_enabled",
        "calibrated",
    } <= set(state)
    fresh = FakeQuantize(spec, num_channels=channels, name="dst")
    fresh.disable_observer()
    x = _x(7)
    assert torch.equal(fresh(x), x)  # knows nothing before loading
    fresh.load_state_dict(state)
    assert fresh.calibrated.item() == 1 and fresh.observer_enabled.item() == 0
    assert torch.equal(fresh(x), fq(x))
    assert torch.equal(fresh.observer.min_val, fq.observer.min_val)


def test_learnable_scale_is_parameter_fixed_scale_is_buffer():
    fixed = FakeQuantize(QuantSpec())
    assert "scale" in dict(fixed.named_buffers()) and "scale" not in dict(fixed.named_parameters())
    learn = FakeQuantize(QuantSpec(learnable=True, granularity="per_channel"), num_channels=3)
    assert isinstance(learn.scale, nn.Parameter)
    assert dict(learn.named_parameters())["scale"].shape == (3,)
    assert "zero_point" in dict(learn.named_buffers())


def test_learnable_scale_trains_with_lsq_grad_scale():
    spec = QuantSpec(learnable=True)
    fq = FakeQuantize(spec, name="lsq")
    x = _x()
    fq(x)  # calibrate (scale copied into the parameter without autograd)
    fq.disable_observer()
    assert fq.scale.grad is None
    fq(x).sum().backward()
    grad = fq.scale.grad.item()
    assert math.isfinite(grad) and grad != 0.0
    # LSQ: gradient scaled by 1 / sqrt(numel * qmax)
    scale = fq.scale.detach().clone().requires_grad_()
    fake_quantize(x, scale, fq.zero_point, spec).sum().backward()
    expected = scale.grad.item() / math.sqrt(x.numel() * spec.quant_range()[1])
    assert grad == pytest.approx(expected, rel=1e-5)
    # one optimizer step moves the scale
    before = fq.scale.item()
    torch.optim.SGD(fq.parameters(), lr=10.0).step()
    assert fq.scale.item() != before


def test_switch_helpers_and_describe():
    fq = FakeQuantize(ASYM, name="act")
    fq(torch.tensor([-1.0, 3.0]))
    d = fq.describe()
    assert d["range_min"] == -1.0 and d["range_max"] == 3.0
    assert d["scale_min"] == d["scale_max"] == pytest.approx(4.0 / 255)
    assert d["zero_point"] == 64
    assert "'act'" in repr(fq) and "uint8 asym" in repr(fq)
    fq.enable_observer(False)
    fq.enable_fake_quant(False)
    assert fq.observer_enabled.item() == 0 and fq.fake_quant_enabled.item() == 0


def test_calibration_estimates_qparams_once_not_per_batch(monkeypatch):
    # a histogram search per batch made percentile/MSE/entropy calibration many times slower than min/max
    from lightning_quant import scheme_for_target
    from lightning_quant.calibration import calibrate
    from lightning_quant.quantizers import iter_quantizers, prepare
    from lightning_quant.quantizers.entropy import EntropyObserver

    calls = []
    original = EntropyObserver.calculate_qparams
    monkeypatch.setattr(EntropyObserver, "calculate_qparams", lambda self: calls.append(1) or original(self))
    model = prepare(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), scheme_for_target("x86", activation_observer="entropy")
    )
    batches = [torch.randn(2, 3, 8, 8) for _ in range(6)]
    calibrate(model, batches, progress=False)
    entropy = [fq for _, fq in iter_quantizers(model) if isinstance(fq.observer, EntropyObserver)]
    assert entropy and len(calls) == len(entropy)  # once each, when fake-quant came back on
    assert all(fq.calibrated.item() for fq in entropy)
    for fq in entropy:
        assert fq.scale.item() == fq.observer.calculate_qparams()[0].item()  # the estimate of all 6 batches


def test_qparams_follow_every_step_while_fake_quant_is_on():
    fq = FakeQuantize(QuantSpec(observer="minmax"))
    fq(torch.tensor([-1.0, 1.0]))
    first = fq.scale.clone()
    fq(torch.tensor([-4.0, 4.0]))  # QAT-style: observing with fake-quant on updates the scale at once
    assert fq.scale.item() > first.item()
    second = fq.scale.clone()
    fq.disable_fake_quant()
    fq(torch.tensor([-8.0, 8.0]))
    assert torch.equal(fq.scale, second)  # deferred while off...
    fq.enable_fake_quant()
    assert fq.scale.item() == fq.observer.calculate_qparams()[0].item() > second.item()  # ...estimated when back on
