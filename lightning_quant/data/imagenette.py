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

from torch.utils.data import Dataset

from lightning_quant.data.archives import extract_archive
from lightning_quant.data.checks import check_positive_int
from lightning_quant.data.classification import ClassificationDataModule
from lightning_quant.data.splits import held_out_subset  # noqa: F401  (app/accuracy_control_step.py imports it here)
from lightning_quant.data.transforms import imagenette_transform
from lightning_quant.paths import cache_dir, shared_dir

__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGENETTE_WNIDS",
    "ImagenetteDataModule",
    "imagenette_datasets",
    "imagenette_split_dirs",
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
_ARCHIVES = {"train": "imagenette_train.tar.gz", "val": "imagenette_val.tar.gz"}


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


class ImagenetteDataModule(ClassificationDataModule):
    """Imagenette train/val loaders plus a calibration loader drawn from the train split (the loaders are
    :class:`~lightning_quant.data.classification.ClassificationDataModule`'s; this class says where the images are).

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
            negative ``num_workers``, a non-integer ``seed``; at setup, ``calibration_size`` larger than the train
            split.
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
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            calibration_size=calibration_size,
            seed=seed,
            pin_memory=pin_memory,
        )
        check_positive_int("image_size", image_size)
        if resize is not None:
            check_positive_int("resize", resize)
        self.save_hyperparameters()
        self.root = root
        self.image_size = image_size
        self.resize = resize
        self.train_augment = train_augment
        self.download = download

    def prepare_data(self) -> None:
        """Extract the shared archives (or download) once, on one process per node."""
        imagenette_split_dirs(self.root, download=self.download)

    def eval_transform(self) -> Any:
        """[Resize], center crop, ToTensor, ImageNet mean/std (:func:`~lightning_quant.data.imagenette_transform`)."""
        return imagenette_transform(self.image_size, self.resize)

    def build_datasets(self) -> dict[str, Dataset]:
        """:func:`imagenette_datasets` (extracts the archives first when that has not happened)."""
        return imagenette_datasets(
            self.root,
            image_size=self.image_size,
            resize=self.resize,
            train_augment=self.train_augment,
            download=self.download,
        )

    @property
    def classes(self) -> list[str]:
        """Class folder names (wnids) in label order."""
        self.setup()
        return list(self.val_dataset.classes)  # type: ignore[union-attr]
