"""Histogram estimators (percentile, mse, entropy) against numpy brute force; memory bound, state, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_quant.config import QuantSpec
from lightning_quant.quantizers import EntropyObserver, HistogramObserver, MSEObserver, PercentileObserver
from lightning_quant.quantizers import histogram as histogram_module
from lightning_quant.quantizers.entropy import kl_divergences, kl_threshold_bins
from lightning_quant.quantizers.functional import fake_quantize, qparams_from_range
from lightning_quant.quantizers.histogram import bin_counts
from lightning_quant.quantizers.mse import NUM_CANDIDATES, expected_quant_error
from lightning_quant.quantizers.observers import build_observer
from lightning_quant.quantizers.percentile import histogram_quantile

NAMES = ["percentile", "mse", "entropy"]
X86_ACT = dict(symmetric=False, signed=False)


def _heavy(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Student-t (3 dof): a heavy-tailed activation-like distribution."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_t(3, n).astype(np.float32))


def _observed(name: str, x: torch.Tensor, bins: int = 2048, **spec) -> HistogramObserver:
    cls = {"percentile": PercentileObserver, "mse": MSEObserver, "entropy": EntropyObserver}[name]
    obs = cls(QuantSpec(observer=name, **spec), bins=bins)
    for chunk in x.chunk(4):
        obs(chunk)
    return obs


def _mse(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> float:
    return (fake_quantize(x, scale, zp, spec) - x).pow(2).mean().item()


# --- the histogram ----------------------------------------------------------------------------------------------


def test_histogram_counts_everything_and_matches_numpy():
    x = _heavy(5000)
    obs = _observed("percentile", x, bins=256)
    assert int(obs.histogram.sum()) == x.numel()
    edges = obs.bin_edges().numpy()
    ref, _ = np.histogram(x.numpy().astype(np.float64), bins=edges)
    assert np.abs(obs.histogram.numpy() - ref).sum() <= 4  # float32 vs float64 bucketing at bin edges only
    counts, width = obs.abs_histogram()
    assert counts.sum().item() == x.numel() and width == obs.bin_width.item()


@pytest.mark.parametrize("bins", [64, 40000])  # 16-bit and 32-bit bin indices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_bin_counts_equal_the_one_pass_reference(monkeypatch, bins, dtype):
    monkeypatch.setattr(histogram_module, "_CHUNK", 1000)  # 7 chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2100, generator=g) * 3.0).to(dtype)
    x[0, :5] = torch.tensor([-64.0, 63.9, 1.0, -1.0, 0.0])  # beyond the window, and exactly on bin edges
    width, offset = 2.0**-3, -bins // 2
    ref = torch.bincount(
        torch.floor(x.float() / width).sub_(offset).clamp_(0, bins - 1).long().flatten(), minlength=bins
    )
    assert torch.equal(bin_counts(x, width, offset, bins), ref)
    assert torch.equal(bin_counts(x, width, offset, bins), bin_counts(x.contiguous().t(), width, offset, bins))


def test_memory_bound_under_growing_ranges():
    obs = MSEObserver(QuantSpec(observer="mse"), bins=512)
    shapes = {k: tuple(v.shape) for k, v in obs.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    total = 0
    for i in range(40):
        x = torch.randn(1000, generator=g) * (1.5**i) + (i % 3 - 1) * 2.0**i
        obs(x)
        total += x.numel()
    assert {k: tuple(v.shape) for k, v in obs.state_dict().items()} == shapes
    assert int(obs.histogram.sum()) == total
    edges = obs.bin_edges()
    assert edges[0] <= obs.min_val.item() and edges[-1] > obs.max_val.item()  # the window still covers the data


def test_all_zero_batch_then_real_data():
    obs = PercentileObserver(QuantSpec(observer="percentile", percentile=100.0), bins=64)
    obs(torch.zeros(100))
    obs(torch.tensor([3.0, -1.0]))
    assert int(obs.histogram.sum()) == 102
    lo, hi = obs.clipped_range()
    assert (lo.item(), hi.item()) == (-1.0, 3.0)


# --- percentile -------------------------------------------------------------------------------------------------


def _assert_percentile(value: float, data: np.ndarray, p: float, width: float) -> None:
    """Within one bin of the samples around the percentile's rank (numpy brute force)."""
    lower, upper = np.percentile(data, p, method="lower"), np.percentile(data, p, method="higher")
    assert lower - width <= value <= upper + width


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_symmetric_matches_numpy(p):
    x = _heavy()
    obs = _observed("percentile", x, percentile=p)
    _, hi = obs.clipped_range()
    _assert_percentile(hi.item(), np.abs(x.numpy()), p, obs.bin_width.item())
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(hi.item() / 127, rel=1e-6) and zp.item() == 0


