"""DPU numerics against short reference implementations: rounding, fix positions, observers, average pooling."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_quant.config import RoundingMode, scheme_for_target
from lightning_quant.quantizers import prepare
from lightning_quant.quantizers.dpu import (
    MAX_FIX_POS,
    MIN_FIX_POS,
    DPUFixPosObserver,
    DPUInputFixPosObserver,
    best_fix_pos,
    fix_pos_from_scale,
    fix_quantize,
    overflow_safe_fix_pos,
)
from lightning_quant.quantizers.dpu_pool import DPUAvgPool2d, avgpool_multiplier, avgpool_scale
from lightning_quant.quantizers.functional import round_tensor
from tests.helpers.models import TinyConvBN


def _dpu_round(v: float) -> float:  # XIR's DPU_ROUND, as its op definition states it
    return math.ceil(v) if v < 0 and v - math.floor(v) == 0.5 else _std_round(v)


def _std_round(v: float) -> float:  # C's std::round
    return math.copysign(math.floor(abs(v) + 0.5), v)


def _values() -> torch.Tensor:
    ties = torch.arange(-8, 8, dtype=torch.float32) + 0.5
    near = torch.tensor([0.49999997, -0.49999997, 1.5000001, -2.4999998, 0.0, -0.0, 126.5, -128.5])
    return torch.cat([ties, near, torch.randn(500, generator=torch.Generator().manual_seed(0)) * 50])


def test_activation_rounding_is_xir_dpu_round():
    x = _values()
    assert round_tensor(x, RoundingMode.HALF_UP).tolist() == [_dpu_round(v) for v in x.tolist()]


def test_weight_rounding_is_std_round():
    x = _values()
    assert round_tensor(x, RoundingMode.HALF_AWAY).tolist() == [_std_round(v) for v in x.tolist()]


def _brute_safe(lo: float, hi: float) -> int:
    """Largest position whose grid holds [lo, hi] within [-128.5, 127.5] codes (capped like the library)."""
    ok = [p for p in range(MIN_FIX_POS, MAX_FIX_POS + 1) if hi * 2.0**p <= 127.5 and lo * 2.0**p >= -128.5]
    return max(ok) if ok else MIN_FIX_POS


def _brute_best(x: torch.Tensor, rounding: RoundingMode) -> int:
    safe = _brute_safe(x.min().item(), x.max().item())
    errors = {}
    for p in range(safe, min(safe + 5, MAX_FIX_POS + 1)):
        q = [max(-128, min(127, _dpu_round(v * 2.0**p) if rounding is RoundingMode.HALF_UP else _std_round(v * 2.0**p)))
             for v in x.tolist()]  # fmt: skip
        errors[p] = sum((qi / 2.0**p - v) ** 2 for qi, v in zip(q, x.tolist(), strict=True))
    return min(errors, key=lambda p: (errors[p], p))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rounding", [RoundingMode.HALF_UP, RoundingMode.HALF_AWAY])
def test_fix_position_matches_brute_force(seed, rounding):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(1).uniform_(-3, 2, generator=g).item()
    x = torch.randn(200, generator=g) * scale
    if seed % 3 == 0:
        x = torch.relu(x) + torch.randn(1, generator=g).abs() * scale * 3 * (torch.arange(200) == 0)  # outlier
    assert overflow_safe_fix_pos(x.min(), x.max()) == _brute_safe(x.min().item(), x.max().item())
    assert best_fix_pos(x, rounding=rounding) == _brute_best(x, rounding)


def test_fix_position_edges():
    assert overflow_safe_fix_pos(0.0, 0.0) == MAX_FIX_POS  # all-zero tensor
    assert overflow_safe_fix_pos(-1e9, 1e9) == MIN_FIX_POS
    assert overflow_safe_fix_pos(-128.5, 127.5) == 0 and overflow_safe_fix_pos(-128.6, 0.0) == -1
    assert best_fix_pos(torch.full((4,), 1e-6)) == MAX_FIX_POS
    assert fix_quantize(torch.tensor([1.0, -2.0]), 7, RoundingMode.HALF_UP).tolist() == [127 / 128, -1.0]
    assert fix_pos_from_scale(torch.tensor(2.0**-5)) == 5 and fix_pos_from_scale(4.0) == -2


def test_observer_takes_the_mode_over_batches():
    obs = DPUFixPosObserver(scheme_for_target("dpu").activation)
    batches = [torch.tensor([-1.5, 0.2]), torch.tensor([-4.0, 0.2]), torch.tensor([-1.4, 0.3])]
    for b in batches:
        obs(b)
    per_batch = [best_fix_pos(b) for b in batches]
    assert per_batch == [6, 5, 6] and obs.fix_pos() == 6
    assert obs.calculate_qparams()[0].item() == 2.0**-6
    assert obs.pos_counts.shape == (MAX_FIX_POS - MIN_FIX_POS + 1,) and int(obs.pos_counts.sum()) == 3
    obs.reset()
    assert int(obs.pos_counts.sum()) == 0


def test_input_observer_keeps_the_overflow_safe_position():
    x = torch.tensor([0.01] * 100 + [-1.0])
    obs = DPUInputFixPosObserver(scheme_for_target("dpu").activation)
    obs(x)
    assert obs.fix_pos() == overflow_safe_fix_pos(-1.0, 0.01) == 7


def test_dpu_target_selects_the_dpu_observers():
    scheme = scheme_for_target("dpu")
    assert scheme.weight.observer == scheme.activation.observer == "dpu_pot"
    assert scheme.bias is scheme.weight and scheme_for_target("x86").bias is None
    assert scheme_for_target("dpu", mode="qat").activation.observer == "moving_average"
    q = prepare(TinyConvBN().eval(), scheme)
    assert type(q.get_submodule("activation_quantizers.x").observer) is DPUInputFixPosObserver
    assert type(q.get_submodule("activation_quantizers.relu").observer) is DPUFixPosObserver
    assert q.get_submodule("fc").bias_fake_quant is not None
    assert type(q.get_submodule("pool")) is DPUAvgPool2d
    x86 = prepare(TinyConvBN().eval(), scheme_for_target("x86"))
    assert (
        x86.get_submodule("fc").bias_fake_quant is None
        and type(x86.get_submodule("pool")) is torch.nn.AdaptiveAvgPool2d
    )


def test_avgpool_reciprocals():
    assert avgpool_multiplier(7, 7) == (21, 10) and avgpool_scale(7, 7) == 49 * 21 / 1024
    assert avgpool_multiplier(3, 3) == (7, 6) and avgpool_multiplier(14, 14) == (21, 12)
    for k in (1, 2, 4, 8):
        assert avgpool_scale(k, k) == 1.0
    for n in range(1, 40):  # the general rule: the closest dyadic reciprocal over shifts < ceil(log2(128 n))
        f, s = avgpool_multiplier(1, n)
        assert abs(f / 2**s - 1 / n) <= min(
            abs(round(2**t / n) / 2**t - 1 / n) for t in range(math.ceil(math.log2(128 * n)))
        )


def test_dpu_avgpool_is_the_scaled_average():
    x = torch.randint(-128, 128, (2, 3, 7, 7)).float() / 32
    out = DPUAvgPool2d(global_pool=True)(x)
    expected = x.double().sum((2, 3), keepdim=True) * 21 / 1024
    assert torch.equal(out.double(), expected)
    y = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(DPUAvgPool2d(3, 3)(y), torch.nn.functional.avg_pool2d(y, 3) * 9 * 7 / 64)
    with pytest.raises(ValueError, match="input size must be a multiple of the output size"):
        DPUAvgPool2d(output_size=4)(torch.randn(1, 1, 6, 6))


def test_best_fix_pos_matches_the_direct_search_with_each_rounding():
    """The fast search (round half to even, error in code units) picks what fix_quantize's own error picks."""
    from lightning_quant.config import RoundingMode
    from lightning_quant.quantizers.dpu import (
        CANDIDATES,
        MAX_FIX_POS,
        best_fix_pos,
        fix_quantize,
        overflow_safe_fix_pos,
    )

    def direct(x, rounding):
        start = overflow_safe_fix_pos(x.min(), x.max())
        errors = [
            (fix_quantize(x, p, rounding) - x).double().pow(2).sum().item()
            for p in range(start, min(start + CANDIDATES, MAX_FIX_POS + 1))
        ]
        return start + errors.index(min(errors))

    g = torch.Generator().manual_seed(0)
    for i in range(400):
        x = torch.randn(int(torch.randint(1, 200, (1,), generator=g)), generator=g) * (i % 7 + 0.01)
        if i % 3 == 1:
            x = torch.round(x * 64) / 64  # on a finer power-of-two grid: many exact ties
        if i % 3 == 2:
            x = torch.cat([torch.relu(x), torch.tensor([30.0])])  # one outlier worth clipping
        for rounding in (RoundingMode.HALF_UP, RoundingMode.HALF_AWAY, RoundingMode.HALF_EVEN):
            assert best_fix_pos(x, rounding=rounding) == direct(x, rounding), (i, rounding)


