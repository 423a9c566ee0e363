"""Numerics of the pure quantization functions against a short independent numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_quant.config import Granularity, QuantSpec, RoundingMode
from lightning_quant.quantizers.functional import (
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    round_ste,
    round_tensor,
    sqnr_db,
)

# --- reference implementation ---------------------------------------------------------------------------------
# float32 values are exact in float64 and v + 0.5 is exact there too, so these roundings have no float error.


def ref_round(v: np.ndarray, mode: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if mode == "half_even":
        return np.round(v)  # numpy rounds exact halves to even
    if mode == "half_up":
        return np.floor(v + 0.5)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def ref_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1


def _expand(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    p = np.asarray(p)
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def ref_quantize(x, scale, zp, qmin, qmax, mode, axis=None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    s = _expand(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _expand(np.asarray(zp, dtype=np.float64), x.ndim, axis)
    v = (x / s).astype(np.float32)  # IEEE float32 division, as torch does it
    return np.clip(ref_round(v, mode) + z, qmin, qmax)


def ref_fake_quantize(x, scale, zp, qmin, qmax, mode, axis=None) -> np.ndarray:
    q = ref_quantize(x, scale, zp, qmin, qmax, mode, axis)
    s = _expand(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _expand(np.asarray(zp, dtype=np.float64), q.ndim, axis)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


TIES = [-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]
NEAR_TIES = [0.49999997, -0.49999997, 0.50000006, -0.50000006, 1.4999999, -1.4999999, 2.5000002, -2.5000002]


# --- rounding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("half_even", [-4, -2, -2, 0, 0, 2, 2, 4]),
        ("half_up", [-3, -2, -1, 0, 1, 2, 3, 4]),
        ("half_away", [-4, -3, -2, -1, 1, 2, 3, 4]),
    ],
)
def test_round_tensor_exact_ties(mode, expected):
    out = round_tensor(t(TIES), RoundingMode(mode))
    assert out.tolist() == [float(e) for e in expected]
    assert ref_round(np.array(TIES, np.float32), mode).tolist() == [float(e) for e in expected]


@pytest.mark.parametrize("mode", ["half_even", "half_up", "half_away"])
def test_round_tensor_matches_reference(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, generator=g) * 50, t(TIES), t(NEAR_TIES), torch.arange(-6, 6.5, 0.5)])
    out = round_tensor(x, RoundingMode(mode))
    np.testing.assert_array_equal(out.numpy().astype(np.float64), ref_round(x.numpy(), mode))


@pytest.mark.parametrize("mode", ["half_even", "half_up", "half_away"])
def test_round_ste_forward_rounds_backward_identity(mode):
    x = t([-2.5, -0.7, 0.5, 1.2, 3.5]).requires_grad_()
    y = round_ste(x, RoundingMode(mode))
    assert torch.equal(y.detach(), round_tensor(x.detach(), RoundingMode(mode)))
    (y * torch.arange(1.0, 6.0)).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


# --- quantize / dequantize / fake_quantize vs reference ---------------------------------------------------------

SPECS = [
    dict(bits=8, symmetric=True, signed=True),
    dict(bits=8, symmetric=True, signed=True, narrow_range=True),
    dict(bits=8, symmetric=False, signed=False),
    dict(bits=4, symmetric=True, signed=True),
    dict(bits=4, symmetric=True, signed=True, narrow_range=True),
    dict(bits=4, symmetric=False, signed=False),
    dict(bits=2, symmetric=True, signed=True),
    dict(bits=2, symmetric=True, signed=True, narrow_range=True),
    dict(bits=2, symmetric=False, signed=False),
    dict(bits=8, symmetric=True, signed=True, rounding="half_up"),
    dict(bits=8, symmetric=True, signed=True, rounding="half_away"),
    dict(bits=3, symmetric=False, signed=True, rounding="half_up"),
]


def _spec_id(kw: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kw", SPECS, ids=_spec_id)
def test_quant_range_matches_reference(kw):
    spec = QuantSpec(**kw)
    assert spec.quant_range() == ref_range(kw["bits"], kw["signed"], kw.get("narrow_range", False))


@pytest.mark.parametrize("kw", SPECS, ids=_spec_id)
def test_per_tensor_quantize_matches_reference(kw):
    spec = QuantSpec(**kw)
    qmin, qmax = spec.quant_range()
    scale = 0.25
    zp = 0 if spec.symmetric else qmin + (qmax - qmin) // 3 + 1
    # random values well outside the range (clamping), exact ties of x/scale, near ties
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(500, generator=g) * 40, t(TIES) * scale, t(NEAR_TIES) * scale])
    q = quantize(x, torch.tensor(scale), torch.tensor(zp, dtype=torch.int32), spec)
    ref_q = ref_quantize(x.numpy(), scale, zp, qmin, qmax, spec.rounding.value)
    np.testing.assert_array_equal(q.numpy().astype(np.float64), ref_q)
    assert q.min().item() == qmin and q.max().item() == qmax  # the random values do clamp at both ends
    deq = dequantize(q, torch.tensor(scale), torch.tensor(zp, dtype=torch.int32), spec)
    fq = fake_quantize(x, torch.tensor(scale), torch.tensor(zp, dtype=torch.int32), spec)
    ref_fq = ref_fake_quantize(x.numpy(), scale, zp, qmin, qmax, spec.rounding.value)
    np.testing.assert_array_equal(fq.numpy(), ref_fq)
    np.testing.assert_array_equal(deq.numpy(), ref_fq)


@pytest.mark.parametrize(
    "mode, codes",
    [
        ("half_even", [-4, -2, -2, 0, 0, 2, 2, 4]),
        ("half_up", [-3, -2, -1, 0, 1, 2, 3, 4]),
        ("half_away", [-4, -3, -2, -1, 1, 2, 3, 4]),
    ],
)
def test_quantize_ties_follow_rounding_mode(mode, codes):
    spec = QuantSpec(rounding=mode)
    scale = torch.tensor(0.5)
    q = quantize(t(TIES) * 0.5, scale, torch.tensor(0), spec)
    assert q.tolist() == [float(c) for c in codes]


def test_clamping_at_qmin_qmax_int8_and_uint8():
    x = t([-1000.0, -128.6, -127.4, 0.0, 126.6, 127.4, 1000.0])
    assert quantize(x, torch.tensor(1.0), torch.tensor(0), QuantSpec()).tolist() == [-128, -128, -127, 0, 127, 127, 127]
    narrow = QuantSpec(narrow_range=True)
    assert quantize(x, torch.tensor(1.0), torch.tensor(0), narrow).tolist() == [-127, -127, -127, 0, 127, 127, 127]
    unsigned = QuantSpec(symmetric=False, signed=False)
    q = quantize(x, torch.tensor(1.0), torch.tensor(128, dtype=torch.int32), unsigned)
    assert q.tolist() == [0, 0, 1, 128, 255, 255, 255]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_matches_reference(axis, symmetric):
    spec = QuantSpec(
        granularity="per_channel", ch_axis=axis, symmetric=symmetric, signed=symmetric, narrow_range=symmetric
    )
    qmin, qmax = spec.quant_range()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 3, 3, generator=g) * torch.arange(1, 6).float().reshape(1, 5, 1, 1)
    n = x.shape[axis]
    scale = torch.linspace(0.01, 0.05, n)
    zp = torch.zeros(n, dtype=torch.int32) if symmetric else torch.arange(n, dtype=torch.int32) * 20 + 60
    q = quantize(x, scale, zp, spec)
    ref_q = ref_quantize(x.numpy(), scale.numpy(), zp.numpy(), qmin, qmax, "half_even", axis)
    np.testing.assert_array_equal(q.numpy().astype(np.float64), ref_q)
    fq = fake_quantize(x, scale, zp, spec)
    np.testing.assert_array_equal(
        fq.numpy(), ref_fake_quantize(x.numpy(), scale.numpy(), zp.numpy(), qmin, qmax, "half_even", axis)
    )
    # channels really use their own scale: quantizing with the scales permuted gives something else
    assert not torch.equal(quantize(x, scale.flip(0), zp.flip(0), spec), q)


# --- qparams_from_range -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", SPECS, ids=_spec_id)
def test_qparams_from_range_matches_reference(kw):
    spec = QuantSpec(**kw)
    qmin, qmax = spec.quant_range()
    lo, hi = -1.3, 2.9
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    if spec.symmetric:
        ref_scale = max(-lo, hi) / (qmax if spec.signed else qmax - qmin)
        ref_zp = 0
    else:
        ref_scale = (hi - lo) / (qmax - qmin)
        ref_zp = qmin - round(lo / ref_scale)
    assert scale.item() == pytest.approx(ref_scale, rel=1e-6)
    assert zp.item() == ref_zp
    assert zp.dtype == torch.int32
    # with these parameters the range end points are representable within half a step
    if not spec.symmetric:
        ends = fake_quantize(torch.tensor([lo, hi]), scale, zp, spec)
        assert ends.tolist() == pytest.approx([lo, hi], abs=scale.item() / 2 + 1e-6)


def test_qparams_range_extended_to_contain_zero():
    asym = QuantSpec(symmetric=False, signed=False)
    s_pos, z_pos = qparams_from_range(torch.tensor(1.0), torch.tensor(3.0), asym)
    s_ref, z_ref = qparams_from_range(torch.tensor(0.0), torch.tensor(3.0), asym)
    assert (s_pos.item(), z_pos.item()) == (s_ref.item(), z_ref.item())
    assert s_pos.item() == pytest.approx(3.0 / 255) and z_pos.item() == 0
    s_neg, z_neg = qparams_from_range(torch.tensor(-3.0), torch.tensor(-1.0), asym)
    assert s_neg.item() == pytest.approx(3.0 / 255) and z_neg.item() == 255
    # zero is exactly representable in both cases
    assert fake_quantize(torch.tensor(0.0), s_neg, z_neg, asym).item() == 0.0
    sym = QuantSpec()
    s_sym, _ = qparams_from_range(torch.tensor(-3.0), torch.tensor(-1.0), sym)
    assert s_sym.item() == pytest.approx(3.0 / 127)


@pytest.mark.parametrize("kw", [dict(), dict(symmetric=False, signed=False), dict(scale_type="power_of_two")])
def test_qparams_all_zero_range_gives_tiny_positive_scale(kw):
    spec = QuantSpec(**kw)
    scale, zp = qparams_from_range(torch.zeros(3), torch.zeros(3), spec)
    assert torch.isfinite(scale).all() and (scale > 0).all() and (scale < 1e-6).all()
    assert zp.tolist() == [0, 0, 0]
    out = fake_quantize(torch.zeros(3, 4), scale, zp, QuantSpec(**kw, granularity="per_channel"))
    assert torch.equal(out, torch.zeros(3, 4))


def test_qparams_per_channel_shapes():
    spec = QuantSpec(granularity="per_channel", narrow_range=True)
    scale, zp = qparams_from_range(torch.tensor([-1.0, -0.5, 0.0]), torch.tensor([0.5, 2.0, 1.27]), spec)
    assert scale.shape == (3,) and zp.shape == (3,)
    assert scale.tolist() == pytest.approx([1 / 127, 2 / 127, 1.27 / 127])


@pytest.mark.parametrize("lo, hi", [(-1.0, 1.0), (-0.3, 0.1), (-5.7, 3.2), (0.0, 1e-3), (-100.0, 7.0)])
@pytest.mark.parametrize("bits", [8, 4])
def test_power_of_two_scale_is_exact_and_not_smaller(lo, hi, bits):
    spec = QuantSpec(bits=bits, scale_type="power_of_two")
    float_spec = QuantSpec(bits=bits)
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    float_scale, _ = qparams_from_range(torch.tensor(lo), torch.tensor(hi), float_spec)
    mantissa, _ = math.frexp(scale.item())
    assert mantissa == 0.5  # an exact power of two
    assert float_scale.item() <= scale.item() < 2 * float_scale.item()
    assert zp.item() == 0
    # nothing in the range clips that would not clip with the float scale
    x = torch.linspace(lo, hi, 101)
    err = (fake_quantize(x, scale, zp, spec) - x).abs().max().item()
    assert err <= scale.item() / 2 + 1e-7


def test_power_of_two_scale_exact_power_stays():
    spec = QuantSpec(scale_type="power_of_two")
    scale, _ = qparams_from_range(torch.tensor(-127 * 0.125), torch.tensor(1.0), spec)
    assert scale.item() == 0.125


# --- STE and LSQ gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(symmetric=False, signed=False), dict(bits=4, narrow_range=True)])
def test_ste_gradient_is_one_inside_zero_outside(kw):
    spec = QuantSpec(**kw)
    qmin, qmax = spec.quant_range()
    scale = torch.tensor(0.1)
    zp = torch.tensor(0 if spec.symmetric else 20, dtype=torch.int32)
    lo, hi = (qmin - zp.item()) * 0.1, (qmax - zp.item()) * 0.1
    x = torch.linspace(lo - 3.03, hi + 3.03, 301).requires_grad_()
    fake_quantize(x, scale, zp, spec).sum().backward()
    inside = (x.detach() > lo + 0.051) & (x.detach() < hi - 0.051)
    outside = (x.detach() < lo - 0.051) | (x.detach() > hi + 0.051)
    assert inside.sum() > 10 and outside.sum() > 10
    assert torch.all(x.grad[inside] == 1.0)
    assert torch.all(x.grad[outside] == 0.0)


def ref_lsq_grad(x: np.ndarray, scale: float, zp: int, qmin: int, qmax: int) -> float:
    v = (x.astype(np.float32) / np.float32(scale)).astype(np.float64)
    r = ref_round(v, "half_even") + zp
    inside = (r >= qmin) & (r <= qmax)
    return float(np.where(inside, r - zp - v, np.clip(r, qmin, qmax) - zp).sum())


@pytest.mark.parametrize("kw, zp", [(dict(), 0), (dict(symmetric=False, signed=False), 100)])
def test_learnable_scale_gets_lsq_gradient(kw, zp):
    spec = QuantSpec(**kw)
    qmin, qmax = spec.quant_range()
    x = torch.randn(400, generator=torch.Generator().manual_seed(3)) * 3
    scale = torch.tensor(0.02, requires_grad=True)
    fake_quantize(x, scale, torch.tensor(zp), spec).sum().backward()
    grad = scale.grad.item()
    assert math.isfinite(grad) and grad != 0.0
    assert grad == pytest.approx(ref_lsq_grad(x.numpy(), 0.02, zp, qmin, qmax), rel=1e-4)


def test_grad_scale_multiplies_scale_gradient_only():
    spec = QuantSpec()
    x = (torch.randn(64, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_()
    grads = {}
    outs = {}
    for gs in (None, 0.25):
        scale = torch.tensor(0.01, requires_grad=True)
        xx = x.detach().clone().requires_grad_()
        y = fake_quantize(xx, scale, torch.tensor(0), spec, grad_scale=gs)
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        grads[gs] = (scale.grad.item(), xx.grad.clone())
        outs[gs] = y.detach()
    assert torch.equal(outs[None], outs[0.25])  # forward unchanged
    assert grads[None][0] != 0.0
    assert grads[0.25][0] == pytest.approx(0.25 * grads[None][0], rel=1e-6)
    assert torch.equal(grads[0.25][1], grads[None][1])  # input gradient unchanged


def test_per_channel_learnable_scale_gradient_shape():
    spec = QuantSpec(granularity="per_channel", ch_axis=0)
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    scale = torch.full((6,), 0.01, requires_grad=True)
    fake_quantize(w, scale, torch.zeros(6, dtype=torch.int32), spec).pow(2).sum().backward()
    assert scale.grad.shape == (6,)
    assert torch.isfinite(scale.grad).all() and (scale.grad != 0).all()


# --- sqnr ----------------------------------------------------------------------------------------------------------


def test_sqnr_db_reference_and_edge_cases():
    ref = torch.tensor([1.0, -2.0, 3.0])
    approx = torch.tensor([1.1, -2.0, 2.9])
    expected = 10 * math.log10((1 + 4 + 9) / (0.01 + 0.0 + 0.01))
    assert sqnr_db(ref, approx) == pytest.approx(expected, rel=1e-6)
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(torch.zeros(3), ref) == float("-inf")


@pytest.mark.parametrize("mode", list(RoundingMode))
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_fake_quantize_equals_the_autograd_path(mode, per_channel, dtype):
    """Without autograd, fake_quantize takes a two-buffer path: it must give the op-by-op values bit for bit."""
    g = torch.Generator().manual_seed(0)
    granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR
    spec = QuantSpec(rounding=mode, granularity=granularity, ch_axis=1, symmetric=per_channel)
    scale = torch.tensor([0.25, 0.125, 0.5]) if per_channel else torch.tensor(0.25)
    zero_point = torch.zeros(3 if per_channel else (), dtype=torch.int32) + (0 if per_channel else 3)
    x = torch.randn(4, 3, 50, generator=g, dtype=dtype) * 8
    x[:, :, :20] = torch.randint(-200, 200, (4, 3, 20), generator=g).to(dtype) / 8  # exact ties, both signs
    before = x.clone()
    with torch.no_grad():
        fast = fake_quantize(x, scale, zero_point, spec)
    assert torch.equal(x, before)  # the input is left alone
    slow = fake_quantize(x.clone().requires_grad_(True), scale, zero_point, spec).detach()
    if mode is RoundingMode.HALF_EVEN and dtype is torch.float32:
        slow = torch_fake_quantize(x, scale, zero_point, spec)  # the fused kernel is the reference there
    assert torch.equal(fast, slow)


def torch_fake_quantize(x, scale, zero_point, spec):
    qmin, qmax = spec.quant_range()
    zp = zero_point.to(torch.int32)
    if spec.per_channel:
        return torch.fake_quantize_per_channel_affine(x, scale, zp, spec.ch_axis % x.dim(), qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), qmin, qmax)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_no_grad_fast_path_is_bit_identical_to_torch_kernel(per_channel, symmetric, seed):
    """Without autograd on CPU, fake_quantize skips torch's fused kernel: same values bit for bit, for scales that
    are not powers of two (1/scale inexact), values on and around the kernel's rounding ties, and the clamp."""
    g = torch.Generator().manual_seed(seed)
    granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR
    spec = QuantSpec(granularity=granularity, ch_axis=0 if seed % 2 else 1, symmetric=symmetric)
    channels = 5
    scale = torch.rand(channels if per_channel else (), generator=g) * 0.1 + 1e-3
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    if not symmetric:
        zero_point = torch.randint(0, 60, scale.shape, generator=g, dtype=torch.int32)
    x = torch.randn(channels, channels, 400, generator=g) * 4
    shape = [1, 1, 1]
    shape[spec.ch_axis] = -1
    inverse = 1.0 / scale.reshape(shape if per_channel else ())  # the kernel's multiplier; ties are where it rounds
    ties = (torch.randint(-300, 300, (channels, channels, 100), generator=g) + 0.5) / inverse
    x[..., :100] = ties
    x[..., 100:200] = torch.nextafter(ties, torch.full_like(ties, math.inf))
    with torch.no_grad():
        fast = fake_quantize(x, scale, zero_point, spec)
    assert torch.equal(fast, torch_fake_quantize(x, scale, zero_point, spec))
    assert fast.min() < 0 and (fast == fast.max()).sum() > 1  # the clamp was reached


