"""Memory-bounded histogram observer: the shared base of the ``percentile``, ``mse`` and ``entropy`` estimators.

The histogram has a fixed number of bins on a grid anchored at 0 (bin ``k`` covers ``[k w, (k + 1) w)``), and
its window always contains 0, as the quantized range does. The bin width ``w`` is always a power of two. When
new data falls outside the window, the width doubles as often as needed and old bins merge exactly into the new
ones (grid edges stay aligned), so no activation is ever stored and the state is three fixed-shape buffers:
``histogram`` (int64 counts), ``bin_width`` and ``bin_offset`` (index of the first bin), plus the running
``min_val``/``max_val``. Counts are integers, so the state, and every estimate computed from it, is
bit-identical for the same input. Power-of-two widths make any two grids nest, so histograms from several
ranks merge exactly (:meth:`HistogramObserver.sync_tensors`, used by distributed calibration).

Per-channel specs (weights) keep only the per-channel running min/max; subclasses decide what to do with it.

Example:
    >>> import torch
    >>> from lightning_quant.config import QuantSpec
    >>> obs = HistogramObserver(QuantSpec(), bins=16)
    >>> _ = obs(torch.tensor([-1.0, 0.5, 3.0])); _ = obs(torch.tensor([10.0]))  # the second batch grows the range
    >>> tuple(obs.histogram.shape), int(obs.histogram.sum())
    ((16,), 4)
    >>> edges = obs.bin_edges(); bool(edges[0] <= -1.0 and edges[-1] > 10.0)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_quant.quantizers.functional import qparams_from_range
from lightning_quant.quantizers.minmax import Observer

__all__ = ["DEFAULT_BINS", "HistogramObserver", "bin_counts"]

DEFAULT_BINS = 2048
_MIN_BINS = 16
_CHUNK = 1 << 20  # elements binned per pass on CPU (4 MB of float32: stays in cache)
_TINY_WIDTH = 2.0**-40  # width used while everything seen is exactly 0; doubling grows it when real data arrives


def bin_counts(x: torch.Tensor, width: float, offset: int, bins: int) -> torch.Tensor:
    """Counts of ``x`` on the grid of ``bins`` bins ``[(offset + k) w, (offset + k + 1) w)``; values outside the
    window land in the end bins. Equal to ``bincount(clamp(floor(x / w) - offset, 0, bins - 1))``.

    On CPU the tensor is binned in cache-sized chunks through one reused float buffer, and the bin indices are
    16-bit when they fit: allocating activation-sized temporaries (float quotient, int64 indices) cost 5-6x more
    than the counting itself, which made histogram calibration 2-3x slower than float inference.

    Example:
        >>> bin_counts(torch.tensor([-0.5, 0.0, 0.3, 0.9, 7.0]), 0.5, -1, 4).tolist()
        [1, 2, 1, 1]
    """
    flat = x.reshape(-1)
    chunk = flat.numel() if flat.is_cuda else min(_CHUNK, flat.numel())
    index_dtype = torch.int16 if bins <= torch.iinfo(torch.int16).max else torch.int32
    buffer = torch.empty(chunk, dtype=torch.float32, device=flat.device)
    counts = torch.zeros(bins, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), max(chunk, 1)):
        part = flat[start : start + chunk]
        scaled = buffer[: part.numel()]
        # the power-of-two width makes ``* (1 / w)`` exactly ``/ w``; floor before the offset shift: floor(a) - n
        # is exact where floor(a - n) can round a value just below an edge into the next bin
        if part.dtype == torch.float32:
            torch.mul(part, 1.0 / width, out=scaled)
        else:
            scaled.copy_(part).mul_(1.0 / width)
        scaled.floor_().sub_(offset).clamp_(0, bins - 1)
        counts.add_(torch.bincount(scaled.to(index_dtype), minlength=bins))
    return counts


def _pow2_at_least(value: float) -> float:
    """The smallest power of two ``>= value`` (``value > 0``)."""
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, mantissa in [0.5, 1)
    return 2.0 ** (exponent - 1) if mantissa == 0.5 else 2.0**exponent


class HistogramObserver(Observer):
    """Running min/max plus a fixed-size histogram of everything observed (per-tensor specs).

    Args:
        spec: the :class:`~lightning_quant.config.QuantSpec` being estimated.
        num_channels: channel count for per-channel specs (no histogram is kept for them).
        bins: number of histogram bins (memory: 8 bytes each).

    Raises:
        ValueError: ``bins`` is not an integer >= 16, or a per-channel spec without ``num_channels``.
        FloatingPointError: NaN or inf in an observed tensor (the state is left untouched).
    """

    def __init__(self, spec: Any, num_channels: int | None = None, *, bins: int = DEFAULT_BINS) -> None:
        super().__init__(spec, num_channels)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < _MIN_BINS:
            raise ValueError(f"bins={bins!r} must be an integer >= {_MIN_BINS}; {DEFAULT_BINS} is the default.")
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(0 if spec.per_channel else bins, dtype=torch.int64))
        self.register_buffer("bin_width", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("bin_offset", torch.tensor(0, dtype=torch.int64))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_range(x)  # raises on NaN/inf before any state changes
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))
        if self.spec.per_channel:
            return
        self._fit_window()
        self.histogram.add_(bin_counts(x.detach(), self.bin_width.item(), int(self.bin_offset.item()), self.bins))

    def clipped_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated ``(min, max)`` to quantize (per-tensor specs); subclasses implement it."""
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``qparams_from_range`` of :meth:`clipped_range`; the running min/max for per-channel specs."""
        if self.spec.per_channel or not self.initialized:
            return super().calculate_qparams()
        lo, hi = self.clipped_range()
        return qparams_from_range(lo, hi, self.spec)

    def _span(self) -> tuple[float, float]:
        """The range the histogram must cover: everything observed, extended to contain 0."""
        return min(self.min_val.item(), 0.0), max(self.max_val.item(), 0.0)

    def _fit_window(self) -> None:
        """Grow (double the bin width) and/or shift the window so it covers :meth:`_span`; merge bins exactly."""
        lo, hi = self._span()
        width, offset = self.bin_width.item(), int(self.bin_offset.item())
        if width == 0.0:  # first data: the power of two just above span / (bins - 2) (a margin for rounding)
            width = _pow2_at_least((hi - lo) / (self.bins - 2)) if hi > lo else _TINY_WIDTH
            offset = math.floor(lo / width)
        elif math.floor(lo / width) >= offset and math.floor(hi / width) < offset + self.bins:
            return  # already covered
        factor = self._cover_factor(width, lo, hi)
        self._regrid(width * factor, math.floor(lo / (width * factor)))

    def _cover_factor(self, width: float, lo: float, hi: float) -> int:
        """The smallest power of two ``f`` for which bins of width ``f * width`` cover ``[lo, hi]``."""
        factor = 1
        while math.floor(hi / (width * factor)) - math.floor(lo / (width * factor)) + 1 > self.bins:
            factor *= 2
        return factor

    def _regrid(self, width: float, offset: int) -> None:
        """Move the counts onto the grid ``(width, offset)``; exact when ``width`` is a power-of-two multiple of
        the current width and the new window covers every non-empty bin."""
        old_width, old_offset = self.bin_width.item(), int(self.bin_offset.item())
        if old_width > 0.0:
            factor = round(width / old_width)
            old_abs = old_offset + torch.arange(self.bins, device=self.histogram.device)
            new_idx = torch.div(old_abs, factor, rounding_mode="floor").sub_(offset).clamp_(0, self.bins - 1)
            merged = torch.zeros_like(self.histogram).index_add_(0, new_idx, self.histogram)
            self.histogram.copy_(merged)
        self.bin_width.fill_(width)
        self.bin_offset.fill_(offset)

    # -- distributed synchronization ----------------------------------------------------------------------
    def sync_tensors(self, phase: int) -> list[tuple[torch.Tensor, str]]:
        """Phase 0: the range and the coarsest bin width; phase 1: the counts, on the grid every rank then shares."""
        if self.spec.per_channel:
            return super().sync_tensors(phase)
        if phase == 0:
            self._common_width = self.bin_width.clone()
            return super().sync_tensors(0) + [(self._common_width, "max")]
        return [(self.histogram, "sum")]

    def after_sync(self, phase: int, world_size: int) -> None:
        """After phase 0: re-grid onto the common grid (same width and offset on every rank: computed from the
        reduced range and width alone), so that phase 1 sums aligned bins."""
        if self.spec.per_channel or phase != 0:
            return
        common = self._common_width.item()
        del self._common_width
        if common == 0.0:  # no rank has seen data
            return
        lo, hi = self._span()
        width = common * self._cover_factor(common, lo, hi)
        self._regrid(width, math.floor(lo / width))  # from this rank's grid (none when it saw no data: counts 0)

    def bin_edges(self) -> torch.Tensor:
        """The ``bins + 1`` bin edges (float64)."""
        k = self.bin_offset.item() + torch.arange(self.bins + 1, dtype=torch.float64, device=self.histogram.device)
        return k * self.bin_width.item()

    def abs_histogram(self) -> tuple[torch.Tensor, float]:
        """Histogram of ``|x|`` on bins ``[m w, (m + 1) w)``, trimmed after the last non-empty bin, and ``w``.

        Exact: 0 is a bin edge, so bin ``k < 0`` (``[k w, (k + 1) w)``) folds onto bin ``-k - 1``.
        """
        absolute = self.bin_offset.item() + torch.arange(self.bins, device=self.histogram.device)
        folded = torch.where(absolute >= 0, absolute, -absolute - 1)
        counts = torch.zeros(int(folded.max().item()) + 1, dtype=torch.float64, device=self.histogram.device)
        counts.index_add_(0, folded, self.histogram.to(torch.float64))
        nonzero = torch.nonzero(counts).flatten()
        last = int(nonzero[-1].item()) + 1 if nonzero.numel() else 0
        return counts[:last], self.bin_width.item()

    def observed_amax(self) -> float:
        """Largest ``|x|`` observed."""
        return max(-self.min_val.item(), self.max_val.item(), 0.0)

    def reset(self) -> None:
        super().reset()
        self.histogram.zero_()
        self.bin_width.fill_(0.0)
        self.bin_offset.fill_(0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}"
