"""MSE range estimator: the clipping range that minimizes the expected squared quantization error.

Candidates shrink the observed range ``[min(min, 0), max(max, 0)]`` by ``c`` for 100 values of ``c`` from 1 down
to 0.01. Each candidate goes through :func:`~lightning_quant.quantizers.functional.qparams_from_range` with the
spec (bits, signed/symmetric range, narrow range, zero point, power-of-two scales), and its error is computed
in closed form from the histogram, taking values as uniform within a bin: rounding noise inside the clipping
range (the exact integral of the sawtooth ``(x - round(x / s) s)^2``) plus the clipping error outside it.
Ties keep the wider range.

Per-channel specs (weights) search per channel directly on the observed tensor: the same candidates per
channel, the exact error of :func:`~lightning_quant.quantizers.functional.quantize` summed over the channel. The
search reruns only when the tensor changes (weights are observed once per calibration batch, unchanged).

Example:
    >>> import torch
    >>> from lightning_quant.config import QuantSpec
    >>> obs = MSEObserver(QuantSpec(observer="mse", bits=4))
    >>> x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    >>> _ = obs(x)
    >>> lo, hi = obs.clipped_range()
    >>> bool(hi < x.abs().max())  # clipping the Gaussian tails beats the full range at 4 bits
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lightning_quant.quantizers.functional import dequantize, qparams_from_range, quantize
from lightning_quant.quantizers.histogram import DEFAULT_BINS, HistogramObserver

__all__ = ["MSEObserver", "NUM_CANDIDATES", "expected_quant_error"]

NUM_CANDIDATES = 100


def _cumulative_moments(
    counts: torch.Tensor, first_edge: float, width: float, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, sum and sum of squares of the values below ``t``, each bin holding its mass uniformly."""
    n = counts.numel()
    a = first_edge + width * torch.arange(n, dtype=torch.float64, device=counts.device)
    b = a + width
    zero = torch.zeros(1, dtype=torch.float64, device=counts.device)
    c0 = torch.cat([zero, torch.cumsum(counts, 0)])
    c1 = torch.cat([zero, torch.cumsum(counts * (a + b) / 2.0, 0)])
    c2 = torch.cat([zero, torch.cumsum(counts * (a * a + a * b + b * b) / 3.0, 0)])
    t = t.clamp(first_edge, first_edge + n * width)
    j = torch.floor((t - first_edge) / width).long().clamp_(0, n - 1)
    lo, dens = a[j], counts[j] / width
    return (
        c0[j] + dens * (t - lo),
        c1[j] + dens * (t * t - lo * lo) / 2.0,
        c2[j] + dens * (t**3 - lo**3) / 3.0,
    )


def expected_quant_error(
    counts: torch.Tensor, first_edge: float, width: float, scale: torch.Tensor, zero_point: torch.Tensor, spec: Any
) -> torch.Tensor:
    """Expected total squared error of quantizing a histogram, one value per candidate ``(scale, zero_point)``.

    Every value goes to its nearest grid point ``(q - zero_point) * scale``, ``q`` in ``spec.quant_range()``; values
    beyond the end points clip to them. With the cumulative moments of the histogram (uniform within a bin), the
    error of each grid point's cell ``sum (x - g)^2`` is ``S2 - 2 g S1 + g^2 S0``: ``O(candidates x levels)`` work.

    Example:
        >>> from lightning_quant.config import QuantSpec
        >>> spec = QuantSpec(bits=8)  # grid -1.28 .. 1.27 in steps of 0.01
        >>> err = expected_quant_error(torch.tensor([1.0]), 0.0, 1.0, torch.tensor([0.01]), torch.tensor([0]), spec)
        >>> round(err.item() / (0.01**2 / 12), 3)  # uniform rounding noise (step^2 / 12) on [0, 1]
        1.0
    """
    qmin, qmax = spec.quant_range()
    q = torch.arange(qmin, qmax + 1, dtype=torch.float64, device=counts.device)
    grid = (q[None, :] - zero_point.double().reshape(-1, 1).to(counts.device)) * scale.double().reshape(-1, 1).to(
        counts.device
    )
    inf = torch.full_like(grid[:, :1], float("inf"))
    bounds = torch.cat([-inf, (grid[:, 1:] + grid[:, :-1]) / 2.0, inf], dim=1)  # cell edges, outer cells unbounded
    s0, s1, s2 = _cumulative_moments(counts.double(), first_edge, width, bounds)
    d0, d1, d2 = s0.diff(dim=1), s1.diff(dim=1), s2.diff(dim=1)
    return (d2 - 2.0 * grid * d1 + grid * grid * d0).clamp_min(0.0).sum(dim=1)