@pytest.mark.parametrize(
    "zero_point,symmetric,signed,scale", [(0, True, True, 0.02), (37, False, False, 0.013), (0, True, True, 2**-5)]
)
def test_training_fake_quant_on_cpu_matches_torch_kernel_bit_for_bit(zero_point, symmetric, signed, scale):
    """The vectorized per-tensor path QAT uses on CPU: same values and same clipped STE gradient as torch's fused
    kernel, ties and clipped values included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 33, 17, generator=g) * 3
    x[0, 0] = (torch.arange(33 * 17).reshape(33, 17) - 280) * scale / 2  # every half code: rounding ties
    spec = QuantSpec(symmetric=symmetric, signed=signed)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = fake_quantize(ours, torch.tensor(scale), torch.tensor(zero_point), spec)
    assert "CPUFakeQuantizeSTE" in type(y.grad_fn).__name__
    expected = torch.fake_quantize_per_tensor_affine(ref, scale, zero_point, *spec.quant_range())
    weights = torch.randn(x.shape, generator=g)
    (y * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.equal(y, expected) and torch.equal(ours.grad, ref.grad)


def test_training_fake_quant_per_channel_on_cpu_matches_torch_kernel_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.3
    scale = w.abs().flatten(1).amax(1) / 127
    w[0, 0] = (torch.arange(9).reshape(3, 3) - 4) * scale[0] / 2  # ties
    zero = torch.zeros(16, dtype=torch.int32)
    spec = QuantSpec(granularity=Granularity.PER_CHANNEL, ch_axis=0)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    y = fake_quantize(ours, scale, zero, spec)
    assert "CPUFakeQuantizeSTE" in type(y.grad_fn).__name__
    expected = torch.fake_quantize_per_channel_affine(ref, scale, zero, 0, *spec.quant_range())
    weights = torch.randn(w.shape, generator=g)
    (y * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.equal(y, expected) and torch.equal(ours.grad, ref.grad)


@pytest.mark.parametrize("seed", range(6))
def test_training_fake_quant_gradient_mask_edges_match_torch_kernel(seed):
    """Per tensor, the backward keeps the gradient on an open interval of inputs found from the scale: on the
    inputs just inside and just outside each end of it (the last and first float32 that round into the range, and
    the exact ties there), the gradient is torch's fused kernel's, for random scales and zero points."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((), generator=g) * 0.05 + 1e-3
    signed = seed % 2 == 0
    spec = QuantSpec(symmetric=signed, signed=signed)
    qmin, qmax = spec.quant_range()
    zero_point = torch.tensor(0 if signed else int(torch.randint(0, 100, (), generator=g)))
    inverse = 1.0 / scale
    ends = torch.tensor([qmin - zero_point.item() - 0.5, qmax - zero_point.item() + 0.5]) / inverse  # the ties
    near = [ends]
    for direction in (-math.inf, math.inf):  # four floats either side of each end
        step = ends
        for _ in range(4):
            step = torch.nextafter(step, torch.full_like(step, direction))
            near.append(step)
    x = torch.cat([*near, torch.randn(200, generator=g) * 200 * scale])
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = fake_quantize(ours, scale, zero_point, spec)
    expected = torch.fake_quantize_per_tensor_affine(ref, scale, zero_point.to(torch.int32), qmin, qmax)
    y.backward(torch.ones_like(y))
    expected.backward(torch.ones_like(expected))
    assert torch.equal(y, expected) and torch.equal(ours.grad, ref.grad)
    assert 0 < ours.grad.sum() < len(x)  # both kinds of inputs were there