def test_large_tensors_are_searched_on_an_estimate_that_keeps_the_best_error():
    """Above ``sample`` elements the position comes from clippable values + a seeded sample: near-optimal error."""

    def error(x, pos):
        return (fix_quantize(x, pos, RoundingMode.HALF_UP) - x).double().pow(2).sum().item()

    g = torch.Generator().manual_seed(1)
    same = 0
    for i in range(120):
        x = torch.randn(100_000, generator=g) * 10 ** (torch.rand(1, generator=g).item() * 4 - 2)
        if i % 4 == 1:
            x = torch.relu(x)
        elif i % 4 == 2:
            x = x**3  # heavy tails
        elif i % 4 == 3:
            x = torch.relu(x)
            x[: int(torch.randint(1, 50, (1,), generator=g))] *= 30  # a few outliers worth clipping or not
        exact, estimated = best_fix_pos(x, sample=None), best_fix_pos(x, sample=4096)
        same += exact == estimated
        assert error(x, estimated) <= 1.02 * error(x, exact), i
    assert same >= 115
    x = torch.relu(torch.randn(5000, generator=g))
    assert best_fix_pos(x) == best_fix_pos(x, sample=None)  # below SEARCH_SAMPLE: every element
    flat = torch.full((10_000,), 0.25)  # every value clippable at the next position: no sample left
    assert best_fix_pos(flat, sample=100) == best_fix_pos(flat, sample=None)


def test_the_observer_searches_parameters_exactly_and_large_activations_on_the_estimate(monkeypatch):
    import lightning_quant.quantizers.dpu as dpu

    calls = []
    monkeypatch.setattr(dpu, "best_fix_pos", lambda x, *a, sample, **k: calls.append(sample) or 0)
    obs = DPUFixPosObserver(scheme_for_target("dpu").weight)
    obs(torch.nn.Parameter(torch.randn(4, 3)))
    obs(torch.randn(4, 3))
    assert calls == [None, dpu.SEARCH_SAMPLE]
