"""The Vitis AI DPU's fixed-point scheme: fix positions, their selection, and the observers that calibrate them.

A DPU tensor holds ``q * 2**-fix_point`` with ``q = clamp(round(x * 2**fix_point), -128, 127)``. Activations
round with XIR's ``DPU_ROUND`` (half up: ``floor(x + 0.5)``), weights and biases with ``std::round`` (half
away from zero). A position is chosen from the overflow-safe one, ``floor(log2(1 / max(min / -128.5,
max / 127.5)))``, and the next four: the one with the least squared quantization error wins. Network inputs
keep the overflow-safe position. An activation's position over calibration batches is the most frequent
per-batch choice, counted in a fixed-size buffer (one slot per position in ``[MIN_FIX_POS, MAX_FIX_POS]``).

Example:
    >>> import torch
    >>> from lightning_quant.config import RoundingMode
    >>> x = torch.tensor([-1.0, 0.3, 0.9])
    >>> overflow_safe_fix_pos(x.min(), x.max())
    7
    >>> best_fix_pos(x, rounding=RoundingMode.HALF_UP)
    7
    >>> fix_quantize(torch.tensor([0.3]), 7, RoundingMode.HALF_UP).item() * 128   # code 38
    38.0
"""

from __future__ import annotations

import math

import torch

from lightning_quant.config import QuantSpec, RoundingMode, ScaleType
from lightning_quant.quantizers.functional import round_tensor
from lightning_quant.quantizers.minmax import Observer

__all__ = [
    "CANDIDATES",
    "MAX_FIX_POS",
    "MIN_FIX_POS",
    "SEARCH_SAMPLE",
    "DPUFixPosObserver",
    "DPUInputFixPosObserver",
    "best_fix_pos",
    "fix_pos_from_scale",
    "fix_quantize",
    "overflow_safe_fix_pos",
]

# Positions are kept in [MIN_FIX_POS, MAX_FIX_POS]. 12 is the cap: an all-zero tensor (a zero bias, a dead
# ReLU output) has an infinite overflow-safe position, and with 8 bits 2**-12 * 127 = 0.031 still resolves the
# small weights of trained nets; the DPU's shift checks (shift_cut, shift_bias <= 16) keep positions in a
# similar window. -16 lets int8 values reach 127 * 2**16 (8.3e6), far beyond any sane activation.
MIN_FIX_POS = -16
MAX_FIX_POS = 12
CANDIDATES = 5  # the overflow-safe position and the next four
SEARCH_SAMPLE = 1 << 20  # best_fix_pos searches larger tensors on an estimate from this many values


