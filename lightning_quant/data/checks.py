"""Argument checks shared by the data helpers and datamodules (each error names the argument and the bound).

Example:
    >>> check_positive_int("batch_size", 32)
    >>> check_positive_int("batch_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size=0 must be an integer >= 1.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    """Refuse ``value`` unless it is an ``int`` (not a ``bool``) of at least ``minimum``.

    Raises:
        ValueError: ``value`` is not an integer >= ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")
