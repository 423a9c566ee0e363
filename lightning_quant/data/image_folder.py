"""Generic ImageFolder datamodule (your own ``train/<class>/*`` and ``val/<class>/*`` roots), e.g. ImageNet.

Example:
    >>> dm = ImageFolderDataModule("/data/imagenet/train", "/data/imagenet/val", image_size=224, resize=256)
    >>> dm.batch_size
    64
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_quant.data.checks import check_positive_int
from lightning_quant.data.classification import ClassificationDataModule
from lightning_quant.data.transforms import imagenette_transform

__all__ = ["ImageFolderDataModule"]


class ImageFolderDataModule(ClassificationDataModule):
    """Any labelled ImageFolder pair: ``train_root/<class>/*`` for training and calibration, ``val_root`` to evaluate.

    Example:
        >>> dm = ImageFolderDataModule("train", "val", image_size=224, resize=256, calibration_size=256)
        >>> [type(t).__name__ for t in dm.eval_transform().transforms]
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']

    Args:
        train_root: ImageFolder folder of the training split (calibration images come from here); None for an
            evaluation-only datamodule (calibrate on an unlabeled folder: app ``data.calibration_dir=...``).
        val_root: ImageFolder folder of the evaluation split (same class sub-folders).
        image_size: center-crop side fed to the model.
        resize: resize the shorter side first (256 for ImageNet-trained 224 px models); None keeps the size.
        train_augment: random-resized crop + flip for the train loader.
        **kwargs: see :class:`~lightning_quant.data.classification.ClassificationDataModule`.

    Raises:
        ValueError: see :class:`~lightning_quant.data.classification.ClassificationDataModule`; train and val class
            folders differ (at setup).
        FileNotFoundError: at setup, a root is missing (the message says the expected layout).
    """

    def __init__(
        self,
        train_root: str | os.PathLike[str] | None,
        val_root: str | os.PathLike[str],
        *,
        image_size: int = 224,
        resize: int | None = 256,
        train_augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int("image_size", image_size)
        if resize is not None:
            check_positive_int("resize", resize)
        self.train_root = None if train_root is None else Path(train_root).expanduser()
        self.val_root = Path(val_root).expanduser()
        self.image_size, self.resize, self.train_augment = image_size, resize, train_augment

    def eval_transform(self) -> Any:
        """[Resize], center crop, ToTensor, ImageNet mean/std."""
        return imagenette_transform(self.image_size, self.resize)

    def build_datasets(self) -> dict[str, Dataset]:
        """ImageFolder datasets for ``train``, ``train_eval`` and ``val``."""
        from torchvision.datasets import ImageFolder  # lazy: torchvision is an optional dependency

        for name, root in (("train_root", self.train_root), ("val_root", self.val_root)):
            if root is not None and not root.is_dir():
                raise FileNotFoundError(
                    f"{name}={str(root)!r} does not exist. Point it at an ImageFolder folder (<class>/<image> files, "
                    f"e.g. ImageNet's {'train' if name == 'train_root' else 'val'} split sorted into wnid folders)."
                )
        eval_tf = self.eval_transform()
        train_tf = imagenette_transform(self.image_size, train_augment=True) if self.train_augment else eval_tf
        datasets = {"val": ImageFolder(str(self.val_root), transform=eval_tf)}
        if self.train_root is None:  # evaluation only (calibration from an unlabeled folder)
            return datasets
        datasets["train"] = ImageFolder(str(self.train_root), transform=train_tf)
        datasets["train_eval"] = ImageFolder(str(self.train_root), transform=eval_tf)
        if datasets["train"].classes != datasets["val"].classes:
            raise ValueError(
                f"train and val class folders differ ({len(datasets['train'].classes)} vs "
                f"{len(datasets['val'].classes)} classes); both roots need the same <class>/ sub-folders."
            )
        return datasets
