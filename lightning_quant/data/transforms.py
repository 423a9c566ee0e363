"""The ImageNet-style image transform of the Imagenette and ImageFolder datamodules, and the ImageNet mean/std.

Example:
    >>> [type(op).__name__ for op in imagenette_transform(image_size=224, resize=256).transforms]
    ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
"""

from __future__ import annotations

from typing import Any

from lightning_quant.data.checks import check_positive_int

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenette_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenette_transform(image_size: int = 224, resize: int | None = None, *, train_augment: bool = False) -> Any:
    """The torchvision transform: [resize shorter side], center-crop, ToTensor, ImageNet mean/std.

    Example:
        >>> t = imagenette_transform(image_size=128, resize=144)
        >>> [type(op).__name__ for op in t.transforms]
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']

    Args:
        image_size: side of the square crop fed to the model (a no-op crop when images already have that size).
        resize: resize the shorter side to this many pixels first; None keeps the images' size.
        train_augment: random-resized crop and horizontal flip instead of resize + center crop.

    Raises:
        ValueError: ``image_size`` or ``resize`` is not a positive integer.
    """
    from torchvision import transforms  # lazy: torchvision is an optional dependency

    check_positive_int("image_size", image_size)
    if resize is not None:
        check_positive_int("resize", resize)
    if train_augment:
        ops: list[Any] = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        ops = ([transforms.Resize(resize)] if resize is not None else []) + [transforms.CenterCrop(image_size)]
    return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
