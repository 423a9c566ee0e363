"""Evaluation harness: top-1 accuracy of a classifier, and the torchvision zoo sweeps (quantize -> ONNX -> parity;
the DPU target: inspect_dpu -> XModel -> interpreter vs fake-quant).

Example:
    >>> from lightning_quant.evaluation import ZOO_SWEEP_MODELS, top1_accuracy
    >>> "resnet50" in ZOO_SWEEP_MODELS
    True
"""

from lightning_quant.evaluation.accuracy import top1_accuracy
from lightning_quant.evaluation.dpu_zoo_sweep import DPUZooResult, check_dpu_zoo_model, dpu_zoo_table
from lightning_quant.evaluation.zoo_sweep import (
    TIMM_SWEEP_MODELS,
    ZOO_SWEEP_MODELS,
    ZooResult,
    build_zoo_model,
    check_zoo_model,
    zoo_table,
)

__all__ = [
    "DPUZooResult",
    "TIMM_SWEEP_MODELS",
    "ZOO_SWEEP_MODELS",
    "ZooResult",
    "build_zoo_model",
    "check_dpu_zoo_model",
    "check_zoo_model",
    "dpu_zoo_table",
    "top1_accuracy",
    "zoo_table",
]
