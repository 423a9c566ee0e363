"""The observer registry: the name a :class:`~lightning_quant.config.QuantSpec` gives its ``observer`` -> the class.

The built-in range estimators live one per module beside this one (:mod:`~lightning_quant.quantizers.minmax`,
:mod:`~lightning_quant.quantizers.percentile`, :mod:`~lightning_quant.quantizers.mse`,
:mod:`~lightning_quant.quantizers.entropy`, and the DPU's :mod:`~lightning_quant.quantizers.dpu`); this module
imports them all and names them. Your own observer joins with :func:`register_observer`.

Example:
    >>> import torch
    >>> from lightning_quant.config import QuantSpec
    >>> obs = build_observer(QuantSpec(observer="minmax"))
    >>> _ = obs(torch.tensor([-1.0, 2.0])); _ = obs(torch.tensor([0.5, 4.0]))
    >>> obs.min_val.item(), obs.max_val.item()
    (-1.0, 4.0)
    >>> @register_observer("my_minmax")
    ... class MyMinMax(MinMaxObserver):
    ...     pass
    >>> "my_minmax" in observer_names()
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lightning_quant.config import add_observer_name
from lightning_quant.quantizers.dpu import DPUFixPosObserver, DPUInputFixPosObserver
from lightning_quant.quantizers.entropy import EntropyObserver
from lightning_quant.quantizers.minmax import MeanMinMaxObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer
from lightning_quant.quantizers.mse import MSEObserver
from lightning_quant.quantizers.percentile import PercentileObserver

__all__ = [
    "MeanMinMaxObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "build_observer",
    "input_spec",
    "observer_names",
    "register_observer",
]

# Built-in estimators, in the order observer_names() lists them (and error messages quote them).
_REGISTRY: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "mean_minmax": MeanMinMaxObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
    "percentile": PercentileObserver,
    "dpu_pot": DPUFixPosObserver,
    "dpu_pot_input": DPUInputFixPosObserver,
}
for _name in _REGISTRY:  # QuantSpec validates observer names against config's list, which the registry feeds
    add_observer_name(_name)


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator that makes an observer selectable by name in :class:`~lightning_quant.config.QuantSpec`."""

    def decorator(cls: type[Observer]) -> type[Observer]:
        _REGISTRY[name] = cls
        add_observer_name(name)
        return cls

    return decorator


def observer_names() -> list[str]:
    """Names accepted by ``QuantSpec(observer=...)``, in registration order (built-in estimators first)."""
    return list(_REGISTRY)


def build_observer(spec: Any, num_channels: int | None = None) -> Observer:
    """Instantiate the observer a :class:`~lightning_quant.config.QuantSpec` names."""
    return _REGISTRY[spec.observer](spec, num_channels)


def input_spec(spec: Any) -> Any:
    """The spec for a network input: ``spec`` with the observer's ``input_observer`` variant, if it names one.

    The DPU's ``dpu_pot`` observer keeps network inputs at the overflow-safe position (``dpu_pot_input``).

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> input_spec(scheme_for_target("dpu").activation).observer
        'dpu_pot_input'
        >>> input_spec(scheme_for_target("x86").activation).observer
        'mean_minmax'
    """
    variant = getattr(_REGISTRY.get(spec.observer), "input_observer", None)
    if variant is None or variant == spec.observer:
        return spec
    return dataclasses.replace(spec, observer=variant)