def test_percentile_asymmetric_tails_match_numpy():
    x = _heavy() + 1.0
    obs = _observed("percentile", x, percentile=99.5, **X86_ACT)
    lo, hi = obs.clipped_range()
    _assert_percentile(lo.item(), x.numpy(), 0.5, obs.bin_width.item())
    _assert_percentile(hi.item(), x.numpy(), 99.5, obs.bin_width.item())


def test_histogram_quantile_errors():
    with pytest.raises(ValueError, match="non-empty histogram and q in"):
        histogram_quantile(torch.zeros(3), 0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"q=1\.5"):
        histogram_quantile(torch.ones(3), 0.0, 1.0, 1.5)


# --- mse --------------------------------------------------------------------------------------------------------


def _brute_force_mse(x: torch.Tensor, spec: QuantSpec) -> float:
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    best = float("inf")
    for c in np.linspace(1.0, 1.0 / NUM_CANDIDATES, NUM_CANDIDATES):
        scale, zp = qparams_from_range(torch.tensor(c * lo), torch.tensor(c * hi), spec)
        q = np.clip(np.round(x.numpy() / scale.item()) + zp.item(), *spec.quant_range())
        best = min(best, float(np.mean(((q - zp.item()) * scale.item() - x.numpy()) ** 2)))
    return best


@pytest.mark.parametrize("spec", [dict(bits=8), dict(bits=4), dict(bits=8, **X86_ACT), dict(bits=6, **X86_ACT)])
def test_mse_matches_brute_force_search(spec):
    x = _heavy(8000) * 0.5 + (0.3 if not spec.get("signed", True) else 0.0)
    obs = _observed("mse", x, **spec)
    scale, zp = obs.calculate_qparams()
    achieved = _mse(x, scale, zp, obs.spec)
    assert achieved <= 1.03 * _brute_force_mse(x, obs.spec)


def test_expected_error_matches_empirical_error():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(3)) * 4 - 1  # uniform: the model is exact
    spec = QuantSpec(bits=4, **X86_ACT)
    obs = _observed("mse", x, bins=256, **X86_ACT, bits=4)
    first = obs.bin_offset.item() * obs.bin_width.item()
    for lo, hi in [(-1.0, 3.0), (-0.5, 1.5)]:
        scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
        err = expected_quant_error(obs.histogram.double(), first, obs.bin_width.item(), scale, zp, spec)
        assert err.item() / x.numel() == pytest.approx(_mse(x, scale, zp, spec), rel=0.02)


def test_mse_per_channel_searches_each_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=g)
    w[2, 0, 0, 0] = 25.0  # one outlier in channel 2
    spec = QuantSpec(observer="mse", granularity="per_channel", bits=4)
    obs = build_observer(spec, num_channels=6)
    obs(w)
    scale, zp = obs.calculate_qparams()
    flat = w.reshape(6, -1)
    for ch in range(6):
        one = QuantSpec(bits=4)
        best = _brute_force_mse(flat[ch], one)
        assert _mse(flat[ch], scale[ch], zp[ch], one) == pytest.approx(best, rel=1e-6)
    obs(w)  # same tensor again: cached, same result
    assert torch.equal(obs.calculate_qparams()[0], scale)


def test_percentile_and_entropy_fall_back_to_min_max_per_channel():
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    for name in ("percentile", "entropy"):
        obs = build_observer(QuantSpec(observer=name, granularity="per_channel"), num_channels=5)
        obs(w)
        ref = qparams_from_range(w.min(1).values, w.max(1).values, obs.spec)
        assert all(torch.equal(a, b) for a, b in zip(obs.calculate_qparams(), ref, strict=True))
        assert obs.histogram.numel() == 0


# --- entropy ----------------------------------------------------------------------------------------------------


def _kl_reference(h: np.ndarray, levels: int) -> list[float]:
    """TensorRT's loop, written out (Migacz 2017 / pytorch-quantization)."""
    out = []
    for i in range(levels, len(h) + 1):
        p = h[:i].astype(np.float64).copy()
        p[-1] += h[i:].sum()
        group = (np.arange(i) * levels) // i
        q = np.zeros(i)
        for g in range(levels):
            nonzero = (group == g) & (h[:i] > 0)
            if nonzero.any():
                q[nonzero] = h[:i][group == g].sum() / nonzero.sum()
        if q.sum() == 0 or np.any((p > 0) & (q == 0)):
            out.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        out.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_divergences_match_reference_loop(seed):
    rng = np.random.default_rng(seed)
    h = np.bincount(np.minimum(np.abs(rng.standard_t(3, 3000)) * 40, 399).astype(int))
    cand, kl = kl_divergences(torch.tensor(h, dtype=torch.float64), 32)
    ref = np.array(_kl_reference(h, 32))
    assert cand.tolist() == list(range(32, len(h) + 1))
    assert np.array_equal(np.isinf(ref), torch.isinf(kl).numpy())
    finite = np.isfinite(ref)
    np.testing.assert_allclose(kl.numpy()[finite], ref[finite], rtol=1e-9, atol=1e-12)
    best = len(ref) - 1 - int(np.argmin(ref[::-1]))
    assert kl_threshold_bins(torch.tensor(h, dtype=torch.float64), 32) == 32 + best


