"""Model zoo: pretrained models that load offline from the shared weights folder.

Example:
    >>> from lightning_quant.models import IMAGENETTE_MODELS
    >>> sorted(IMAGENETTE_MODELS)
    ['mobilenet_v2', 'resnet50']
"""

from lightning_quant.models.cifar_resnet import CIFAR_RESNET_WEIGHTS, CifarResNet, cifar_resnet
from lightning_quant.models.classifier import ImageClassifier
from lightning_quant.models.imagenette import (
    IMAGENETTE_EVAL_SIZES,
    IMAGENETTE_MODELS,
    mobilenet_v2_imagenette,
    mobilenet_v2_imagenette_transform,
    resnet50_imagenette,
    resnet50_imagenette_transform,
)
from lightning_quant.models.torchvision_zoo import WeightsUnavailableError, torchvision_model
from lightning_quant.models.weights import WeightsMismatchError, load_weights

__all__ = [
    "IMAGENETTE_EVAL_SIZES",
    "IMAGENETTE_MODELS",
    "mobilenet_v2_imagenette",
    "mobilenet_v2_imagenette_transform",
    "resnet50_imagenette",
    "resnet50_imagenette_transform",
    "CIFAR_RESNET_WEIGHTS",
    "CifarResNet",
    "ImageClassifier",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "load_weights",
    "cifar_resnet",
    "torchvision_model",
]


def __getattr__(name: str):
    """``top1_accuracy`` moved to :mod:`lightning_quant.evaluation` (kept importable from here for one release)."""
    if name == "top1_accuracy":
        import warnings

        from lightning_quant.evaluation.accuracy import top1_accuracy

        warnings.warn(
            "lightning_quant.models.top1_accuracy moved to lightning_quant.evaluation.top1_accuracy; import it from "
            "there (this alias goes in the next release).",
            DeprecationWarning,
            stacklevel=2,
        )
        return top1_accuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
