"""Entropy (KL-divergence) range estimator: TensorRT's INT8 calibration on the histogram of ``|x|``.

For every candidate threshold ``i`` (in bins, from ``L`` to the last non-empty bin) the reference distribution
``P`` is the first ``i`` bins with all outliers added to bin ``i - 1``; the candidate ``Q`` merges those ``i`` bins
into ``L`` levels and spreads each level's mass evenly over its non-empty bins. The threshold minimizing
``KL(P || Q)`` wins (the largest on ties) and is ``i`` bin widths (Migacz, "8-bit Inference with TensorRT",
GTC 2017; NVIDIA pytorch-quantization's ``_compute_amax_entropy``). ``L`` is the number of levels on one side:
``2^(bits-1)`` for signed specs, ``2^bits`` for unsigned ones. The divergences of all candidates are computed
from prefix sums (``O(candidates x L)``), not bin by bin, in blocks of candidates whose temporaries stay in
the CPU cache.

The histogram's first bin, ``[0, w)``, is left out of the search: it holds the exact zeros of a ReLU (most of a
post-ReLU tensor), which any grid represents without error, and whose spike would otherwise always pick the smallest
candidate. Asymmetric specs use the same ``|x|`` threshold on both sides (clipped to the observed min/max), which
suits post-ReLU activations. Per-channel specs (weights) fall back to the per-channel min/max.

Example:
    >>> import torch
    >>> from lightning_quant.config import QuantSpec
    >>> obs = EntropyObserver(QuantSpec(observer="entropy"))
    >>> x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    >>> _ = obs(torch.cat([x, torch.tensor([40.0])]))  # one far outlier
    >>> lo, hi = obs.clipped_range()
    >>> bool(hi < 10)
    True
"""

from __future__ import annotations

import functools

import torch

from lightning_quant.quantizers.histogram import HistogramObserver

__all__ = ["EntropyObserver", "kl_divergences", "kl_threshold_bins"]

_BLOCK = 64  # candidates per block: (64, L + 1, 2) float64 gathers, ~260 KB at L = 256


def _xlogx(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t * torch.log(torch.where(t > 0, t, 1.0)), 0.0)


def kl_divergences(counts: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(P_i || Q_i)`` for every candidate ``i`` in ``levels .. len(counts)``; returns ``(candidates, kl)``.

    Example:
        >>> i, kl = kl_divergences(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 1.0]), levels=2)
        >>> i.tolist(), [round(v, 4) for v in kl.tolist()]
        ([2, 3, 4, 5, 6], [0.0872, 0.0579, 0.0158, inf, 0.0309])

    Raises:
        ValueError: ``levels`` < 1.
    """
    if levels < 1:
        raise ValueError(f"levels={levels} must be >= 1 (the number of quantization levels on one side).")
    h = counts.double()
    n, device = h.numel(), h.device
    cand, bounds = _group_bounds(n, levels, str(device))
    total = h.sum()
    zero = torch.zeros(1, 2, dtype=h.dtype, device=device)
    prefix = torch.cat([zero, torch.cumsum(torch.stack([h, (h > 0).double()], 1), 0)])  # mass, non-empty bins
    kept = prefix[cand, 0]  # H_i, mass of the first i bins
    outliers = total - kept
    cross = torch.empty_like(kept)  # sum_g P_g log Q_g, one block of candidates at a time
    for start in range(0, cand.numel(), _BLOCK):
        at_bounds = prefix[bounds[start : start + _BLOCK]]  # one gather, then differences along the groups
        groups = at_bounds[:, 1:] - at_bounds[:, :-1]
        group_sum, group_nz = groups[..., 0], groups[..., 1]  # (block, L): S_g and N_g
        log_q = torch.log(group_sum.clamp_min(1e-300)).sub_(torch.log(group_nz.clamp_min(1.0)))
        log_q.masked_fill_(group_sum <= 0, 0.0)
        # P equals S except in the last group, which also holds the outliers
        cross[start : start + _BLOCK] = (group_sum * log_q).sum(1) + outliers[start : start + _BLOCK] * log_q[:, -1]
    last = h[cand - 1] + outliers  # P_{i-1}
    cxlogx = torch.cat([h.new_zeros(1), torch.cumsum(_xlogx(h), 0)])
    plogp = cxlogx[cand - 1] + _xlogx(last)
    kl = (plogp - cross) / total - torch.log(total) + torch.log(kept.clamp_min(1e-300))
    impossible = (kept <= 0) | ((h[cand - 1] == 0) & (outliers > 0))  # Q is 0 where P is not
    return cand.clone(), torch.where(impossible, torch.inf, kl.clamp_min(0.0))  # the cached candidates stay intact


@functools.lru_cache(maxsize=8)
def _group_bounds(n: int, levels: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates ``levels .. n`` and each one's group boundaries ``ceil(g i / L)``, ``(M, L + 1)``.

    They depend on the histogram's size only, and every quantizer of a model has the same, so they are built once.
    The float division is exact here: ``g i`` and ``L`` are integers far below 2^53, and a non-integer quotient
    stays at least ``1 / L`` away from the next integer.
    """
    cand = torch.arange(levels, n + 1, device=device)
    g = torch.arange(levels + 1, device=device, dtype=torch.float64)
    return cand, torch.ceil(g[None, :] * cand[:, None].double() / levels).long()


def kl_threshold_bins(counts: torch.Tensor, levels: int) -> int:
    """The number of bins to keep (TensorRT's threshold index), the largest among equally good candidates.

    Example:
        >>> kl_threshold_bins(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 1.0]), levels=2)
        4
        >>> kl_threshold_bins(torch.tensor([5.0, 1.0]), levels=4)  # fewer bins than levels: keep everything
        2

    Raises:
        ValueError: ``levels`` < 1.
    """
    if counts.numel() <= levels:
        if levels < 1:
            raise ValueError(f"levels={levels} must be >= 1 (the number of quantization levels on one side).")
        return counts.numel()
    cand, kl = kl_divergences(counts, levels)
    best = kl.numel() - 1 - int(torch.argmin(kl.flip(0)).item())
    return int(cand[best].item())


class EntropyObserver(HistogramObserver):
    """TensorRT-style KL-divergence threshold on ``|x|``.

    Args:
        spec: the spec being estimated.
        num_channels: channel count for per-channel specs (these use the per-channel min/max).
        bins: histogram bins.

    Raises:
        ValueError: see :class:`~lightning_quant.quantizers.histogram.HistogramObserver`.
        FloatingPointError: NaN or inf in an observed tensor.
    """

    def levels(self) -> int:
        """Quantization levels on one side of zero: ``2^(bits-1)`` signed, ``2^bits`` unsigned."""
        return 2 ** (self.spec.bits - 1) if self.spec.signed else 2**self.spec.bits

    def clipped_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, width = self.abs_histogram()
        # from the second bin on (module docstring): with a ReLU's zeros in P the smallest candidate always won
        amax = min((kl_threshold_bins(counts[1:], self.levels()) + 1) * width, self.observed_amax())
        lo, hi = max(self.min_val.item(), -amax), min(self.max_val.item(), amax)
        return torch.tensor(lo, device=self.min_val.device), torch.tensor(hi, device=self.min_val.device)
