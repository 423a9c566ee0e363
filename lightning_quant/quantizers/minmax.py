"""The observer base class and the min/max range estimators (``minmax``, ``moving_average``, ``mean_minmax``).

Observers are stateful modules that watch tensors and propose quantization parameters. Every observer shares one
interface, so calibration algorithms plug in by name (the registry is :mod:`lightning_quant.quantizers.observers`):
``forward(x)`` records statistics and returns ``x`` unchanged; ``calculate_qparams()`` returns
``(scale, zero_point)``; all state lives in buffers of fixed shape, so it is saved in checkpoints. Every observer
keeps the running ``min_val`` / ``max_val`` of :class:`Observer`, which the estimators here turn into the range.

Example:
    >>> import torch
    >>> from lightning_quant.config import QuantSpec
    >>> obs = MinMaxObserver(QuantSpec(observer="minmax"))
    >>> _ = obs(torch.tensor([-1.0, 2.0])); _ = obs(torch.tensor([0.5, 4.0]))
    >>> obs.min_val.item(), obs.max_val.item()
    (-1.0, 4.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_quant.quantizers.functional import qparams_from_range

__all__ = ["MeanMinMaxObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "Observer"]


class Observer(nn.Module):
    """Base class. Subclasses implement :meth:`observe` and keep their state in buffers.

    A subclass may set ``input_observer`` to the name of the observer
    :func:`~lightning_quant.quantizers.observers.input_spec` picks for network inputs.

    Args:
        spec: the :class:`~lightning_quant.config.QuantSpec` being estimated.
        num_channels: number of channels along ``spec.ch_axis`` when the spec is per-channel.

    Raises:
        ValueError: a per-channel spec without ``num_channels``.
        FloatingPointError: NaN or inf in an observed tensor (the fake-quant module adds the layer name).
    """

    input_observer: str | None = None

    def __init__(self, spec: Any, num_channels: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        if spec.per_channel and not num_channels:
            raise ValueError("a per-channel observer needs num_channels (the size of the channel axis).")
        shape = (num_channels,) if spec.per_channel else ()
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))

    @property
    def initialized(self) -> bool:
        return bool(torch.isfinite(self.min_val).all())

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of one tensor, per channel or overall."""
        x = x.detach().float()
        if not self.spec.per_channel:
            return _extremes(x)
        axis = self.spec.ch_axis % x.dim()
        if x.shape[axis] != self.min_val.numel():
            raise ValueError(
                f"observer expects {self.min_val.numel()} channels on axis {axis}, got shape {tuple(x.shape)}"
            )
        return _extremes(x, axis)

    def _stage_mean_sync(self, weight: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
        """Stage ``(min * weight, max * weight, weight)`` for a SUM all-reduce, so that :meth:`_finish_mean_sync`
        leaves the weighted mean of the ranks' ranges; a rank that has seen no data weighs nothing."""
        if self.initialized:
            w = weight.to(self.min_val.dtype)
            self._sync = (self.min_val * w, self.max_val * w, weight.clone())
        else:
            self._sync = (torch.zeros_like(self.min_val), torch.zeros_like(self.max_val), torch.zeros_like(weight))
        return [(t, "sum") for t in self._sync]

    def _finish_mean_sync(self) -> torch.Tensor | None:
        """After :meth:`_stage_mean_sync`'s all-reduce: the weighted mean in place; the total weight (None if 0)."""
        min_sum, max_sum, weight = self._sync
        del self._sync
        if weight.item() <= 0:
            return None
        self.min_val.copy_(min_sum / weight.to(min_sum.dtype))
        self.max_val.copy_(max_sum / weight.to(max_sum.dtype))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > 0:
            self.observe(x)
        return x

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_range(self.min_val, self.max_val, self.spec)

    def reset(self) -> None:
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, per_channel={self.spec.per_channel}"

    # -- distributed synchronization (see lightning_quant.distributed.sync_quantizers) ------------------------
    def sync_tensors(self, phase: int) -> list[tuple[torch.Tensor, str]]:
        """Tensors to all-reduce in place across ranks in ``phase`` (0, then 1), each with ``"min"|"max"|"sum"``.

        The base reduces the running range (MIN of ``min_val``, MAX of ``max_val``): after it every rank holds
        the range of the union of all ranks' data. A custom observer with more state overrides this (and
        :meth:`after_sync`); phase 1 exists for state that can only be merged once the phase-0 result is known.
        """
        return [(self.min_val, "min"), (self.max_val, "max")] if phase == 0 else []

    def after_sync(self, phase: int, world_size: int) -> None:
        """Local work after ``phase``'s all-reduce (e.g. re-gridding a histogram); the base has none."""


def _extremes(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x``, overall or per index along ``axis``.

    Raises:
        FloatingPointError: NaN or inf in ``x`` (one pass: NaN propagates into min/max and inf shows up there).
    """
    if axis is None:
        lo, hi = torch.aminmax(x)
    else:
        # two reductions over the other dims, in place: on CPU, aminmax(dim=) of a moved and reshaped copy was 5 to 10x
        # slower (a 32x96x112x112 activation per sample: 43 vs 7 ms, per channel: 84 vs 9 ms; torch 2.14), a
        # quarter of MobileNetV2's calibration time under per-sample ranges
        others = tuple(d for d in range(x.dim()) if d != axis)
        lo, hi = (x.amin(dim=others), x.amax(dim=others)) if others else (x.clone(), x.clone())
    # a data-dependent branch, which torch.compile cannot trace: a compiled QAT step skips it (non-finite values
    # then reach the range and the scale, and the loss shows them)
    if torch.compiler.is_compiling():
        return lo, hi
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise FloatingPointError(f"{'NaN' if torch.isnan(x).any() else 'inf'} values reached an observer")
    return lo, hi


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything observed."""

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_range(x)
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max (``averaging_constant`` is the new batch's weight)."""

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_range(x)
        c = float(self.spec.averaging_constant)
        # the first batch sets the range; a select rather than a branch on `initialized`, so torch.compile traces it
        # (inf - inf is NaN in the unselected average, which `where` drops)
        seen = torch.isfinite(self.min_val)
        self.min_val.copy_(torch.where(seen, self.min_val + c * (lo - self.min_val), lo))
        self.max_val.copy_(torch.where(seen, self.max_val + c * (hi - self.max_val), hi))

    def sync_tensors(self, phase: int) -> list[tuple[torch.Tensor, str]]:
        """Average the ranks' moving averages (ranks that have seen no data yet do not count)."""
        return self._stage_mean_sync(torch.tensor(1.0, device=self.min_val.device)) if phase == 0 else []

    def after_sync(self, phase: int, world_size: int) -> None:
        if phase == 0:
            self._finish_mean_sync()


# below this many values per sample, mean_minmax takes each call's extremes instead of each sample's
MIN_SAMPLE_VALUES = 64


class MeanMinMaxObserver(Observer):
    """Mean over all samples seen of each sample's min and max (NNCF's ``MEAN_MINMAX`` activation default).

    Dimension 0 is the batch: every sample contributes its own extremes, so the range does not depend on how the
    calibration images were batched, and a rare outlier moves it by ``1 / samples`` of its size instead of
    setting it, which suits heavy-tailed activations. Per-channel specs, tensors without a batch dimension and
    samples of fewer than :data:`MIN_SAMPLE_VALUES` values (a few logits, a small feature vector) count as one
    sample per call: the extremes of a handful of values are their typical values, and their mean would clip
    half of them (a 2-value input lost 26 dB of SQNR that way).

    Example:
        >>> import torch
        >>> from lightning_quant.config import QuantSpec
        >>> obs = MeanMinMaxObserver(QuantSpec(observer="mean_minmax"))
        >>> ramp = torch.linspace(0.0, 1.0, 64)  # one sample of 64 values
        >>> _ = obs(torch.stack([ramp, 3 * ramp])); _ = obs(8 * ramp[None])
        >>> obs.max_val.item(), int(obs.samples)  # (1 + 3 + 8) / 3
        (4.0, 3)
    """

    def __init__(self, spec: Any, num_channels: int | None = None) -> None:
        super().__init__(spec, num_channels)
        self.register_buffer("samples", torch.zeros((), dtype=torch.float64))

    def observe(self, x: torch.Tensor) -> None:
        if self.spec.per_channel or x.dim() < 2 or x[0].numel() < MIN_SAMPLE_VALUES:
            lo, hi = self.batch_range(x)
            n, lo_sum, hi_sum = 1, lo.double(), hi.double()
        else:
            lo, hi = _extremes(x.detach().float(), 0)  # per sample
            n, lo_sum, hi_sum = lo.numel(), lo.double().sum(), hi.double().sum()
        total = self.samples + n
        old = self.samples / total  # weights of the running means and of this batch's sums
        # before the first sample the running means are inf (times a weight of 0: NaN), dropped by a select rather
        # than a branch on `initialized`, so torch.compile traces it
        seen = torch.isfinite(self.min_val)
        self.min_val.copy_(torch.where(seen, self.min_val.double() * old, 0.0) + lo_sum / total)
        self.max_val.copy_(torch.where(seen, self.max_val.double() * old, 0.0) + hi_sum / total)
        self.samples.copy_(total)

    def reset(self) -> None:
        super().reset()
        self.samples.zero_()

    def sync_tensors(self, phase: int) -> list[tuple[torch.Tensor, str]]:
        """Sample-weighted mean of the ranks' means (ranks that have seen no data weigh nothing)."""
        return self._stage_mean_sync(self.samples) if phase == 0 else []

    def after_sync(self, phase: int, world_size: int) -> None:
        if phase == 0 and (samples := self._finish_mean_sync()) is not None:
            self.samples.copy_(samples)
