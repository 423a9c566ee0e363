"""The two knobs of the activation range search, and their candidate checks: the clipping percentile of
``percentile`` estimators, and (power-of-two scales) the shift of calibrated fix positions. Each knob sets one
group's quantizers to a value, says where the search starts and what to try after the grid.

Example:
    >>> _between([99.0, 99.9, 100.0], 99.9), _FixPosKnob.more([0, 1, 2], 2)
    ([99.6838, 99.95], [3])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from lightning_quant.quantizers.dpu import MAX_FIX_POS, MIN_FIX_POS, fix_pos_from_scale
from lightning_quant.quantizers.fake_quant import FakeQuantize

__all__: list[str] = []  # internal to range_search


class _PercentileKnob:
    """The clipping percentile of a group's ``percentile`` estimators (their histograms give each range)."""

    def __init__(self, members: Sequence[tuple[str, FakeQuantize]]) -> None:
        self.members = members

    def start(self) -> tuple[float, bool]:
        """The calibrated percentile, and whether the group had to be set to it (it differed within the group)."""
        kept = self.members[0][1].spec.percentile
        if any(fq.spec.percentile != kept for _, fq in self.members):  # set by hand: one percentile per group
            self.set(kept)
            return kept, True
        return kept, False

    def set(self, percentile: float) -> None:
        for _, fq in self.members:
            spec = dataclasses.replace(fq.spec, percentile=percentile)
            fq.spec = spec
            fq.observer.spec = spec
            fq.refresh_qparams()

    @staticmethod
    def more(tried: list[float], best: float) -> list[float]:
        return _between(tried, best)


class _FixPosKnob:
    """The shift of a group's calibrated power-of-two fix positions (each kept in the DPU's position range)."""

    def __init__(self, members: Sequence[tuple[str, FakeQuantize]]) -> None:
        self.members = members
        self.base = [fix_pos_from_scale(fq.scale) for _, fq in members]

    @staticmethod
    def start() -> tuple[int, bool]:
        return 0, False

    def set(self, offset: int) -> None:
        for (_, fq), base in zip(self.members, self.base, strict=True):
            fq.scale.fill_(2.0 ** -min(max(base + offset, MIN_FIX_POS), MAX_FIX_POS))

    @staticmethod
    def more(tried: list[int], best: int) -> list[int]:
        """One step past the largest (smallest) shift tried, when that one is the best so far.

        Example:
            >>> _FixPosKnob.more([-1, 0, 1, 2], 2), _FixPosKnob.more([-1, 0, 1, 2], -1), _FixPosKnob.more([0, 1], 0)
            ([3], [-2], [])
        """
        if best == max(tried) and best > 0:
            return [best + 1]
        return [best - 1] if best == min(tried) and best < 0 else []


def _between(grid: list[float], best: float) -> list[float]:
    """The percentiles halfway between ``best`` and its neighbours on the sorted ``grid``, halfway in the share of
    values clipped (``100 - p``, geometric mean; arithmetic next to 100, which clips nothing).

    Example:
        >>> _between([99.0, 99.5, 99.9, 99.99, 100.0], 99.9), _between([99.0, 99.99, 100.0], 100.0)
        ([99.7764, 99.9684], [99.995])
    """
    i = grid.index(best)
    halfway = []
    for neighbour in grid[max(i - 1, 0) : i] + grid[i + 1 : i + 2]:
        a, b = 100.0 - neighbour, 100.0 - best
        halfway.append(round(100.0 - math.sqrt(a * b) if a > 0 and b > 0 else (neighbour + best) / 2.0, 4))
    return halfway


def _percentiles(candidates: Sequence[float]) -> list[float]:
    values = [float(p) for p in candidates]
    if not values:
        raise ValueError("range search needs at least one candidate percentile; e.g. candidates=(99.0, 99.9, 100.0).")
    for p in values:
        if not 50.0 < p <= 100.0:
            raise ValueError(f"range search candidate percentile {p!r} must be in (50, 100]; e.g. 99.0, 99.9, 100.0.")
    return values


def _fix_pos_offsets(offsets: Sequence[int]) -> list[int]:
    values = list(offsets)
    if not values:
        raise ValueError("range search needs at least one fix position shift; e.g. fix_pos_offsets=(-1, 1, 2).")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not -8 <= v <= 8:
            raise ValueError(f"range search fix position shift {v!r} must be an integer in [-8, 8]; e.g. (-1, 1, 2).")
    return values
