"""An unlabeled calibration folder: any images, no class sub-folders (like mmdeploy's ``--quant-image-dir``).

Files are found recursively by extension, shuffled with ``seed``, and decoded one by one until ``size`` good
images are found; files that cannot be decoded (damaged, truncated, not an image, or a decompression bomb that
Pillow refuses) are skipped with one warning giving their count. Items are image tensors (no labels), so a
DataLoader over it yields plain input batches that :class:`~lightning_quant.QuantCallback` accepts as
``calibration_data``.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> for i in range(3):
    ...     Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(folder / f"img{i}.jpg")
    >>> ds = CalibrationFolder(folder, size=2, seed=0)
    >>> len(ds), tuple(ds[0].shape)
    (2, (3, 30, 40))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "CalibrationFolder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _decodes(path: Path) -> bool:
    """Whether ``path`` decodes to an RGB image: False for damaged, truncated or non-image files, and for images
    larger than Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` x 2), which it refuses to open."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.convert("RGB").load()
        return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


class CalibrationFolder(Dataset):
    """Seeded subset of ``size`` decodable images found under ``root`` (recursively), as tensors.

    Example:
        >>> CalibrationFolder.find_images("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: calibration folder '/nonexistent' does not exist; pass a folder of images.

    Args:
        root: folder of images (any depth; labels are not used).
        transform: maps a PIL RGB image to the model input (default: ``ToTensor``); use the evaluation
            transform of the model's data (e.g. ``datamodule.eval_transform()``).
        size: number of images to use (Vitis AI ``--subset_len``); None uses every decodable image.
        seed: seed of the random choice of images.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no image file (the message lists the extensions).
        ValueError: no image in ``root`` could be decoded, or ``size`` < 1.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        *,
        size: int | None = None,
        seed: int = 0,
    ) -> None:
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size={size!r} must be a positive integer or None (all images).")
        self.root = Path(root).expanduser()
        self.transform = transform
        files = self.find_images(self.root)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(int(seed))).tolist()
        self.files: list[Path] = []
        self.skipped: list[Path] = []
        for index in order:
            if size is not None and len(self.files) >= size:
                break
            (self.files if _decodes(files[index]) else self.skipped).append(files[index])
        if self.skipped:
            warnings.warn(
                f"calibration folder {str(self.root)!r}: skipped {len(self.skipped)} image(s) that cannot be decoded "
                f"(e.g. {self.skipped[0].name}); using {len(self.files)}.",
                stacklevel=2,
            )
        if not self.files:
            raise ValueError(
                f"calibration folder {str(self.root)!r}: none of its {len(files)} image file(s) could be decoded; "
                "replace the damaged files or point at another folder."
            )

    @staticmethod
    def find_images(root: str | os.PathLike[str]) -> list[Path]:
        """Image files under ``root`` (recursively, sorted), by extension.

        Raises:
            FileNotFoundError: ``root`` is missing or holds no image file.
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"calibration folder {str(root)!r} does not exist; pass a folder of images.")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(
                f"calibration folder {str(root)!r} holds no image file (looked for {', '.join(IMAGE_EXTENSIONS)})."
            )
        return files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            rgb = image.convert("RGB")
        if self.transform is not None:
            return self.transform(rgb)
        from torchvision.transforms.functional import to_tensor

        return to_tensor(rgb)