def _candidate_ranges(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(candidates, *lo.shape)`` shrunk ranges ``c * [lo, hi]``, ``c`` from 1 down to 0.01."""
    c = torch.linspace(1.0, 1.0 / NUM_CANDIDATES, NUM_CANDIDATES, device=lo.device)
    c = c.reshape(-1, *([1] * lo.dim()))
    return c * lo.float(), c * hi.float()


class MSEObserver(HistogramObserver):
    """Pick the clipping range with the lowest expected squared quantization error.

    Args:
        spec: the spec being estimated.
        num_channels: channel count for per-channel specs (searched on the tensor itself).
        bins: histogram bins (per-tensor specs).

    Raises:
        ValueError: see :class:`~lightning_quant.quantizers.histogram.HistogramObserver`.
        FloatingPointError: NaN or inf in an observed tensor.
    """

    def __init__(self, spec: Any, num_channels: int | None = None, *, bins: int = DEFAULT_BINS) -> None:
        super().__init__(spec, num_channels, bins=bins)
        shape = (num_channels,) if spec.per_channel else (0,)
        self.register_buffer("clip_min", torch.zeros(shape))
        self.register_buffer("clip_max", torch.zeros(shape))
        self._searched: tuple | None = None  # fingerprint of the last tensor searched (not state: a cache)

    def clipped_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.per_channel:
            return self.clip_min.clone(), self.clip_max.clone()
        lo, hi = self._span()
        cand_lo, cand_hi = _candidate_ranges(torch.tensor(lo), torch.tensor(hi))
        scale, zero_point = qparams_from_range(cand_lo, cand_hi, self.spec)
        first_edge = self.bin_offset.item() * self.bin_width.item()
        counts = self.histogram.to(torch.float64)
        errors = expected_quant_error(counts, first_edge, self.bin_width.item(), scale, zero_point, self.spec)
        best = int(torch.argmin(errors).item())  # first minimum: the widest of equally good ranges
        return cand_lo[best].to(self.min_val.device), cand_hi[best].to(self.min_val.device)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.per_channel and self.initialized:
            return qparams_from_range(self.clip_min, self.clip_max, self.spec)
        return super().calculate_qparams()

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        if self.spec.per_channel:
            self._search_per_channel(x.detach().float())

    def _search_per_channel(self, x: torch.Tensor) -> None:
        """Per-channel grid search on ``x``; the first (widest) candidate wins ties."""
        axis = self.spec.ch_axis % x.dim()
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        key = (tuple(flat.shape), flat.device, flat.double().sum().item(), flat.double().square().sum().item())
        if key == self._searched:
            return
        lo = torch.minimum(self.min_val, torch.zeros_like(self.min_val))
        hi = torch.maximum(self.max_val, torch.zeros_like(self.max_val))
        cand_lo, cand_hi = _candidate_ranges(lo, hi)
        best_err = torch.full_like(lo, float("inf"), dtype=torch.float64)
        spec = dataclasses.replace(self.spec, ch_axis=0)  # ``flat`` has the channels first
        for c_lo, c_hi in zip(cand_lo, cand_hi, strict=True):
            scale, zero_point = qparams_from_range(c_lo, c_hi, spec)
            approx = dequantize(quantize(flat, scale, zero_point, spec), scale, zero_point, spec)
            err = (approx - flat).double().square().sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            self.clip_min.copy_(torch.where(better, c_lo, self.clip_min))
            self.clip_max.copy_(torch.where(better, c_hi, self.clip_max))
        self._searched = key

    def reset(self) -> None:
        super().reset()
        self.clip_min.zero_()
        self.clip_max.zero_()
        self._searched = None
