"""CIFAR-10 and generic ImageFolder datamodules: sources, calibration from train, and error messages."""

from __future__ import annotations

import pytest
from PIL import Image

from lightning_quant.data import CIFAR10DataModule, ImageFolderDataModule
from lightning_quant.paths import shared_dir


def _tree(root, split, classes=("a", "b"), per_class=3, size=32):
    for name in classes:
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (i * 40, 0, 0)).save(root / split / name / f"{i}.png")


def test_cifar10_from_root(tmp_path):
    _tree(tmp_path, "train")
    _tree(tmp_path, "test")
    dm = CIFAR10DataModule(tmp_path, batch_size=2, calibration_size=4, num_workers=0)
    x, y = next(iter(dm.calibration_dataloader()))
    assert x.shape == (2, 3, 32, 32) and len(dm.calibration_dataset) == 4
    assert len(dm.val_dataset) == 6


def test_cifar10_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="root/train/<class>"):
        CIFAR10DataModule(tmp_path, num_workers=0).setup()


def test_cifar10_no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_SHARED", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path / "cache"))  # no earlier download either
    with pytest.raises(FileNotFoundError, match="download=True"):
        CIFAR10DataModule(num_workers=0).setup()


@pytest.mark.skipif(shared_dir() is None, reason="needs the shared data folder (../shared or LIGHTNING_QUANT_SHARED)")
def test_cifar10_shared_archive():
    dm = CIFAR10DataModule(batch_size=8, calibration_size=8, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == 50000 and len(dm.val_dataset) == 10000
    assert dm.val_dataset.classes[0] == "airplane"


def test_image_folder(tmp_path):
    _tree(tmp_path, "train", size=40)
    _tree(tmp_path, "val", size=40)
    dm = ImageFolderDataModule(tmp_path / "train", tmp_path / "val", image_size=24, resize=32, batch_size=3,
                               calibration_size=5, num_workers=0)  # fmt: skip
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 24, 24) and len(dm.calibration_dataset) == 5


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_root=.*does not exist"):
        ImageFolderDataModule(tmp_path / "nope", tmp_path / "val", num_workers=0).setup()


def test_image_folder_class_mismatch(tmp_path):
    _tree(tmp_path, "train", classes=("a", "b"))
    _tree(tmp_path, "val", classes=("a", "c"))
    with pytest.raises(ValueError, match="class folders differ"):
        ImageFolderDataModule(tmp_path / "train", tmp_path / "val", num_workers=0).setup()


def test_calibration_size_too_large(tmp_path):
    _tree(tmp_path, "train")
    _tree(tmp_path, "val")
    with pytest.raises(ValueError, match="calibration_size=100 is larger"):
        ImageFolderDataModule(tmp_path / "train", tmp_path / "val", calibration_size=100, num_workers=0).setup()
