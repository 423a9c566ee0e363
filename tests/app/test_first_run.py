"""The README's first command without the shared folder: downloads when online, one clear error offline."""

from __future__ import annotations

import hashlib

import pytest

import lightning_quant.data.cifar10 as cifar10
from lightning_quant.app import train
from lightning_quant.downloads import AssetUnavailableError
from lightning_quant.models.cifar_resnet import CIFAR_RESNET_SHA256, CIFAR_RESNET_URLS, CIFAR_RESNET_WEIGHTS
from tests.app.conftest import tiny_config
from tests.data.test_cifar10_download import ARCHIVE, tiny_cifar10_release
from tests.helpers.local_server import serve_files
from tests.models.test_cifar_resnet_download import _published_style_file

RECIPE = "resnet20_ptq_cifar10"
WEIGHTS = CIFAR_RESNET_WEIGHTS[20]


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """No shared folder, empty torch hub cache and data cache."""
    monkeypatch.setenv("LIGHTNING_QUANT_SHARED", str(tmp_path / "no_shared"))
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("LIGHTNING_QUANT_OFFLINE", raising=False)
    return tmp_path


def test_offline_first_run_names_the_overrides(fresh_machine, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    with pytest.raises(AssetUnavailableError) as info:
        train(tiny_config(RECIPE, fresh_machine, "data.download=false"))
    message = str(info.value)
    for override in (
        f"model.model.weights_path=/path/to/{WEIGHTS}",
        "model.model.pretrained=false",
        "data.root=/path/to/cifar10",
        "data.download=true",
        "LIGHTNING_QUANT_SHARED=/path/to/shared",
    ):
        assert override in message
    assert "weights_path='" not in message and "download=True" not in message  # no Python keyword spelling


def test_offline_missing_data_only(fresh_machine, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    weights = fresh_machine / WEIGHTS
    weights.write_bytes(_published_style_file()[1])
    cfg = tiny_config(RECIPE, fresh_machine, f"model.model.weights_path={weights}", "data.download=true")
    with pytest.raises(AssetUnavailableError, match=r"offline.*Pass data\.root=/path/to/cifar10, or set LIGHTNING"):
        train(cfg)


def test_online_first_run_downloads_weights_and_data(fresh_machine, monkeypatch):
    _, weights = _published_style_file()
    archive, release = tiny_cifar10_release(per_batch=4, test_size=8)
    files = {"/" + WEIGHTS: weights, "/" + ARCHIVE: archive}
    with serve_files(files) as server:
        monkeypatch.setitem(CIFAR_RESNET_URLS, 20, server.url("/" + WEIGHTS))
        monkeypatch.setitem(CIFAR_RESNET_SHA256, 20, hashlib.sha256(weights).hexdigest())
        monkeypatch.setattr(cifar10, "CIFAR10_RELEASE", {**release, "url": server.url("/" + ARCHIVE)})
        cfg = tiny_config(RECIPE, fresh_machine, "data.download=true", batch_size=4, val_batches=1)
        metrics = train(cfg)
    assert "int8_top1" in metrics and "float_top1" in metrics
    assert (fresh_machine / "torch_home" / "hub" / "checkpoints" / WEIGHTS).is_file()
    assert (fresh_machine / "cache" / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
