"""CIFAR-10 as a LightningDataModule, with a seeded calibration subset of the train split.

Where the images come from, in order:
1. ``root=``: a folder with ``train/<class>/*`` and ``test/<class>/*`` (ImageFolder layout);
2. the offline archive ``<shared>/data/cifar10_jpg.tar.gz`` (50,000 / 10,000 JPEGs), extracted once into the
   cache (:func:`lightning_quant.paths.cache_dir`) with :func:`~lightning_quant.data.extract_archive`;
3. an earlier download in the cache (:func:`cifar10_download_dir`, ``<cache>/cifar10``);
4. ``download=True``: ``torchvision.datasets.CIFAR10`` downloads the original (lossless) data there (needs the
   internet; atomic, MD5-checked, with a progress bar).

Offline with none of them, :class:`~lightning_quant.downloads.AssetUnavailableError` names the ways to provide it.

Images are 32x32; the transform is ToTensor + ImageNet mean/std (what the CIFAR ResNet weights expect).

Example:
    >>> dm = CIFAR10DataModule(batch_size=128, calibration_size=256, num_workers=0)
    >>> dm.setup()  # doctest: +SKIP
    >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.calibration_dataset)  # doctest: +SKIP
    (50000, 10000, 256)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_quant.data.archives import extract_archive
from lightning_quant.data.classification import ClassificationDataModule
from lightning_quant.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lightning_quant.downloads import AssetUnavailableError, is_offline
from lightning_quant.paths import cache_dir, shared_dir

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_RELEASE",
    "CIFAR10DataModule",
    "cifar10_download_dir",
    "cifar10_transform",
    "download_cifar10",
    "is_downloaded",
    "torchvision_cifar10",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ARCHIVE = "cifar10_jpg.tar.gz"
# Class attributes of torchvision.datasets.CIFAR10 replaced for download and loading (url, filename, tgz_md5,
# train_list, test_list, meta); empty keeps torchvision's own release and checksums. Tests point it at a local server.
CIFAR10_RELEASE: dict[str, Any] = {}


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
        root: folder with ``train/`` and ``test/`` in ImageFolder layout; None uses the shared archive, an earlier
            download in the cache, or ``download``.
        download: with no ``root``, shared archive or cached copy, download with ``torchvision.datasets.CIFAR10``.
        train_augment: random crop + flip for the train loader.
        **kwargs: ``batch_size``, ``num_workers``, ``calibration_size``, ``seed``, ``pin_memory``
            (see :class:`~lightning_quant.data.classification.ClassificationDataModule`).

    Raises:
        ValueError: bad loader arguments (see the base class).
        FileNotFoundError: at setup, ``root`` is not a CIFAR-10 folder.
        AssetUnavailableError: (a ``FileNotFoundError``) at setup, no data was found and none can be downloaded;
            the message names ``root=``, ``download=True`` and ``LIGHTNING_QUANT_SHARED``.
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

    def check_source(self) -> str:
        """Where the images will come from, found without extracting or downloading anything.

        Returns ``"root"``, ``"shared"`` (the shared archive), ``"cache"`` (an earlier download in
        :func:`cifar10_download_dir`) or ``"download"`` (``download=True`` and the download server is reachable).

        Raises:
            FileNotFoundError: ``root`` is not a CIFAR-10 folder.
            AssetUnavailableError: (a ``FileNotFoundError``) none of them; offline with ``download=True``. The message
                names ``root=``, ``download=True`` and ``LIGHTNING_QUANT_SHARED``.
        """
        if self.root is not None:
            root = Path(self.root).expanduser()
            if not (root / "train").is_dir() or not (root / "test").is_dir():
                raise FileNotFoundError(
                    f"root={str(root)!r} is not a CIFAR-10 folder: expected root/train/<class>/* and "
                    "root/test/<class>/* (ImageFolder layout); or leave root=None to use the shared archive."
                )
            return "root"
        shared = shared_dir()
        if shared is not None and (shared / "data" / _ARCHIVE).is_file():
            return "shared"
        release = torchvision_cifar10()
        if is_downloaded(cifar10_download_dir(), release):
            return "cache"
        if self.download and not is_offline(release.url):
            return "download"
        raise self._unavailable(release.url, "this machine is offline" if self.download else None)

    def _unavailable(self, url: str, reason: str | None) -> AssetUnavailableError:
        shared = shared_dir()
        where = f"no shared archive ({shared / 'data' / _ARCHIVE if shared else 'no shared folder found'})"
        problem = f"no CIFAR-10 data found: no root folder, {where}, no earlier download in {cifar10_download_dir()}"
        if reason:
            problem += f"; and {reason}, so torchvision cannot download it from {url}"
        arguments: dict[str, Any] = {"root": "/path/to/cifar10"}
        if not self.download:
            arguments["download"] = True
        return AssetUnavailableError(
            problem + ". A root folder holds train/<class>/* and test/<class>/* images (ImageFolder layout).",
            arguments=arguments,
            also=f"set LIGHTNING_QUANT_SHARED=/path/to/shared (the folder holding data/{_ARCHIVE})",
        )

    def _folder_root(self) -> Path | None:
        """The ImageFolder root (``root`` or the extracted shared archive); None for torchvision's own layout."""
        source = self.check_source()
        if source == "root":
            return Path(self.root).expanduser()  # type: ignore[arg-type]
        if source == "shared":
            return extract_archive(shared_dir() / "data" / _ARCHIVE)  # type: ignore[operator]
        return None

    def prepare_data(self) -> None:
        """Extract the shared archive, or download with torchvision, once."""
        if self._folder_root() is None and not is_downloaded(cifar10_download_dir(), torchvision_cifar10()):
            release = torchvision_cifar10()
            try:
                download_cifar10(cifar10_download_dir(), release)
            except OSError as err:  # urllib.error.URLError is an OSError: no route, DNS, HTTP error, timeout
                raise self._unavailable(release.url, f"the download failed ({err})") from err

    def build_datasets(self) -> dict[str, Dataset]:
        """``train`` (maybe augmented), ``train_eval`` and ``val`` (= the test split)."""
        eval_tf = self.eval_transform()
        train_tf = cifar10_transform(train_augment=True) if self.train_augment else eval_tf
        root = self._folder_root()
        if root is None:
            self.prepare_data()
            folder, release = str(cifar10_download_dir()), torchvision_cifar10()
            return {
                "train": release(folder, train=True, transform=train_tf),
                "train_eval": release(folder, train=True, transform=eval_tf),
                "val": release(folder, train=False, transform=eval_tf),
            }
        from torchvision.datasets import ImageFolder

        return {
            "train": ImageFolder(str(root / "train"), transform=train_tf),
            "train_eval": ImageFolder(str(root / "train"), transform=eval_tf),
            "val": ImageFolder(str(root / "test"), transform=eval_tf),
        }


