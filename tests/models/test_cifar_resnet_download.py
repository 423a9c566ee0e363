"""cifar_resnet(pretrained=True) without the shared folder: torch hub cache, else a checked download."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from lightning_quant.downloads import AssetUnavailableError, ChecksumMismatchError
from lightning_quant.models import cifar_resnet
from lightning_quant.models.cifar_resnet import (
    CIFAR_RESNET_SHA256,
    CIFAR_RESNET_URLS,
    CIFAR_RESNET_WEIGHTS,
    cifar_resnet_weights_file,
)
from lightning_quant.paths import shared_dir
from tests.helpers.local_server import serve_files

NAME = CIFAR_RESNET_WEIGHTS[20]


@pytest.fixture
def no_shared(tmp_path, monkeypatch):
    """No shared folder, an empty torch hub cache; returns the hub checkpoints folder."""
    monkeypatch.setenv("LIGHTNING_QUANT_SHARED", str(tmp_path / "no_shared"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("LIGHTNING_QUANT_OFFLINE", raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _published_style_file() -> tuple[torch.nn.Module, bytes]:
    """A ResNet-20 saved like the published checkpoints: {'state_dict': {'module.<key>': ...}}."""
    src = cifar_resnet(20, pretrained=False)
    buffer = io.BytesIO()
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, buffer)
    return src, buffer.getvalue()


def test_download_once_then_cached(no_shared, monkeypatch):
    src, blob = _published_style_file()
    with serve_files({"/" + NAME: blob}) as server:
        monkeypatch.setitem(CIFAR_RESNET_URLS, 20, server.url("/" + NAME))
        monkeypatch.setitem(CIFAR_RESNET_SHA256, 20, hashlib.sha256(blob).hexdigest())
        model = cifar_resnet(20)
        assert torch.equal(model.linear.weight, src.linear.weight)
        assert cifar_resnet_weights_file(20) == no_shared / NAME
        cifar_resnet(20)
        assert server.requests["/" + NAME] == 1  # later calls read the cache
    assert sorted(p.name for p in no_shared.iterdir()) == [NAME]


def test_checksum_mismatch_caches_nothing(no_shared, monkeypatch):
    _, blob = _published_style_file()
    with serve_files({"/" + NAME: blob}) as server:
        url = server.url("/" + NAME)
        monkeypatch.setitem(CIFAR_RESNET_URLS, 20, url)
        # the recorded hash of the real file: the served one differs
        actual = hashlib.sha256(blob).hexdigest()
        with pytest.raises(
            ChecksumMismatchError, match=f"{url}: expected SHA-256 {CIFAR_RESNET_SHA256[20]}, got {actual}"
        ):
            cifar_resnet(20)
    assert list(no_shared.iterdir()) == []


def test_offline_without_cache_names_the_fixes(no_shared, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    with pytest.raises(AssetUnavailableError, match=r"this machine is offline.*Pass weights_path='/path/to/resnet20-"):
        cifar_resnet(20)


def test_failed_download_is_unavailable(no_shared, monkeypatch):
    with serve_files({}) as server:  # reachable, but 404
        monkeypatch.setitem(CIFAR_RESNET_URLS, 20, server.url("/gone.th"))
        with pytest.raises(AssetUnavailableError, match=r"the download failed \(HTTP Error 404"):
            cifar_resnet(20)
    assert list(no_shared.iterdir()) == []


@pytest.mark.skipif(
    shared_dir() is None, reason="needs the shared weights folder (../shared or LIGHTNING_QUANT_SHARED)"
)
@pytest.mark.parametrize("depth", sorted(CIFAR_RESNET_WEIGHTS))
def test_recorded_sha256_is_the_shared_files(depth):
    digest = hashlib.sha256((shared_dir() / "weights" / CIFAR_RESNET_WEIGHTS[depth]).read_bytes()).hexdigest()
    assert digest == CIFAR_RESNET_SHA256[depth]
    assert CIFAR_RESNET_URLS[depth].endswith("/pretrained_models/" + CIFAR_RESNET_WEIGHTS[depth])