@pytest.mark.parametrize("narrow_range", [False, True])
@pytest.mark.parametrize("zero_points", ["zero", "random"])
def test_training_fake_quant_per_channel_mask_edges_match_torch_kernel(narrow_range, zero_points):
    """Per channel: with every zero point 0 the backward keeps the gradient on one interval of the scaled input for
    all channels (otherwise a mask is recorded); on the inputs at and around each channel's rounding ties at both ends
    of the code range, values and gradient are torch's fused kernel's."""
    g = torch.Generator().manual_seed(3)
    channels = 6
    scale = torch.rand(channels, generator=g) * 0.05 + 1e-3
    spec = QuantSpec(granularity=Granularity.PER_CHANNEL, ch_axis=0, narrow_range=narrow_range)
    qmin, qmax = spec.quant_range()
    zero_point = torch.zeros(channels, dtype=torch.int32)
    if zero_points == "random":
        zero_point = torch.randint(-20, 20, (channels,), generator=g, dtype=torch.int32)
    inverse = (1.0 / scale)[:, None]
    ties = torch.stack([qmin - zero_point - 0.5, qmax - zero_point + 0.5], 1).float() / inverse
    near = [ties]
    for direction in (-math.inf, math.inf):
        step = ties
        for _ in range(3):
            step = torch.nextafter(step, torch.full_like(step, direction))
            near.append(step)
    w = torch.cat([*near, torch.randn(channels, 50, generator=g) * 150 * scale[:, None]], 1)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    y = fake_quantize(ours, scale, zero_point, spec)
    expected = torch.fake_quantize_per_channel_affine(ref, scale, zero_point, 0, qmin, qmax)
    y.backward(torch.ones_like(y))
    expected.backward(torch.ones_like(expected))
    assert torch.equal(y, expected) and torch.equal(ours.grad, ref.grad)
    assert 0 < ours.grad.sum() < w.numel()
