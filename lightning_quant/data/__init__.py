"""Datamodules and offline data helpers.

Example:
    >>> from lightning_quant.data import ImagenetteDataModule
    >>> dm = ImagenetteDataModule(batch_size=32, calibration_size=256)
"""

from lightning_quant.data.archives import extract_archive
from lightning_quant.data.calibration_folder import IMAGE_EXTENSIONS, CalibrationFolder
from lightning_quant.data.cifar10 import CIFAR10_CLASSES, CIFAR10DataModule, cifar10_transform
from lightning_quant.data.classification import ClassificationDataModule
from lightning_quant.data.image_folder import ImageFolderDataModule
from lightning_quant.data.imagenette import (
    IMAGENETTE_CLASSES,
    IMAGENETTE_WNIDS,
    ImagenetteDataModule,
    imagenette_datasets,
)
from lightning_quant.data.splits import calibration_subset, held_out_subset
from lightning_quant.data.transforms import IMAGENET_MEAN, IMAGENET_STD, imagenette_transform

__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGENETTE_WNIDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagenetteDataModule",
    "calibration_subset",
    "extract_archive",
    "held_out_subset",
    "imagenette_datasets",
    "imagenette_transform",
    "CIFAR10_CLASSES",
    "CIFAR10DataModule",
    "CalibrationFolder",
    "ClassificationDataModule",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataModule",
    "cifar10_transform",
]
