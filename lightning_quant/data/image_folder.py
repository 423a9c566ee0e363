"""Generic ImageFolder datamodule (your own ``train/<class>/*`` and ``val/<class>/*`` roots), e.g. ImageNet.

:class:`ClassificationDataModule` holds what every image-classification datamodule here shares: train / val /
test loaders and a calibration loader over a seeded subset of ``calibration_size`` train images, with the
evaluation transform. Subclasses only build the datasets (:meth:`ClassificationDataModule.build_datasets`).

Example:
    >>> dm = ImageFolderDataModule("/data/imagenet/train", "/data/imagenet/val", image_size=224, resize=256)
    >>> dm.batch_size
    64
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_quant.data.imagenette import _check_positive_int, calibration_subset, imagenette_transform

__all__ = ["ClassificationDataModule", "ImageFolderDataModule"]


class ClassificationDataModule(pl.LightningDataModule):
    """Base: loaders for ``train`` / ``val`` datasets and a seeded calibration subset of the train split.

    Example:
        >>> import torch
        >>> class Tiny(ClassificationDataModule):
        ...     def build_datasets(self):
        ...         ds = torch.utils.data.TensorDataset(torch.randn(20, 3, 4, 4), torch.zeros(20, dtype=torch.long))
        ...         return {"train": ds, "train_eval": ds, "val": ds}
        >>> dm = Tiny(batch_size=4, calibration_size=8, num_workers=0)
        >>> len(dm.calibration_dataloader())
        2

    Args:
        batch_size: images per batch for every loader (Vitis AI ``--batch_size``).
        num_workers: DataLoader worker processes.
        calibration_size: train images in :meth:`calibration_dataloader` (Vitis AI ``--subset_len``).
        seed: seed of the calibration subset.
        pin_memory: pin host memory in the loaders.

    Raises:
        ValueError: a non-positive ``batch_size`` or ``calibration_size``, a negative ``num_workers``, a
            non-integer ``seed``; at setup, ``calibration_size`` larger than the train split.
    """

    def __init__(
        self, *, batch_size: int = 64, num_workers: int = 2, calibration_size: int = 512, seed: int = 0,
        pin_memory: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_workers", num_workers, minimum=0)
        _check_positive_int("calibration_size", calibration_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer.")
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.calibration_size, self.seed = calibration_size, seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.calibration_dataset: Subset | None = None

    def build_datasets(self) -> dict[str, Dataset]:
        """Return ``train`` (maybe augmented), ``train_eval`` (eval transform) and ``val`` datasets."""
        raise NotImplementedError

    def eval_transform(self) -> Any:
        """The evaluation transform (also used for an unlabeled calibration folder)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once (idempotent)."""
        if self.train_dataset is not None:
            return
        datasets = self.build_datasets()
        self.calibration_dataset = calibration_subset(datasets["train_eval"], self.calibration_size, self.seed)
        self.train_dataset, self.val_dataset = datasets["train"], datasets["val"]

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled train split."""
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The evaluation split, in order."""
        self.setup()
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        """``calibration_size`` train images (seeded subset, eval transform, fixed order) for PTQ calibration."""
        self.setup()
        return self._loader(self.calibration_dataset, shuffle=False)


class ImageFolderDataModule(ClassificationDataModule):
    """Any labelled ImageFolder pair: ``train_root/<class>/*`` for training and calibration, ``val_root`` to evaluate.

    Example:
        >>> dm = ImageFolderDataModule("train", "val", image_size=224, resize=256, calibration_size=256)
        >>> [type(t).__name__ for t in dm.eval_transform().transforms]
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']

    Args:
        train_root: ImageFolder folder of the training split (calibration images come from here).
        val_root: ImageFolder folder of the evaluation split (same class sub-folders).
        image_size: center-crop side fed to the model.
        resize: resize the shorter side first (256 for ImageNet-trained 224 px models); None keeps the size.
        train_augment: random-resized crop + flip for the train loader.
        **kwargs: see :class:`ClassificationDataModule`.

    Raises:
        ValueError: see :class:`ClassificationDataModule`; train and val class folders differ (at setup).
        FileNotFoundError: at setup, a root is missing (the message says the expected layout).
    """

    def __init__(
        self,
        train_root: str | os.PathLike[str],
        val_root: str | os.PathLike[str],
        *,
        image_size: int = 224,
        resize: int | None = 256,
        train_augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_positive_int("image_size", image_size)
        if resize is not None:
            _check_positive_int("resize", resize)
        self.train_root, self.val_root = Path(train_root).expanduser(), Path(val_root).expanduser()
        self.image_size, self.resize, self.train_augment = image_size, resize, train_augment

    def eval_transform(self) -> Any:
        """[Resize], center crop, ToTensor, ImageNet mean/std."""
        return imagenette_transform(self.image_size, self.resize)

    def build_datasets(self) -> dict[str, Dataset]:
        """ImageFolder datasets for ``train``, ``train_eval`` and ``val``."""
        from torchvision.datasets import ImageFolder  # lazy: torchvision is an optional dependency

        for name, root in (("train_root", self.train_root), ("val_root", self.val_root)):
            if not root.is_dir():
                raise FileNotFoundError(
                    f"{name}={str(root)!r} does not exist. Point it at an ImageFolder folder (<class>/<image> files, "
                    f"e.g. ImageNet's {'train' if name == 'train_root' else 'val'} split sorted into wnid folders)."
                )
        eval_tf = self.eval_transform()
        train_tf = imagenette_transform(self.image_size, train_augment=True) if self.train_augment else eval_tf
        datasets = {
            "train": ImageFolder(str(self.train_root), transform=train_tf),
            "train_eval": ImageFolder(str(self.train_root), transform=eval_tf),
            "val": ImageFolder(str(self.val_root), transform=eval_tf),
        }
        if datasets["train"].classes != datasets["val"].classes:
            raise ValueError(
                f"train and val class folders differ ({len(datasets['train'].classes)} vs "
                f"{len(datasets['val'].classes)} classes); both roots need the same <class>/ sub-folders."
            )
        return datasets