def _signed_bounds(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def overflow_safe_fix_pos(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, bits: int = 8, max_fix_pos: int = MAX_FIX_POS
) -> int:
    """The largest position at which ``[min_val, max_val]`` rounds into the signed ``bits``-bit range.

    ``floor(log2(1 / step))`` with ``step = max(min / (qmin - 0.5), max / (qmax + 0.5))``; an all-zero range
    gives ``max_fix_pos``. The result is clamped to ``[MIN_FIX_POS, max_fix_pos]``.

    Example:
        >>> overflow_safe_fix_pos(-1.0, 1.0), overflow_safe_fix_pos(0.0, 0.0), overflow_safe_fix_pos(-2.0, 0.5)
        (6, 12, 6)
    """
    qmin, qmax = _signed_bounds(bits)
    step = max(float(min_val) / (qmin - 0.5), float(max_val) / (qmax + 0.5), 0.0)
    if step <= 0.0:
        return max_fix_pos
    return int(min(max(math.floor(math.log2(1.0 / step)), MIN_FIX_POS), max_fix_pos))


def fix_quantize(x: torch.Tensor, fix_pos: int, rounding: RoundingMode, bits: int = 8) -> torch.Tensor:
    """``clamp(round(x * 2**fix_pos), qmin, qmax) * 2**-fix_pos``, XIR's ``fix`` op (float in, float out).

    Example:
        >>> fix_quantize(torch.tensor([-0.3125, 0.3125, 9.0]), 3, RoundingMode.HALF_UP).tolist()  # ties at +-2.5
        [-0.25, 0.375, 9.0]
        >>> fix_quantize(torch.tensor([-0.3125]), 3, RoundingMode.HALF_AWAY).tolist()
        [-0.375]
    """
    qmin, qmax = _signed_bounds(bits)
    scale = 2.0**fix_pos
    return torch.clamp(round_tensor(x.float() * scale, rounding), qmin, qmax) / scale


def best_fix_pos(
    x: torch.Tensor,
    bits: int = 8,
    rounding: RoundingMode = RoundingMode.HALF_UP,
    candidates: int = CANDIDATES,
    max_fix_pos: int = MAX_FIX_POS,
    sample: int | None = SEARCH_SAMPLE,
) -> int:
    """The position with the least squared error among the overflow-safe one and the next ``candidates - 1``.

    Ties keep the lower (wider-range) position. Candidates above ``max_fix_pos`` are not tried.

    Tensors with more than ``sample`` elements (a 224 px activation batch holds tens of millions) are searched on
    an estimate: the values that any candidate could clip, exactly, plus a fixed pseudo-random sample of
    ``sample`` of the rest, scaled up. The start position still comes from the whole tensor's range. The full
    search costs five ops over the whole tensor per candidate (85 % of a 224 px DPU calibration); the estimate
    about five ops in all (10x faster on a 38M-value batch). ``sample=None`` searches every element, as Vitis AI does.

    Example:
        >>> x = torch.tensor([0.0029296875] * 100 + [0.52])
        >>> overflow_safe_fix_pos(x.min(), x.max()), best_fix_pos(x)  # clipping 0.52 costs less than coarse codes
        (7, 8)
        >>> best_fix_pos(torch.zeros(3))
        12
    """
    x = x.detach().float().flatten()
    lo, hi = torch.aminmax(x)
    start = overflow_safe_fix_pos(lo, hi, bits, max_fix_pos)
    stop = min(start + candidates, max_fix_pos + 1)
    if sample is not None and x.numel() > sample and stop > start + 1:
        parts = _search_parts(x, start, bits, sample)
    else:
        parts = [(x, 1.0)]
    qmin, qmax = _signed_bounds(bits)
    best, best_err = start, math.inf
    for pos in range(start, stop):
        err = 0.0
        for values, weight in parts:
            # In code units: x * 2**pos is exact, and so is round(v) - v. Every rounding mode leaves the same error
            # (a tie is half a code away either way, and the clamp bounds are integers), so torch.round (one fused
            # kernel) stands in for ``rounding`` here: 3x faster than fix_quantize, the same positions.
            scaled = values * 2.0**pos
            diff = torch.clamp(torch.round(scaled), qmin, qmax).sub_(scaled)
            err += weight * torch.sum(diff.mul_(diff), dtype=torch.float64).item()
        err *= 4.0**-pos
        if err < best_err:
            best, best_err = pos, err
    return best


def _search_parts(x: torch.Tensor, start: int, bits: int, sample: int) -> list[tuple[torch.Tensor, float]]:
    """``[(values, weight)]`` whose weighted squared errors estimate the whole tensor's at every candidate.

    Values a candidate above ``start`` could clip (beyond half the ``start`` range) are kept whole; the rest,
    whose error is rounding only, are represented by ``sample`` of them drawn with a fixed seed.
    """
    qmin, qmax = _signed_bounds(bits)
    step = 2.0 ** -(start + 1)

    def clippable(v: torch.Tensor) -> torch.Tensor:
        return (v > (qmax - 0.5) * step) | (v < (qmin + 0.5) * step)

    outer = x[clippable(x)]
    inner_count = x.numel() - outer.numel()
    generator = torch.Generator(device=x.device).manual_seed(0)
    picks = x[torch.randint(x.numel(), (sample,), generator=generator, device=x.device)]
    picks = picks[~clippable(picks)]
    if picks.numel() == 0:
        return [(outer, 1.0)]
    return [(outer, 1.0), (picks, inner_count / picks.numel())]


def fix_pos_from_scale(scale: torch.Tensor | float) -> int:
    """The fix position of a power-of-two scale: ``-log2(scale)``.

    Example:
        >>> fix_pos_from_scale(0.0078125)
        7

    Raises:
        ValueError: ``scale`` is not a positive power of two (the quantizer is not a DPU quantizer).
    """
    value = float(scale.flatten()[0]) if isinstance(scale, torch.Tensor) else float(scale)
    if value <= 0.0 or not math.isfinite(value):
        raise ValueError(f"scale {value!r} is not a positive power of two; quantize with target='dpu'.")
    mantissa, exponent = math.frexp(value)
    if mantissa != 0.5:
        raise ValueError(f"scale {value!r} is not a power of two; the DPU needs power-of-two scales (target='dpu').")
    return 1 - exponent


class DPUFixPosObserver(Observer):
    """DPU fix positions: per observed tensor the least-squared-error position, over tensors the most frequent one.

    Parameters (weights, biases) are searched on every element; activation batches larger than ``SEARCH_SAMPLE``
    on :func:`best_fix_pos`'s estimate.

    State (fixed-size buffers, saved in checkpoints): ``min_val``/``max_val`` (for reports) and ``pos_counts``,
    how often each position in ``[MIN_FIX_POS, MAX_FIX_POS]`` won. Needs a per-tensor, symmetric, signed,
    power-of-two spec.

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> obs = DPUFixPosObserver(scheme_for_target("dpu").activation)
        >>> for v in (1.5, 1.5, 4.0):  # positions 6, 6, 5
        ...     _ = obs(torch.tensor([-v, v / 3]))
        >>> obs.fix_pos(), obs.calculate_qparams()[0].item()
        (6, 0.015625)

    Raises:
        ValueError: a per-channel, asymmetric, unsigned or float-scale spec.
    """

    safe_only = False
    input_observer = "dpu_pot_input"

    def __init__(self, spec: QuantSpec, num_channels: int | None = None) -> None:
        super().__init__(spec, num_channels)
        if spec.per_channel or not spec.symmetric or not spec.signed or spec.scale_type is not ScaleType.POWER_OF_TWO:
            raise ValueError(
                f"observer {spec.observer!r} computes DPU fix positions for per-tensor, symmetric, signed, "
                "power-of-two specs; use scheme_for_target('dpu') or another observer."
            )
        self.register_buffer("pos_counts", torch.zeros(MAX_FIX_POS - MIN_FIX_POS + 1, dtype=torch.int64))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_range(x)
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))
        if self.safe_only:
            pos = overflow_safe_fix_pos(lo, hi, self.spec.bits)
        else:  # parameters (observed once; weights must match Vitis AI bit for bit) get the full search
            sample = None if isinstance(x, torch.nn.Parameter) else SEARCH_SAMPLE
            pos = best_fix_pos(x, self.spec.bits, self.spec.rounding, sample=sample)
        self.pos_counts[pos - MIN_FIX_POS] += 1

    def fix_pos(self) -> int:
        """The most frequent position so far (the lower one on a tie)."""
        return int(torch.argmax(self.pos_counts).item()) + MIN_FIX_POS

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.tensor(2.0 ** -self.fix_pos(), device=self.pos_counts.device)
        return scale, torch.zeros((), dtype=torch.int32, device=scale.device)

    def reset(self) -> None:
        super().reset()
        self.pos_counts.zero_()

    def sync_tensors(self, phase: int) -> list[tuple[torch.Tensor, str]]:
        """The range (phase 0) and the position votes of all ranks, summed (phase 1)."""
        return super().sync_tensors(phase) + ([(self.pos_counts, "sum")] if phase == 1 else [])


class DPUInputFixPosObserver(DPUFixPosObserver):
    """For network inputs: the overflow-safe position per batch (no error search), most frequent over batches.

    ``prepare()`` gives network inputs this observer when the activation spec names ``dpu_pot``.

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> obs = DPUInputFixPosObserver(scheme_for_target("dpu").activation)
        >>> _ = obs(torch.tensor([-1.0, 0.01])); obs.fix_pos()
        7
    """

    safe_only = True
