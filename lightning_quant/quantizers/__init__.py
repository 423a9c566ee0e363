"""Quantizers: pure functions, observers, fake-quant modules, quantized layers and prepare()/convert()."""

from lightning_quant.quantizers.dynamic import DynamicQuantLinear, quantize_dynamic
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.observers import Observer, observer_names, register_observer
from lightning_quant.quantizers.prepare import (
    PrepareInfo,
    convert,
    freeze_bn,
    iter_quantizers,
    prepare,
    prepare_info,
    require_calibrated,
    set_fake_quant,
    set_observers,
)

__all__ = [
    "DynamicQuantLinear",
    "FakeQuantize",
    "Observer",
    "PrepareInfo",
    "convert",
    "freeze_bn",
    "iter_quantizers",
    "observer_names",
    "prepare",
    "prepare_info",
    "quantize_dynamic",
    "register_observer",
    "require_calibrated",
    "set_fake_quant",
    "set_observers",
]
