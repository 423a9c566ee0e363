"""Observers: running statistics, per-channel shapes, non-finite input, the name registry."""

from __future__ import annotations

import pytest
import torch

from lightning_quant.config import QuantSpec
from lightning_quant.quantizers import FakeQuantize, observer_names, register_observer
from lightning_quant.quantizers.functional import qparams_from_range
from lightning_quant.quantizers.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    build_observer,
)


def _batches(n: int = 4, shape=(3, 5, 4, 4), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * (i + 1) + i * 0.3 for i in range(n)]


def test_builtin_observers_registered():
    assert {"minmax", "moving_average"} <= set(observer_names())
    assert isinstance(build_observer(QuantSpec(observer="minmax")), MinMaxObserver)
    assert isinstance(build_observer(QuantSpec(observer="moving_average")), MovingAverageMinMaxObserver)


def test_minmax_over_batches_equals_global_min_max():
    obs = build_observer(QuantSpec())
    batches = _batches()
    for b in batches:
        assert obs(b) is b  # passes the tensor through unchanged
    everything = torch.cat([b.flatten() for b in batches])
    assert obs.min_val.item() == everything.min().item()
    assert obs.max_val.item() == everything.max().item()
    scale, zp = obs.calculate_qparams()
    ref_scale, ref_zp = qparams_from_range(everything.min(), everything.max(), QuantSpec())
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_minmax_per_channel_shapes_and_values(axis):
    batches = _batches()
    n = batches[0].shape[axis]
    spec = QuantSpec(granularity="per_channel", ch_axis=axis)
    obs = build_observer(spec, num_channels=n)
    assert obs.min_val.shape == (n,) and obs.max_val.shape == (n,)
    for b in batches:
        obs(b)
    stacked = torch.cat([b.movedim(axis, 0).reshape(n, -1) for b in batches], dim=1)
    assert torch.equal(obs.min_val, stacked.min(dim=1).values)
    assert torch.equal(obs.max_val, stacked.max(dim=1).values)
    scale, zp = obs.calculate_qparams()
    assert scale.shape == (n,) and zp.shape == (n,)


def test_per_channel_1d_tensor_is_its_own_range():
    obs = build_observer(QuantSpec(granularity="per_channel"), num_channels=3)
    obs(torch.tensor([1.0, -2.0, 3.0]))
    obs(torch.tensor([0.5, -1.0, 4.0]))
    assert obs.min_val.tolist() == [0.5, -2.0, 3.0]
    assert obs.max_val.tolist() == [1.0, -1.0, 4.0]


def test_per_channel_observer_errors():
    with pytest.raises(ValueError, match="needs num_channels"):
        build_observer(QuantSpec(granularity="per_channel"))
    obs = build_observer(QuantSpec(granularity="per_channel"), num_channels=4)
    with pytest.raises(ValueError, match=r"expects 4 channels on axis 0, got shape \(3, 2\)"):
        obs(torch.randn(3, 2))


def test_moving_average_follows_ema_formula():
    c = 0.2
    obs = build_observer(QuantSpec(observer="moving_average", averaging_constant=c))
    batches = _batches(5)
    lo, hi = batches[0].min().item(), batches[0].max().item()  # first batch initializes
    for b in batches[1:]:
        lo = lo + c * (b.min().item() - lo)
        hi = hi + c * (b.max().item() - hi)
    for b in batches:
        obs(b)
    assert obs.min_val.item() == pytest.approx(lo, rel=1e-6)
    assert obs.max_val.item() == pytest.approx(hi, rel=1e-6)
    # it really averages: the last batch's range is wider than the estimate
    assert obs.max_val.item() < batches[-1].max().item()


def test_moving_average_per_channel():
    c = 0.5
    spec = QuantSpec(observer="moving_average", averaging_constant=c, granularity="per_channel", ch_axis=1)
    obs = build_observer(spec, num_channels=5)
    a, b = _batches(2)
    obs(a)
    obs(b)
    lo_a, lo_b = a.amin(dim=(0, 2, 3)), b.amin(dim=(0, 2, 3))
    hi_a, hi_b = a.amax(dim=(0, 2, 3)), b.amax(dim=(0, 2, 3))
    torch.testing.assert_close(obs.min_val, lo_a + c * (lo_b - lo_a))
    torch.testing.assert_close(obs.max_val, hi_a + c * (hi_b - hi_a))


def test_empty_tensor_is_ignored_and_reset_clears():
    obs = build_observer(QuantSpec())
    obs(torch.empty(0, 3))
    assert not obs.initialized
    obs(torch.tensor([-1.0, 2.0]))
    assert obs.initialized
    obs.reset()
    assert not obs.initialized and obs.min_val.item() == float("inf")


def test_observer_state_is_in_state_dict():
    obs = build_observer(QuantSpec(granularity="per_channel"), num_channels=2)
    obs(torch.tensor([[1.0, -1.0], [3.0, 0.5]]))
    fresh = build_observer(QuantSpec(granularity="per_channel"), num_channels=2)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.min_val, obs.min_val) and torch.equal(fresh.max_val, obs.max_val)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "mean_minmax"])
