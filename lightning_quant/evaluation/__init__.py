"""Evaluation harness: top-1 accuracy of a classifier, and the torchvision zoo sweep (quantize -> ONNX -> parity).

Example:
    >>> from lightning_quant.evaluation import ZOO_SWEEP_MODELS, top1_accuracy
    >>> "resnet50" in ZOO_SWEEP_MODELS
    True
"""

from lightning_quant.evaluation.accuracy import top1_accuracy
from lightning_quant.evaluation.zoo_sweep import (
    TIMM_SWEEP_MODELS,
    ZOO_SWEEP_MODELS,
    ZooResult,
    build_zoo_model,
    check_zoo_model,
    zoo_table,
)

__all__ = [
    "TIMM_SWEEP_MODELS",
    "ZOO_SWEEP_MODELS",
    "ZooResult",
    "build_zoo_model",
    "check_zoo_model",
    "top1_accuracy",
    "zoo_table",
]