def cifar10_download_dir() -> Path:
    """Where ``download=True`` keeps torchvision's CIFAR-10 (``<cache>/cifar10/cifar-10-batches-py``).

    Example:
        >>> cifar10_download_dir().name
        'cifar10'
    """
    return cache_dir() / "cifar10"


def torchvision_cifar10() -> type:
    """``torchvision.datasets.CIFAR10``, with :data:`CIFAR10_RELEASE`'s class attributes when it has any."""
    from torchvision.datasets import CIFAR10  # lazy: torchvision is an optional dependency

    return type("CIFAR10", (CIFAR10,), dict(CIFAR10_RELEASE)) if CIFAR10_RELEASE else CIFAR10


def is_downloaded(folder: str | os.PathLike[str], release: type) -> bool:
    """True when ``folder`` holds every file of ``release`` (a torchvision CIFAR10 class) with its MD5.

    Example:
        >>> is_downloaded("/nonexistent", torchvision_cifar10())
        False
    """
    from torchvision.datasets.utils import check_integrity

    files = [*release.train_list, *release.test_list, (release.meta["filename"], release.meta["md5"])]
    return all(check_integrity(os.path.join(folder, release.base_folder, name), md5) for name, md5 in files)


def download_cifar10(folder: str | os.PathLike[str], release: type | None = None) -> Path:
    """Download and extract CIFAR-10 with torchvision (progress bar, MD5 check) into ``folder``, atomically.

    torchvision works in a temporary folder beside ``folder``, which is renamed into place once complete; its
    archive is deleted after extraction. When another process got there first, its copy is kept.

    Example:
        >>> download_cifar10(cifar10_download_dir())  # doctest: +SKIP
        PosixPath('/home/me/.cache/lightning_quant/cifar10')

    Raises:
        urllib.error.URLError: the server could not be reached (nothing is left behind).
        RuntimeError: torchvision's MD5 check failed ("File not found or corrupted.").
    """
    release = release or torchvision_cifar10()
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        release(str(tmp), train=True, download=True)  # downloads, checks the MD5s, extracts
        (tmp / release.filename).unlink(missing_ok=True)
        if not is_downloaded(folder, release):
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete copy of an interrupted older run
            try:
                os.replace(tmp, folder)
            except OSError:  # another process renamed its complete copy into place meanwhile
                if not is_downloaded(folder, release):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
