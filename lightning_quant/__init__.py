"""lightning_quant: INT8 PTQ and QAT inside the Lightning Trainer.

Example:
    >>> from lightning_quant import QuantCallback
    >>> callback = QuantCallback(mode="ptq", target="x86", calibration_batches=16)
"""

from lightning_quant._version import __version__
from lightning_quant.algorithms.accuracy_control import AccuracyControlReport, quantize_with_accuracy_control
from lightning_quant.api import quantize
from lightning_quant.callbacks.quant_callback import QuantCallback
from lightning_quant.checkpoint import load_quantized_checkpoint
from lightning_quant.config import (
    QATSchedule,
    QuantMode,
    QuantOptions,
    QuantScheme,
    QuantSpec,
    Target,
    scheme_for_target,
)
from lightning_quant.errors import (
    CheckpointMismatchError,
    NotCalibratedError,
    NothingToQuantizeError,
    RankFailedError,
)
from lightning_quant.export import (
    DPUInspection,
    ExportVerificationError,
    export_onnx,
    export_torchscript,
    export_xmodel,
    inspect_dpu,
    verify_export,
)
from lightning_quant.quantizers import convert, prepare, quantize_dynamic
from lightning_quant.report import QuantReport, quantization_report

__all__ = [
    "__version__",
    "AccuracyControlReport",
    "CheckpointMismatchError",
    "DPUInspection",
    "ExportVerificationError",
    "NotCalibratedError",
    "NothingToQuantizeError",
    "QATSchedule",
    "QuantCallback",
    "QuantMode",
    "QuantOptions",
    "QuantReport",
    "QuantScheme",
    "QuantSpec",
    "RankFailedError",
    "Target",
    "convert",
    "export_onnx",
    "export_torchscript",
    "export_xmodel",
    "inspect_dpu",
    "load_quantized_checkpoint",
    "prepare",
    "quantization_report",
    "quantize",
    "quantize_dynamic",
    "quantize_with_accuracy_control",
    "scheme_for_target",
    "verify_export",
]
