"""The unlabeled calibration folder: recursive discovery, seeded subsets, corrupt files skipped, clear errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lightning_quant.data import CalibrationFolder


def _images(folder, count, size=(20, 16)):
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        where = folder / "nested" if i % 2 else folder
        Image.new("RGB", size, (10 * i, 50, 100)).save(where / f"img{i}.png")
    return folder


def test_finds_images_recursively(tmp_path):
    ds = CalibrationFolder(_images(tmp_path, 5))
    assert len(ds) == 5
    assert ds[0].shape == (3, 16, 20) and ds[0].dtype == torch.float32


def test_seeded_subset(tmp_path):
    _images(tmp_path, 10)
    a, b = CalibrationFolder(tmp_path, size=4, seed=3), CalibrationFolder(tmp_path, size=4, seed=3)
    assert a.files == b.files and len(a) == 4
    assert CalibrationFolder(tmp_path, size=4, seed=4).files != a.files


def test_transform_applied(tmp_path):
    ds = CalibrationFolder(_images(tmp_path, 2), transform=lambda img: torch.tensor(img.size))
    assert ds[0].tolist() == [20, 16]


def test_corrupt_image_skipped_with_warning(tmp_path):
    _images(tmp_path, 3)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) that cannot be decoded .*using 3"):
        ds = CalibrationFolder(tmp_path)
    assert len(ds) == 3 and all(p.name != "broken.jpg" for p in ds.files)


def test_all_bad_raises(tmp_path):
    for i in range(2):
        (tmp_path / f"bad{i}.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of its 2 image file"):
        CalibrationFolder(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a folder of images"):
        CalibrationFolder(tmp_path / "nope")


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="holds no image file"):
        CalibrationFolder(tmp_path)


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_size(tmp_path, size):
    with pytest.raises(ValueError, match="must be a positive integer or None"):
        CalibrationFolder(_images(tmp_path, 1), size=size)
