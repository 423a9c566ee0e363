"""Percentile range estimator: clip at a percentile of the observed distribution, read from the histogram.

Symmetric specs clip ``|x|`` at ``spec.percentile`` (default 99.99); asymmetric specs clip the lower tail at
``100 - percentile`` and the upper tail at ``percentile``. Within a bin the distribution is taken as uniform
(linear interpolation of the cumulative histogram), so the estimate is within one bin width of the exact
percentile of everything observed. Per-channel specs (weights) fall back to the per-channel min/max.

Example:
    >>> import torch
    >>> from lightning_quant.config import QuantSpec
    >>> obs = PercentileObserver(QuantSpec(observer="percentile", percentile=99.0))
    >>> _ = obs(torch.cat([torch.linspace(-1, 1, 9901), torch.full((99,), 50.0)]))  # 1% outliers at 50
    >>> lo, hi = obs.clipped_range()
    >>> round(lo.item(), 1), round(hi.item(), 1)  # within one bin width (51 / 2046) of the exact percentile
    (-1.0, 1.0)
"""

from __future__ import annotations

import torch

from lightning_quant.quantizers.histogram import HistogramObserver

__all__ = ["PercentileObserver", "histogram_quantile"]


def histogram_quantile(counts: torch.Tensor, first_edge: float, width: float, q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) of a histogram with uniform bins, interpolating within a bin.

    Example:
        >>> histogram_quantile(torch.tensor([1.0, 1.0, 2.0]), 0.0, 1.0, 0.5)  # half the mass lies below 2.0
        2.0

    Raises:
        ValueError: an empty histogram or ``q`` outside [0, 1].
    """
    total = float(counts.sum())
    if total <= 0.0 or not 0.0 <= q <= 1.0:
        raise ValueError(f"histogram_quantile needs a non-empty histogram and q in [0, 1]; got q={q!r}, total={total}")
    cdf = torch.cumsum(counts.to(torch.float64), 0)
    target = torch.tensor([q * total], dtype=torch.float64, device=cdf.device)
    k = min(int(torch.searchsorted(cdf, target).item()), counts.numel() - 1)
    before = cdf[k - 1].item() if k > 0 else 0.0
    inside = counts[k].item()
    frac = (q * total - before) / inside if inside > 0 else 0.0
    return first_edge + (k + min(max(frac, 0.0), 1.0)) * width


class PercentileObserver(HistogramObserver):
    """Clip at ``spec.percentile`` of ``|x|`` (symmetric) or of both tails (asymmetric).

    Args:
        spec: the spec being estimated; ``spec.percentile`` in (50, 100] is validated by ``QuantSpec``.
        num_channels: channel count for per-channel specs (these use the per-channel min/max).
        bins: histogram bins.

    Raises:
        ValueError: see :class:`~lightning_quant.quantizers.histogram.HistogramObserver`.
        FloatingPointError: NaN or inf in an observed tensor.
    """

    def clipped_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = float(self.spec.percentile) / 100.0
        if self.spec.symmetric:
            counts, width = self.abs_histogram()
            amax = min(histogram_quantile(counts, 0.0, width, q), self.observed_amax())
            lo, hi = max(self.min_val.item(), -amax), min(self.max_val.item(), amax)
        else:
            first_edge = self.bin_offset.item() * self.bin_width.item()
            counts, width = self.histogram.to(torch.float64), self.bin_width.item()
            lo = max(histogram_quantile(counts, first_edge, width, 1.0 - q), self.min_val.item())
            hi = min(histogram_quantile(counts, first_edge, width, q), self.max_val.item())
        return torch.tensor(lo, device=self.min_val.device), torch.tensor(hi, device=self.min_val.device)
