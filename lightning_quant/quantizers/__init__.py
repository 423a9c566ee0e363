"""Quantizers: pure functions, observers (range estimators), fake-quant modules, quantized layers and
prepare()/convert()."""

from lightning_quant.quantizers.dynamic import DynamicQuantLinear, quantize_dynamic
from lightning_quant.quantizers.entropy import EntropyObserver
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.histogram import HistogramObserver
from lightning_quant.quantizers.mse import MSEObserver
from lightning_quant.quantizers.observers import Observer, observer_names, register_observer
from lightning_quant.quantizers.percentile import PercentileObserver
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
    "EntropyObserver",
    "FakeQuantize",
    "HistogramObserver",
    "MSEObserver",
    "Observer",
    "PercentileObserver",
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
