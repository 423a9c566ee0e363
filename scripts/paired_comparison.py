"""Is a top-1 difference between two models on the same images more than noise? Paired comparison per image.

Two quantized models of one float network disagree on a few percent of the images; a top-1 gap of a few tenths of a
point on CIFAR-10's 10,000 images is a difference of 10-20 of those images, which chance alone produces. The exact
McNemar test counts the images only one of the two models gets right (``b`` and ``c``) and asks how likely a split
at least that uneven is when either model is equally likely to win each of them.

Predictions travel in the result files as base64 of their smallest unsigned integer type (:func:`encode_predictions`),
so a table can be re-rendered and compared again without running anything.

Example:
    >>> labels = np.array([0, 1, 1, 0, 1, 0])
    >>> a, b = np.array([0, 1, 1, 0, 0, 0]), np.array([0, 1, 0, 1, 1, 0])
    >>> paired = compare(a, b, labels)
    >>> paired.only_first, paired.only_second, round(paired.p_value, 3)
    (2, 1, 1.0)
    >>> decode_predictions(encode_predictions(a)).tolist() == a.tolist()
    True
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["PairedResult", "agreement", "compare", "decode_predictions", "encode_predictions", "mcnemar_p_value"]

SIGNIFICANCE = 0.05


def encode_predictions(predictions: np.ndarray) -> dict[str, str]:
    """``{"dtype", "base64"}`` of a 1-D array of class indices (uint8 when every index fits, else uint16/uint32)."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 1 or (predictions.size and predictions.min() < 0):
        raise ValueError(f"predictions must be a 1-D array of class indices >= 0, got shape {predictions.shape}.")
    top = int(predictions.max()) if predictions.size else 0
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32) if top <= np.iinfo(t).max)
    return {"dtype": np.dtype(dtype).name, "base64": base64.b64encode(predictions.astype(dtype).tobytes()).decode()}


def decode_predictions(encoded: dict[str, str]) -> np.ndarray:
    """The array :func:`encode_predictions` stored."""
    return np.frombuffer(base64.b64decode(encoded["base64"]), dtype=np.dtype(encoded["dtype"])).astype(np.int64)


def mcnemar_p_value(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value: the probability, with each discordant image a fair coin, of a split at
    least as uneven as ``only_first`` vs ``only_second`` (1.0 for no discordant image).

    Example:
        >>> round(mcnemar_p_value(30, 10), 4), mcnemar_p_value(5, 5)
        (0.0022, 1.0)
    """
    n, k = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)  # exact: 0.5 ** n underflows past n ~ 1074
    return float(min(Fraction(1), 2 * tail))


@dataclass(frozen=True)
class PairedResult:
    """Images only the first / only the second model classifies correctly, and the McNemar p-value of the split."""

    only_first: int
    only_second: int
    p_value: float

    @property
    def significant(self) -> bool:
        """The split is unlikely (p < 5 %) if the two models were equally accurate."""
        return self.p_value < SIGNIFICANCE

    def describe(self) -> str:
        """E.g. ``"51 vs 31 images, p=0.035"``: first model's wins, then the second's."""
        return f"{self.only_first} vs {self.only_second} images, p={self.p_value:.2g}"


def compare(first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> PairedResult:
    """Paired comparison of two models' predictions on the same labelled images."""
    first, second, labels = np.asarray(first), np.asarray(second), np.asarray(labels)
    if not first.shape == second.shape == labels.shape:
        raise ValueError(f"predictions and labels differ in shape: {first.shape}, {second.shape}, {labels.shape}.")
    right_first, right_second = first == labels, second == labels
    only_first, only_second = int((right_first & ~right_second).sum()), int((right_second & ~right_first).sum())
    return PairedResult(only_first, only_second, mcnemar_p_value(only_first, only_second))


def agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Percent of images on which two models predict the same class (e.g. a quantized model and its float model).

    Example:
        >>> agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
        75.0
    """
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.size == 0:
        raise ValueError(f"agreement needs two non-empty predictions of one shape, got {first.shape}, {second.shape}.")
    return 100.0 * float((first == second).mean())
