"""CIFAR-10 without the shared folder: torchvision's download (from a local server here), cached atomically."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

import lightning_quant.data.cifar10 as cifar10
from lightning_quant.data import CIFAR10DataModule
from lightning_quant.downloads import AssetUnavailableError
from tests.helpers.local_server import serve_files

ARCHIVE = "cifar-10-python.tar.gz"


def tiny_cifar10_release(per_batch: int = 4, test_size: int = 8) -> tuple[bytes, dict]:
    """A CIFAR-10-python style archive (5 train batches, 1 test batch, meta) and the release attributes for it."""
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    for name, size in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test_size)]:
        batch = {"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(size)]}
        members[name] = pickle.dumps(batch)
    members["batches.meta"] = pickle.dumps({"label_names": list(cifar10.CIFAR10_CLASSES)})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in members.items()}  # noqa: S324 - torchvision's check
    blob = buffer.getvalue()
    release = {
        "tgz_md5": hashlib.md5(blob).hexdigest(),  # noqa: S324
        "train_list": [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)],
        "test_list": [["test_batch", md5["test_batch"]]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]},
    }
    return blob, release


@pytest.fixture
def empty_env(tmp_path, monkeypatch):
    """No shared folder, an empty cache; returns the cache folder."""
    monkeypatch.setenv("LIGHTNING_QUANT_SHARED", str(tmp_path / "no_shared"))
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIGHTNING_QUANT_OFFLINE", raising=False)
    return tmp_path / "cache"


def test_download_once_then_cached(empty_env, monkeypatch):
    blob, release = tiny_cifar10_release()
    with serve_files({"/" + ARCHIVE: blob}) as server:
        monkeypatch.setattr(cifar10, "CIFAR10_RELEASE", {**release, "url": server.url("/" + ARCHIVE)})
        dm = CIFAR10DataModule(download=True, batch_size=4, calibration_size=8, num_workers=0)
        assert dm.check_source() == "download"
        dm.prepare_data()
        dm.setup()
        x, _ = next(iter(dm.calibration_dataloader()))
        assert x.shape == (4, 3, 32, 32) and len(dm.train_dataset) == 20 and len(dm.val_dataset) == 8
        downloads = server.requests["/" + ARCHIVE]
        again = CIFAR10DataModule(download=True, batch_size=4, calibration_size=8, num_workers=0)
        assert again.check_source() == "cache"
        again.setup()
        assert server.requests["/" + ARCHIVE] == downloads  # no second download
    # the archive is gone after extraction; no temporary folder is left beside the data
    assert [p.name for p in empty_env.iterdir()] == ["cifar10"]
    assert [p.name for p in (empty_env / "cifar10").iterdir()] == ["cifar-10-batches-py"]


def test_checksum_mismatch_caches_nothing(empty_env, monkeypatch):
    blob, release = tiny_cifar10_release()
    with serve_files({"/" + ARCHIVE: blob}) as server:
        monkeypatch.setattr(
            cifar10, "CIFAR10_RELEASE", {**release, "url": server.url("/" + ARCHIVE), "tgz_md5": "0" * 32}
        )
        with pytest.raises(RuntimeError, match="corrupted"):
            CIFAR10DataModule(download=True, num_workers=0).prepare_data()
    assert list(empty_env.iterdir()) == []


def test_offline_without_cache(empty_env, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    with pytest.raises(
        AssetUnavailableError, match=r"offline, so torchvision cannot download it.*Pass root='/path/to/"
    ):
        CIFAR10DataModule(download=True, num_workers=0).setup()
    with pytest.raises(AssetUnavailableError, match=r"Pass root='/path/to/cifar10' or download=True, or set LIGHTNING"):
        CIFAR10DataModule(num_workers=0).setup()
