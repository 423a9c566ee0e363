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
