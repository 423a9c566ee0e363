"""PTQ algorithms: the output-aware activation range search, CLE, bias correction, AdaRound (learned weight
rounding), fast finetuning (AdaQuant), sensitivity analysis and accuracy-controlled mixed precision.

The histogram range estimators (``percentile``, ``mse``, ``entropy``) live in :mod:`lightning_quant.quantizers`
with the other observers and are re-exported here; a spec selects them by name:

Example:
    >>> from lightning_quant.config import scheme_for_target
    >>> scheme_for_target("x86", activation_observer="mse").activation.observer
    'mse'
"""

from lightning_quant.algorithms.accuracy_control import AccuracyControlReport, quantize_with_accuracy_control
from lightning_quant.algorithms.adaquant import FastFinetuneReport, LayerTuning, fast_finetune
from lightning_quant.algorithms.adaround import AdaRoundReport, adaround
from lightning_quant.algorithms.bias_correction import BiasCorrectionReport, correct_bias
from lightning_quant.algorithms.cle import CLEReport, equalization_pairs, equalize, relu6_to_relu
from lightning_quant.algorithms.range_search import RangeSearchReport, search_activation_ranges
from lightning_quant.algorithms.sensitivity import (
    KindSensitivity,
    QuantizerSensitivity,
    SensitivityReport,
    plot_quantizer_histograms,
    sensitivity_analysis,
)
from lightning_quant.quantizers.entropy import EntropyObserver
from lightning_quant.quantizers.histogram import HistogramObserver
from lightning_quant.quantizers.mse import MSEObserver
from lightning_quant.quantizers.percentile import PercentileObserver

__all__ = [
    "AccuracyControlReport",
    "AdaRoundReport",
    "BiasCorrectionReport",
    "CLEReport",
    "EntropyObserver",
    "FastFinetuneReport",
    "HistogramObserver",
    "LayerTuning",
    "MSEObserver",
    "PercentileObserver",
    "KindSensitivity",
    "QuantizerSensitivity",
    "RangeSearchReport",
    "SensitivityReport",
    "adaround",
    "correct_bias",
    "equalization_pairs",
    "equalize",
    "fast_finetune",
    "relu6_to_relu",
    "search_activation_ranges",
    "plot_quantizer_histograms",
    "quantize_with_accuracy_control",
    "sensitivity_analysis",
]
