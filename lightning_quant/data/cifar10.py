"""CIFAR-10 as a LightningDataModule, with a seeded calibration subset of the train split.

Where the images come from, in order:
1. ``root=``: a folder with ``train/<class>/*`` and ``test/<class>/*`` (ImageFolder layout);
2. the offline archive ``<shared>/data/cifar10_jpg.tar.gz`` (50,000 / 10,000 JPEGs), extracted once into the
   cache (:func:`lightning_quant.paths.cache_dir`) with :func:`~lightning_quant.data.extract_archive`;
3. ``download=True``: ``torchvision.datasets.CIFAR10`` downloads the original (lossless) data (needs the internet).

Images are 32x32; the transform is ToTensor + ImageNet mean/std (what the CIFAR ResNet weights expect).

Example:
    >>> dm = CIFAR10DataModule(batch_size=128, calibration_size=256, num_workers=0)
    >>> dm.setup()  # doctest: +SKIP
    >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.calibration_dataset)  # doctest: +SKIP
    (50000, 10000, 256)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_quant.data.archives import extract_archive
from lightning_quant.data.classification import ClassificationDataModule
from lightning_quant.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lightning_quant.paths import cache_dir, shared_dir

__all__ = ["CIFAR10_CLASSES", "CIFAR10DataModule", "cifar10_transform"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ARCHIVE = "cifar10_jpg.tar.gz"


def cifar10_transform(*, train_augment: bool = False) -> Any:
    """ToTensor + ImageNet mean/std, after random crop (pad 4) and flip when ``train_augment``.

    Example:
        >>> [type(op).__name__ for op in cifar10_transform().transforms]
        ['ToTensor', 'Normalize']
    """
    from torchvision import transforms  # lazy: torchvision is an optional dependency

    ops: list[Any] = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train_augment else []
    return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 train/test loaders plus a calibration loader drawn from the train split.

    Example:
        >>> CIFAR10DataModule(download=True).download
        True

    Args:
        root: folder with ``train/`` and ``test/`` in ImageFolder layout; None uses the shared archive
            (or ``download``).
        download: with no ``root`` and no shared archive, download with ``torchvision.datasets.CIFAR10``.
        train_augment: random crop + flip for the train loader.
        **kwargs: ``batch_size``, ``num_workers``, ``calibration_size``, ``seed``, ``pin_memory``
            (see :class:`~lightning_quant.data.classification.ClassificationDataModule`).

    Raises:
        ValueError: bad loader arguments (see the base class).
        FileNotFoundError: at setup, no data was found; the message lists the three ways to provide it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        train_augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root, self.download, self.train_augment = root, download, train_augment

    def eval_transform(self) -> Any:
        """ToTensor + ImageNet mean/std."""
        return cifar10_transform()

    def _folder_root(self) -> Path | None:
        if self.root is not None:
            root = Path(self.root).expanduser()
            if not (root / "train").is_dir() or not (root / "test").is_dir():
                raise FileNotFoundError(
                    f"root={str(root)!r} is not a CIFAR-10 folder: expected root/train/<class>/* and "
                    "root/test/<class>/* (ImageFolder layout); or leave root=None to use the shared archive."
                )
            return root
        shared = shared_dir()
        if shared is not None and (shared / "data" / _ARCHIVE).is_file():
            return extract_archive(shared / "data" / _ARCHIVE)
        if self.download:
            return None
        raise FileNotFoundError(
            f"no CIFAR-10 data found: pass root=/path/to/cifar10 (train/ and test/ ImageFolder folders), set "
            f"LIGHTNING_QUANT_SHARED=/path/to/shared (the folder holding data/{_ARCHIVE}), or pass download=True "
            "to download it with torchvision."
        )

    def prepare_data(self) -> None:
        """Extract the shared archive (or download) once."""
        if self._folder_root() is None:
            from torchvision.datasets import CIFAR10  # lazy: needs the internet

            for train in (True, False):
                CIFAR10(str(cache_dir() / "cifar10"), train=train, download=True)

    def build_datasets(self) -> dict[str, Dataset]:
        """``train`` (maybe augmented), ``train_eval`` and ``val`` (= the test split)."""
        eval_tf = self.eval_transform()
        train_tf = cifar10_transform(train_augment=True) if self.train_augment else eval_tf
        root = self._folder_root()
        if root is None:
            from torchvision.datasets import CIFAR10

            self.prepare_data()
            folder = str(cache_dir() / "cifar10")
            return {
                "train": CIFAR10(folder, train=True, transform=train_tf),
                "train_eval": CIFAR10(folder, train=True, transform=eval_tf),
                "val": CIFAR10(folder, train=False, transform=eval_tf),
            }
        from torchvision.datasets import ImageFolder

        return {
            "train": ImageFolder(str(root / "train"), transform=train_tf),
            "train_eval": ImageFolder(str(root / "train"), transform=eval_tf),
            "val": ImageFolder(str(root / "test"), transform=eval_tf),
        }
