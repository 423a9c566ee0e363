"""Seeded subsets of a training split: the calibration images, and held-out images disjoint from them.

Both are cut from one seeded permutation of the split, so the same seed always gives the same images, in the
same order, and a held-out subset never overlaps the calibration subset of the same seed.

Example:
    >>> import torch
    >>> ds = torch.utils.data.TensorDataset(torch.arange(10))
    >>> len(calibration_subset(ds, 4, seed=0)), len(held_out_subset(ds, 3, calibration_size=4, seed=0))
    (4, 3)
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from lightning_quant.data.checks import check_positive_int

__all__ = ["calibration_subset", "held_out_subset"]


def _seeded_permutation(n: int, seed: int) -> torch.Tensor:
    """The permutation of ``range(n)`` both subsets are cut from (the same seed gives the same order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def calibration_subset(dataset: Dataset, size: int, seed: int = 0) -> Subset:
    """A reproducible random subset of ``size`` items (the same ``seed`` gives the same items, in the same order).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(100))
        >>> calibration_subset(ds, 5, seed=0).indices == calibration_subset(ds, 5, seed=0).indices
        True

    Raises:
        ValueError: ``size`` < 1 or larger than the dataset.
    """
    check_positive_int("calibration_size", size)
    n = len(dataset)  # type: ignore[arg-type]
    if size > n:
        raise ValueError(f"calibration_size={size} is larger than the training split ({n} images); use at most {n}.")
    return Subset(dataset, _seeded_permutation(n, seed)[:size].tolist())


def held_out_subset(dataset: Dataset, size: int, *, calibration_size: int, seed: int = 0) -> Subset:
    """``size`` items disjoint from ``calibration_subset(dataset, calibration_size, seed)``: the next ``size``
    positions of the same seeded permutation (for tuning decisions such as accuracy control, never evaluation).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(100))
        >>> held = held_out_subset(ds, 20, calibration_size=50, seed=0)
        >>> len(held), set(held.indices) & set(calibration_subset(ds, 50, seed=0).indices)
        (20, set())

    Raises:
        ValueError: ``size`` < 1, or the two subsets together larger than the dataset.
    """
    check_positive_int("tuning_size", size)
    check_positive_int("calibration_size", calibration_size)
    n = len(dataset)  # type: ignore[arg-type]
    if calibration_size + size > n:
        raise ValueError(
            f"tuning_size={size} + calibration_size={calibration_size} exceed the training split ({n} images); "
            f"use at most {n - calibration_size} held-out images."
        )
    return Subset(dataset, _seeded_permutation(n, seed)[calibration_size : calibration_size + size].tolist())
