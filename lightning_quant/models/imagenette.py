"""Pretrained 10-class Imagenette models that load offline from ``<shared>/weights``, with their eval transforms.

| builder | weights file | eval input | float top-1 (Imagenette val) |
|---|---|---|---|
| :func:`mobilenet_v2_imagenette` | ``mobilenet_v2_imagenette.pth`` (state dict) | 224 px, no resize | 98.50 % |
| :func:`resnet50_imagenette` | ``resnet50_imagenette.pth`` (fp16 ``state_dict``) | resize 144, crop 128 | 71.57 % |

Example:
    >>> import torch
    >>> model = mobilenet_v2_imagenette()  # doctest: +SKIP
    >>> model(torch.randn(2, 3, 224, 224)).shape  # doctest: +SKIP
    torch.Size([2, 10])
    >>> IMAGENETTE_EVAL_SIZES["resnet50"]
    {'image_size': 128, 'resize': 144}
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lightning_quant.data.transforms import imagenette_transform
from lightning_quant.models.weights import load_weights
from lightning_quant.paths import shared_dir

__all__ = [
    "IMAGENETTE_EVAL_SIZES",
    "IMAGENETTE_MODELS",
    "mobilenet_v2_imagenette",
    "mobilenet_v2_imagenette_transform",
    "resnet50_imagenette",
    "resnet50_imagenette_transform",
]

# DataModule / transform keyword arguments matching how each set of weights was trained.
IMAGENETTE_EVAL_SIZES: dict[str, dict[str, Any]] = {
    "mobilenet_v2": {"image_size": 224, "resize": None},
    "resnet50": {"image_size": 128, "resize": 144},
}


def _weights_file(file_name: str, weights_path: str | os.PathLike[str] | None, builder: str) -> Path:
    if weights_path is not None:
        path = Path(weights_path).expanduser()
    else:
        shared = shared_dir()
        if shared is None:
            raise FileNotFoundError(
                f"{builder}: no weights_path given and no shared assets folder found. Pass "
                f"{builder}(weights_path='/path/to/{file_name}') or set LIGHTNING_QUANT_SHARED=/path/to/shared "
                f"(the folder whose weights/ holds {file_name})."
            )
        path = shared / "weights" / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{builder}: weights file not found: {path}. Pass {builder}(weights_path='/path/to/{file_name}') or set "
            f"LIGHTNING_QUANT_SHARED=/path/to/shared (the folder whose weights/ holds {file_name})."
        )
    return path


def mobilenet_v2_imagenette(weights_path: str | os.PathLike[str] | None = None) -> nn.Module:
    """torchvision MobileNetV2 (10 classes) with ImageNet features and an Imagenette head, in eval mode.

    Example:
        >>> model = mobilenet_v2_imagenette()  # doctest: +SKIP
        >>> model.classifier[1].out_features  # doctest: +SKIP
        10

    Args:
        weights_path: a ``torchvision.models.mobilenet_v2(num_classes=10)`` state dict; default
            ``<shared>/weights/mobilenet_v2_imagenette.pth``.

    Raises:
        FileNotFoundError: the weights file is missing (the message names ``weights_path`` and
            ``LIGHTNING_QUANT_SHARED``).
        WeightsMismatchError: the file's keys or shapes do not match the architecture.
    """
    from torchvision.models import mobilenet_v2  # lazy: torchvision is an optional dependency

    path = _weights_file("mobilenet_v2_imagenette.pth", weights_path, "mobilenet_v2_imagenette")
    return load_weights(mobilenet_v2(weights=None, num_classes=10), path).eval()


def resnet50_imagenette(weights_path: str | os.PathLike[str] | None = None) -> nn.Module:
    """torchvision ResNet50 (10 classes) trained on Imagenette at 128 px, in eval mode (float32).

    Example:
        >>> model = resnet50_imagenette()  # doctest: +SKIP
        >>> model.fc.out_features, model.fc.weight.dtype  # doctest: +SKIP
        (10, torch.float32)

    Args:
        weights_path: a checkpoint dict with a ``state_dict`` entry (float16 is fine: it is loaded into float32
            parameters), or a bare state dict; default ``<shared>/weights/resnet50_imagenette.pth``.

    Raises:
        FileNotFoundError: the weights file is missing (the message names ``weights_path`` and
            ``LIGHTNING_QUANT_SHARED``).
        WeightsMismatchError: the file's keys or shapes do not match the architecture.
    """
    from torchvision.models import resnet50  # lazy: torchvision is an optional dependency

    path = _weights_file("resnet50_imagenette.pth", weights_path, "resnet50_imagenette")
    return load_weights(resnet50(weights=None, num_classes=10), path).eval()


def mobilenet_v2_imagenette_transform() -> Any:
    """Eval transform for :func:`mobilenet_v2_imagenette`: 224 px center crop, ToTensor, ImageNet mean/std.

    Example:
        >>> [type(op).__name__ for op in mobilenet_v2_imagenette_transform().transforms]
        ['CenterCrop', 'ToTensor', 'Normalize']
    """
    return imagenette_transform(**IMAGENETTE_EVAL_SIZES["mobilenet_v2"])


def resnet50_imagenette_transform() -> Any:
    """Eval transform for :func:`resnet50_imagenette`: shorter side 144, center crop 128, ImageNet mean/std.

    Example:
        >>> [type(op).__name__ for op in resnet50_imagenette_transform().transforms]
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
    """
    return imagenette_transform(**IMAGENETTE_EVAL_SIZES["resnet50"])


IMAGENETTE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": mobilenet_v2_imagenette,
    "resnet50": resnet50_imagenette,
}