@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_non_finite_values_raise(observer, bad, word):
    obs = build_observer(QuantSpec(observer=observer))
    obs(torch.tensor([0.0, 1.0]))
    with pytest.raises(FloatingPointError, match=word):
        obs(torch.tensor([0.0, bad]))
    assert obs.max_val.item() == 1.0  # the state was not polluted


def test_non_finite_through_fake_quantize_names_the_quantizer():
    fq = FakeQuantize(QuantSpec(), name="backbone.layer3.conv2.input")
    with pytest.raises(FloatingPointError, match=r"NaN .*'backbone\.layer3\.conv2\.input'"):
        fq(torch.tensor([1.0, float("nan")]))
    unnamed = FakeQuantize(QuantSpec())
    with pytest.raises(FloatingPointError, match="<unnamed>"):
        unnamed(torch.tensor([float("inf")]))


def test_register_observer_makes_it_selectable():
    name = "test_fixed_unit_range"

    @register_observer(name)
    class FixedRange(Observer):
        """Ignores the data, always proposes [-1, 1]."""

        def observe(self, x: torch.Tensor) -> None:
            self.batch_range(x)  # keeps the NaN check
            self.min_val.fill_(-1.0)
            self.max_val.fill_(1.0)

    assert name in observer_names()
    spec = QuantSpec(observer=name)
    assert isinstance(build_observer(spec), FixedRange)
    fq = FakeQuantize(spec, name="custom")
    assert isinstance(fq.observer, FixedRange)
    out = fq(torch.tensor([0.5, 10.0, -10.0]))
    assert fq.scale.item() == pytest.approx(1 / 127)
    assert out.tolist() == pytest.approx([64 / 127, 1.0, -128 / 127])


def test_unknown_observer_name_raises():
    with pytest.raises(ValueError, match=r"observer='percentile_99' is not registered; use one of .*'minmax'"):
        QuantSpec(observer="percentile_99")


def test_mean_minmax_is_the_mean_of_per_sample_extremes_whatever_the_batching():
    data = torch.cat(_batches(4, shape=(8, 5, 4, 4)))  # 32 samples of growing scale
    per_sample = data.reshape(32, -1)
    expected = per_sample.min(1).values.double().mean(), per_sample.max(1).values.double().mean()
    for batch in (1, 5, 32):
        obs = build_observer(QuantSpec(observer="mean_minmax"))
        for chunk in data.split(batch):
            obs(chunk)
        assert obs.samples.item() == 32
        assert obs.min_val.item() == pytest.approx(expected[0].item(), rel=1e-6)
        assert obs.max_val.item() == pytest.approx(expected[1].item(), rel=1e-6)
    minmax = build_observer(QuantSpec(observer="minmax"))
    minmax(data)
    assert obs.max_val < minmax.max_val and obs.min_val > minmax.min_val  # one sample's outlier does not set it


def test_mean_minmax_state_round_trips_and_resets():
    ramp = torch.linspace(0.0, 1.0, 64)  # samples of 64 values: each one's own extremes count
    obs = build_observer(QuantSpec(observer="mean_minmax"))
    obs(torch.stack([2 * ramp, 4 * ramp]))
    fresh = build_observer(QuantSpec(observer="mean_minmax"))
    fresh.load_state_dict(obs.state_dict())
    fresh(9 * ramp[None])  # resumes the running mean: (2 + 4 + 9) / 3
    assert fresh.max_val.item() == pytest.approx(5.0) and fresh.samples.item() == 3
    fresh.reset()
    assert not fresh.initialized and fresh.samples.item() == 0
    fresh(2 * ramp[None] - 1)
    assert (fresh.min_val.item(), fresh.max_val.item()) == (-1.0, 1.0)


def test_mean_minmax_takes_each_calls_extremes_for_samples_of_a_few_values():
    """The extremes of a 2-value sample are its typical values: averaging them would clip half of every sample."""
    obs = build_observer(QuantSpec(observer="mean_minmax"))
    obs(torch.tensor([[0.0, 2.0], [0.0, 4.0]]))  # one call, one count: its extremes 0 and 4
    obs(torch.tensor([[0.0, 8.0]]))
    assert (obs.max_val.item(), obs.samples.item()) == (6.0, 2)  # (4 + 8) / 2, not (2 + 4 + 8) / 3


def test_mean_minmax_per_channel_counts_each_call_once():
    obs = build_observer(QuantSpec(observer="mean_minmax", granularity="per_channel"), num_channels=2)
    obs(torch.tensor([[1.0, -1.0], [3.0, 0.5]]))
    obs(torch.tensor([[5.0, -3.0], [7.0, 2.5]]))
    assert obs.samples.item() == 2
    torch.testing.assert_close(obs.max_val, torch.tensor([3.0, 5.0]))  # means of (1, 5) and (3, 7)
