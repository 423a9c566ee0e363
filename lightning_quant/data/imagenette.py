"""Imagenette (10 ImageNet classes) as a LightningDataModule, with a calibration subset drawn from train.

Where the images come from, in order:
1. ``root=``: any folder in ImageFolder layout with ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``
   (e.g. the fast.ai ``imagenette2`` download, unpacked);
2. the offline archives ``<shared>/data/imagenette_{train,val}.tar.gz`` (see :func:`lightning_quant.paths.shared_dir`),
   extracted once into ``<cache>/imagenette_train/train`` and ``<cache>/imagenette_val/val``;
3. ``download=True``: torchvision downloads ``imagenette2-320`` into the cache (needs the internet; its
   images are 320 px on the shorter side, so pass ``resize=256`` for 224 px models).

The shared archives hold 224x224 images (9,469 train / 3,925 val). Calibration images come from the train
split only, never from val: :meth:`ImagenetteDataModule.calibration_dataloader` draws a seeded random subset
of it with the evaluation transform.

Example:
    >>> dm = ImagenetteDataModule(batch_size=32, calibration_size=64, num_workers=0)
    >>> dm.setup()  # doctest: +SKIP
    >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.calibration_dataset)  # doctest: +SKIP
    (9469, 3925, 64)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_quant.data.archives import extract_archive
from lightning_quant.paths import cache_dir, shared_dir

__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGENETTE_WNIDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagenetteDataModule",
    "calibration_subset",
    "imagenette_datasets",
    "imagenette_split_dirs",
    "imagenette_transform",
]

# Sorted order = torchvision ImageFolder class indices. (Parachute is n03888257 in the imagenette2 data.)
IMAGENETTE_WNIDS = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
)
IMAGENETTE_CLASSES = (
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ARCHIVES = {"train": "imagenette_train.tar.gz", "val": "imagenette_val.tar.gz"}


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


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

    _check_positive_int("image_size", image_size)
    if resize is not None:
        _check_positive_int("resize", resize)
    if train_augment:
        ops: list[Any] = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        ops = ([transforms.Resize(resize)] if resize is not None else []) + [transforms.CenterCrop(image_size)]
    return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenette_split_dirs(root: str | os.PathLike[str] | None = None, *, download: bool = False) -> dict[str, Path]:
    """Folders of the ``train`` and ``val`` splits, extracting the shared archives on first use.

    Example:
        >>> dirs = imagenette_split_dirs()  # doctest: +SKIP
        >>> dirs["val"].name, sorted(p.name for p in dirs["val"].iterdir())[0]  # doctest: +SKIP
        ('val', 'n01440764')

    Args:
        root: your own folder with ``train/`` and ``val/`` in ImageFolder layout; None uses the shared archives.
        download: with no ``root`` and no shared folder, download ``imagenette2-320`` with torchvision.

    Raises:
        FileNotFoundError: ``root`` lacks ``train/`` or ``val/``; or no root, no shared folder and no download;
            or the shared folder lacks an archive. Each message names the fix.
    """
    if root is not None:
        root = Path(root).expanduser()
        dirs = {split: root / split for split in ("train", "val")}
        missing = [str(d) for d in dirs.values() if not d.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"root={str(root)!r} is not an Imagenette folder: missing {', '.join(missing)}. Expected ImageFolder "
                "layout root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (the unpacked fast.ai imagenette2 "
                "archive has it), or leave root=None to use the shared offline archives."
            )
        return dirs
    shared = shared_dir()
    if shared is not None and (shared / "data").is_dir():
        return {split: extract_archive(shared / "data" / name) / split for split, name in _ARCHIVES.items()}
    if download:
        from torchvision.datasets import Imagenette  # lazy: needs torchvision and the internet

        for split in ("train", "val"):
            Imagenette(cache_dir(), split=split, size="320px", download=True)
        return imagenette_split_dirs(cache_dir() / "imagenette2-320")
    raise FileNotFoundError(
        "no Imagenette data found: pass root=/path/to/imagenette2 (ImageFolder layout with train/ and val/), set "
        "LIGHTNING_QUANT_SHARED=/path/to/shared (the folder holding data/imagenette_{train,val}.tar.gz), or pass "
        "download=True to download imagenette2-320 with torchvision."
    )


def imagenette_datasets(
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 224,
    resize: int | None = None,
    train_augment: bool = False,
    download: bool = False,
) -> dict[str, Any]:
    """``ImageFolder`` datasets ``train`` (optionally augmented), ``train_eval`` (eval transform) and ``val``.

    Example:
        >>> ds = imagenette_datasets(image_size=224)  # doctest: +SKIP
        >>> len(ds["train"]), len(ds["val"]), ds["val"][0][0].shape  # doctest: +SKIP
        (9469, 3925, torch.Size([3, 224, 224]))

    Args:
        root: see :func:`imagenette_split_dirs`.
        image_size: crop side fed to the model.
        resize: shorter side to resize to before cropping; None keeps the images' size.
        train_augment: augment the ``train`` dataset (random-resized crop + flip).
        download: see :func:`imagenette_split_dirs`.

    Raises:
        FileNotFoundError: see :func:`imagenette_split_dirs`.
        ValueError: train and val have different class folders, or a bad ``image_size`` / ``resize``.
    """
    from torchvision.datasets import ImageFolder  # lazy: torchvision is an optional dependency

    dirs = imagenette_split_dirs(root, download=download)
    eval_tf = imagenette_transform(image_size, resize)
    train_tf = imagenette_transform(image_size, resize, train_augment=True) if train_augment else eval_tf
    datasets = {
        "train": ImageFolder(str(dirs["train"]), transform=train_tf),
        "train_eval": ImageFolder(str(dirs["train"]), transform=eval_tf),
        "val": ImageFolder(str(dirs["val"]), transform=eval_tf),
    }
    if datasets["train"].classes != datasets["val"].classes:
        raise ValueError(
            f"train and val class folders differ ({datasets['train'].classes} vs {datasets['val'].classes}); both "
            "splits need the same <class>/ sub-folders so that label indices agree."
        )
    return datasets


def _seeded_permutation(n: int, seed: int) -> torch.Tensor:
    """The permutation of ``range(n)`` both subsets are cut from (the same seed gives the same order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def calibration_subset(dataset: Dataset, size: int, seed: int = 0) -> Subset:
    """A reproducible random subset of ``size`` items (the same ``seed`` gives the same items, in the same order).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(100))
        >>> calibration_subset(ds, 5, seed=0).indices == calibration_subset(ds, 5, seed=0).indices
        True

    Raises:
        ValueError: ``size`` < 1 or larger than the dataset.
    """
    _check_positive_int("calibration_size", size)
    n = len(dataset)  # type: ignore[arg-type]
    if size > n:
        raise ValueError(f"calibration_size={size} is larger than the training split ({n} images); use at most {n}.")
    return Subset(dataset, _seeded_permutation(n, seed)[:size].tolist())


def held_out_subset(dataset: Dataset, size: int, *, calibration_size: int, seed: int = 0) -> Subset:
    """``size`` items disjoint from ``calibration_subset(dataset, calibration_size, seed)``: the next ``size``
    positions of the same seeded permutation (for tuning decisions such as accuracy control, never evaluation).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(100))
        >>> held = held_out_subset(ds, 20, calibration_size=50, seed=0)
        >>> len(held), set(held.indices) & set(calibration_subset(ds, 50, seed=0).indices)
        (20, set())

    Raises:
        ValueError: ``size`` < 1, or the two subsets together larger than the dataset.
    """
    _check_positive_int("tuning_size", size)
    _check_positive_int("calibration_size", calibration_size)
    n = len(dataset)  # type: ignore[arg-type]
    if calibration_size + size > n:
        raise ValueError(
            f"tuning_size={size} + calibration_size={calibration_size} exceed the training split ({n} images); "
            f"use at most {n - calibration_size} held-out images."
        )
    return Subset(dataset, _seeded_permutation(n, seed)[calibration_size : calibration_size + size].tolist())


class ImagenetteDataModule(pl.LightningDataModule):
    """Imagenette train/val loaders plus a calibration loader drawn from the train split.

    Example:
        >>> dm = ImagenetteDataModule(batch_size=64, calibration_size=512, seed=0)  # 224 px, MobileNetV2
        >>> dm = ImagenetteDataModule(image_size=128, resize=144)                   # ResNet50 (128 px) weights
        >>> # trainer.validate(model, datamodule=dm); quantize(model, dm.calibration_dataloader())

    Args:
        root: ImageFolder folder with ``train/`` and ``val/``; None extracts the shared offline archives.
        batch_size: images per batch for every loader.
        num_workers: DataLoader worker processes.
        calibration_size: number of train images in :meth:`calibration_dataloader`.
        seed: seed of the calibration subset (and nothing else).
        image_size: crop side fed to the model.
        resize: shorter side to resize to before the center crop; None keeps the images' size.
        train_augment: random-resized crop + flip in :meth:`train_dataloader` (off: the eval transform).
        download: with no ``root`` and no shared folder, download imagenette2-320 (needs the internet).
        pin_memory: pin host memory in the loaders (useful with a GPU).

    Raises:
        ValueError: a non-positive ``batch_size``, ``calibration_size``, ``image_size`` or ``resize``, a
            negative ``num_workers``; at setup, ``calibration_size`` larger than the train split.
        FileNotFoundError: at setup, no data was found (the message lists the three ways to provide it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 64,
        num_workers: int = 2,
        calibration_size: int = 512,
        seed: int = 0,
        image_size: int = 224,
        resize: int | None = None,
        train_augment: bool = False,
        download: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_workers", num_workers, minimum=0)
        _check_positive_int("calibration_size", calibration_size)
        _check_positive_int("image_size", image_size)
        if resize is not None:
            _check_positive_int("resize", resize)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer.")
        self.save_hyperparameters()
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.calibration_size = calibration_size
        self.seed = seed
        self.image_size = image_size
        self.resize = resize
        self.train_augment = train_augment
        self.download = download
        self.pin_memory = pin_memory
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.calibration_dataset: Subset | None = None

    def prepare_data(self) -> None:
        """Extract the shared archives (or download) once, on one process per node."""
        imagenette_split_dirs(self.root, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (idempotent; extracts the archives first when that has not happened)."""
        if self.train_dataset is not None:
            return
        datasets = imagenette_datasets(
            self.root,
            image_size=self.image_size,
            resize=self.resize,
            train_augment=self.train_augment,
            download=self.download,
        )
        self.calibration_dataset = calibration_subset(datasets["train_eval"], self.calibration_size, self.seed)
        self.train_dataset, self.val_dataset = datasets["train"], datasets["val"]

    @property
    def classes(self) -> list[str]:
        """Class folder names (wnids) in label order."""
        self.setup()
        return list(self.val_dataset.classes)  # type: ignore[union-attr]

    def _loader(self, attr: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            getattr(self, attr),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled train split (eval transform unless ``train_augment``)."""
        return self._loader("train_dataset", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The whole val split, in order."""
        return self._loader("val_dataset", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (Imagenette has no labelled test split)."""
        return self.val_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        """``calibration_size`` train images (seeded subset, eval transform, fixed order) for PTQ calibration."""
        return self._loader("calibration_dataset", shuffle=False)
