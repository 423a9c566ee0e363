"""Archive extraction and the Imagenette data module.

Tests on the real data use the shared archives and the *default* cache (``LIGHTNING_QUANT_CACHE`` or
``~/.cache/lightning_quant``): the first run extracts them (~10 s for both), later runs reuse the extraction.
They skip, with the reason, when no shared folder is found. Everything else runs on tiny archives and
ImageFolder trees written into pytest's tmp_path.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from lightning_quant.data import IMAGENETTE_WNIDS, ImagenetteDataModule, calibration_subset, extract_archive
from lightning_quant.data.archives import MARKER_NAME, archive_stem, is_extracted
from lightning_quant.data.imagenette import imagenette_split_dirs
from lightning_quant.data.transforms import imagenette_transform
from lightning_quant.paths import shared_dir

# -- helpers ---------------------------------------------------------------------------------------------------


def _write_tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def _fake_imagefolder(root: Path, per_class: int = 3, classes=("a", "b"), val_classes=None, size: int = 40) -> Path:
    from PIL import Image

    for split, names in (("train", classes), ("val", val_classes or classes)):
        for i, cls in enumerate(names):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new("RGB", (size, size + 8), (40 * i, 10 * j, 90)).save(root / split / cls / f"{j}.jpg")
    return root


def _shared_archives() -> Path:
    shared = shared_dir()
    if shared is None:
        pytest.skip("no shared assets folder (set LIGHTNING_QUANT_SHARED to the folder holding data/)")
    data = shared / "data"
    for name in ("imagenette_train.tar.gz", "imagenette_val.tar.gz"):
        if not (data / name).is_file():
            pytest.skip(f"{data / name} is missing")
    return data


@pytest.fixture(scope="module")
def dm() -> ImagenetteDataModule:
    _shared_archives()
    module = ImagenetteDataModule(batch_size=16, num_workers=0, calibration_size=512, seed=0)
    module.setup()
    return module


# -- extract_archive --------------------------------------------------------------------------------------------


def test_extract_archive_once_with_marker(tmp_path):
    archive = _write_tar(tmp_path / "toy.tar.gz", {"toy/x/1.txt": b"one", "toy/y/2.txt": b"two"})
    root = extract_archive(archive, tmp_path / "cache")
    assert root == tmp_path / "cache" / "toy" and is_extracted(root)
    assert (root / "toy" / "y" / "2.txt").read_bytes() == b"two"
    (root / "toy" / "x" / "1.txt").write_text("changed")  # a second call must not extract again
    assert extract_archive(archive, tmp_path / "cache") == root
    assert (root / "toy" / "x" / "1.txt").read_text() == "changed"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["toy"]  # no temp folder left behind


def test_extract_archive_defaults_to_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path / "c"))
    archive = _write_tar(tmp_path / "toy.tgz", {"f.txt": b"x"})
    assert extract_archive(archive) == tmp_path / "c" / "toy"


def test_archive_stem():
    assert [archive_stem(n) for n in ("a.tar.gz", "b.tgz", "c.tar", "d.tar.xz")] == ["a", "b", "c", "d"]


def test_extract_archive_missing_names_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.tar\.gz.*LIGHTNING_QUANT_SHARED.*root="):
        extract_archive(tmp_path / "nope.tar.gz", tmp_path)


@pytest.mark.parametrize(
    ("files", "links"),
    [({"../evil.txt": b"x"}, None), ({"/abs/evil.txt": b"x"}, None), ({"ok.txt": b"x"}, {"link": "../../etc"})],
    ids=["dotdot", "absolute", "symlink-out"],
)
def test_extract_archive_refuses_path_traversal(tmp_path, files, links):
    archive = _write_tar(tmp_path / "bad.tar.gz", files, links)
    with pytest.raises(ValueError, match="unsafe"):
        extract_archive(archive, tmp_path / "cache")
    assert not (tmp_path / "cache" / "bad").exists() and not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the temp folder was removed


def test_half_extracted_folder_is_never_used(tmp_path):
    archive = _write_tar(tmp_path / "toy.tar.gz", {"f.txt": b"x"})
    stale = tmp_path / "cache" / "toy"
    stale.mkdir(parents=True)
    (stale / "partial.txt").write_text("interrupted")
    with pytest.raises(FileExistsError, match="not a complete extraction"):
        extract_archive(archive, tmp_path / "cache")
    stale.joinpath("partial.txt").unlink()  # an empty leftover folder is simply replaced
    root = extract_archive(archive, tmp_path / "cache")
    assert (root / MARKER_NAME).is_file() and (root / "f.txt").read_text() == "x"


def test_concurrent_winner_is_reused(tmp_path, monkeypatch):
    """When another process renames its copy into place first, ours is discarded and theirs returned."""
    archive = _write_tar(tmp_path / "toy.tar.gz", {"f.txt": b"x"})
    real_replace = os.replace

    def replace_after_winner(src, dst):
        winner = Path(dst)
        winner.mkdir()
        (winner / "f.txt").write_text("winner")
        (winner / MARKER_NAME).write_text("{}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_winner)
    root = extract_archive(archive, tmp_path / "cache")
    assert (root / "f.txt").read_text() == "winner"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["toy"]


# -- argument validation and user folders (no shared data needed) ------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"calibration_size": 0}, "calibration_size=0 must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1 must be an integer >= 0"),
        ({"image_size": 0}, "image_size=0"),
        ({"resize": -5}, "resize=-5"),
        ({"seed": "zero"}, "seed='zero' must be an integer"),
        ({"calibration_size": 2.5}, "calibration_size=2.5"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImagenetteDataModule(**kwargs)


def test_user_imagefolder_root(tmp_path):
    root = _fake_imagefolder(tmp_path / "mine")
    module = ImagenetteDataModule(root, batch_size=4, num_workers=0, calibration_size=4, image_size=32, resize=36)
    images, labels = next(iter(module.calibration_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long
    assert module.classes == ["a", "b"] and len(module.train_dataset) == len(module.val_dataset) == 6


def test_user_root_missing_split(tmp_path):
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"missing .*val.*ImageFolder layout"):
        ImagenetteDataModule(tmp_path / "only_train").setup()


def test_user_root_class_mismatch(tmp_path):
    root = _fake_imagefolder(tmp_path / "mismatch", per_class=1, val_classes=("a", "c"))
    with pytest.raises(ValueError, match="class folders differ"):
        ImagenetteDataModule(root, calibration_size=1).setup()


def test_calibration_size_larger_than_train(tmp_path):
    root = _fake_imagefolder(tmp_path / "small", per_class=2)
    with pytest.raises(ValueError, match=r"calibration_size=5 is larger than the training split \(4 images\)"):
        ImagenetteDataModule(root, calibration_size=5).setup()


def test_no_data_anywhere_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_SHARED", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"root=.*LIGHTNING_QUANT_SHARED.*download=True"):
        imagenette_split_dirs()


def test_calibration_subset_is_seeded():
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    a, b, c = (calibration_subset(ds, 10, seed=s).indices for s in (0, 0, 1))
    assert a == b and a != c and len(set(a)) == 10
    with pytest.raises(ValueError, match="calibration_size=0"):
        calibration_subset(ds, 0)


def test_transform_shapes():
    from PIL import Image

    image = Image.new("RGB", (300, 200))
    assert imagenette_transform(128, 144)(image).shape == (3, 128, 128)
    assert imagenette_transform(224)(Image.new("RGB", (224, 224))).shape == (3, 224, 224)
    assert imagenette_transform(64, train_augment=True)(image).shape == (3, 64, 64)


# -- the real Imagenette archives ---------------------------------------------------------------------------------


def test_split_sizes_and_class_order(dm):
    assert len(dm.train_dataset) == 9469
    assert len(dm.val_dataset) == 3925
    assert dm.classes == list(IMAGENETTE_WNIDS) == sorted(IMAGENETTE_WNIDS)
    assert dm.train_dataset.classes == dm.classes
    assert dm.train_dataset.class_to_idx == {w: i for i, w in enumerate(IMAGENETTE_WNIDS)}


def test_extracted_into_cache_with_marker(dm):
    for split in ("train", "val"):
        folder = Path(dm.val_dataset.root if split == "val" else dm.train_dataset.root)
        assert folder.name == split and is_extracted(folder.parent)
        assert folder.parent.name == f"imagenette_{split}"


def test_calibration_subset_from_train_only(dm):
    subset = dm.calibration_dataset
    assert len(subset) == 512 and len(set(subset.indices)) == 512
    train_root = Path(dm.train_dataset.root)
    paths = [Path(subset.dataset.samples[i][0]) for i in subset.indices]
    assert all(train_root in p.parents for p in paths)
    val_names = {Path(p).name for p, _ in dm.val_dataset.samples}
    assert val_names.isdisjoint(p.name for p in paths)
    assert len({label for _, label in (subset.dataset.samples[i] for i in subset.indices)}) == 10


def test_calibration_subset_reproducible(dm):
    same = ImagenetteDataModule(batch_size=16, num_workers=0, calibration_size=512, seed=0)
    other = ImagenetteDataModule(batch_size=16, num_workers=0, calibration_size=512, seed=1)
    same.setup()
    other.setup()
    assert same.calibration_dataset.indices == dm.calibration_dataset.indices
    assert other.calibration_dataset.indices != dm.calibration_dataset.indices


def test_loaders(dm):
    calib = dm.calibration_dataloader()
    assert isinstance(calib.sampler, SequentialSampler) and len(calib.dataset) == 512
    images, labels = next(iter(calib))
    expected = [dm.calibration_dataset.dataset.samples[i][1] for i in dm.calibration_dataset.indices[:16]]
    assert images.shape == (16, 3, 224, 224) and labels.tolist() == expected
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)
    test_loader = dm.test_dataloader()
    assert isinstance(test_loader.sampler, SequentialSampler) and test_loader.dataset is dm.val_dataset
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    assert abs(float(images.mean())) < 1.5  # normalized with ImageNet mean/std, not raw 0..1


def test_resnet50_input_size():
    _shared_archives()
    module = ImagenetteDataModule(batch_size=4, num_workers=0, calibration_size=8, image_size=128, resize=144)
    images, _ = next(iter(module.val_dataloader()))
    assert images.shape == (4, 3, 128, 128)