def test_entropy_threshold_is_kl_optimum_of_the_histogram():
    x = _heavy()
    obs = _observed("entropy", x, bins=1024)  # power-of-two widths: 512 to 1024 bins span the data
    counts, width = obs.abs_histogram()
    i = kl_threshold_bins(counts[1:], 128) + 1  # the search leaves out the first bin (a ReLU's zeros)
    _, hi = obs.clipped_range()
    assert hi.item() == pytest.approx(min(i * width, x.abs().max().item()))
    assert hi.item() < x.abs().max().item()
    unsigned = _observed("entropy", x.relu(), bins=512, **X86_ACT)
    assert unsigned.calculate_qparams()[1].item() == 0  # post-ReLU data: no negative range


def test_kl_levels_error():
    with pytest.raises(ValueError, match="levels=0 must be >= 1"):
        kl_divergences(torch.ones(4), 0)
    with pytest.raises(ValueError, match="levels=0 must be >= 1"):
        kl_threshold_bins(torch.ones(0), 0)


# --- all three --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_gives_same_qparams(name):
    obs = _observed(name, _heavy(4000), **X86_ACT)
    fresh = build_observer(QuantSpec(observer=name, **X86_ACT))
    fresh.load_state_dict(obs.state_dict())
    a, b = obs.calculate_qparams(), fresh.calculate_qparams()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_bit_identical_qparams(name):
    a = _observed(name, _heavy(4000)).calculate_qparams()
    b = _observed(name, _heavy(4000)).calculate_qparams()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_raises_and_keeps_state(name, bad, word):
    obs = _observed(name, _heavy(1000))
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    with pytest.raises(FloatingPointError, match=word):
        obs(torch.tensor([0.0, bad]))
    assert all(torch.equal(v, obs.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", NAMES)
def test_reset_clears_the_histogram(name):
    obs = _observed(name, _heavy(1000))
    obs.reset()
    assert not obs.initialized and int(obs.histogram.sum()) == 0 and obs.bin_width.item() == 0.0


@pytest.mark.parametrize("name", ["percentile", "mse"])
@pytest.mark.parametrize("spec", [dict(), X86_ACT])
def test_clipping_beats_min_max_on_heavy_tails(name, spec):
    # at 8 bits, t(3) tails are so heavy that clipping at 99.99% costs more than it saves; at 4 bits
    # rounding noise dominates and the clipped range wins clearly
    x = _heavy(50_000, seed=4)
    x = x.relu() if spec else x
    minmax = build_observer(QuantSpec(bits=4, **spec))
    minmax(x)
    obs = _observed(name, x, bits=4, **spec)
    assert _mse(x, *obs.calculate_qparams(), obs.spec) < 0.7 * _mse(x, *minmax.calculate_qparams(), obs.spec)


def test_bins_validation():
    with pytest.raises(ValueError, match="bins=8 must be an integer >= 16"):
        MSEObserver(QuantSpec(observer="mse"), bins=8)
    with pytest.raises(ValueError, match="bins=True must be an integer"):
        EntropyObserver(QuantSpec(observer="entropy"), bins=True)


@pytest.mark.parametrize("bad", [50.0, 100.5, float("nan"), "99", True])
def test_percentile_spec_validation(bad):
    with pytest.raises(ValueError, match=r"percentile=.* must be (a number )?in \(50, 100\]"):
        QuantSpec(observer="percentile", percentile=bad)


def test_entropy_threshold_ignores_a_relus_zeros():
    """Post-ReLU data is mostly exact zeros: with them in the searched histogram the spike always picked the smallest
    candidate (amax 128 bins), clipping most of the range; without them the threshold keeps the bulk of the data."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200_000, generator=g) - 0.3).relu()  # 62 % zeros, a half-normal tail up to ~4
    obs = _observed("entropy", x, bins=2048, **X86_ACT)
    _, hi = obs.clipped_range()
    assert (x > hi).float().mean() < 0.01  # almost nothing clipped
    counts, width = obs.abs_histogram()
    assert kl_threshold_bins(counts, obs.levels()) == obs.levels()  # the old search: the smallest candidate
