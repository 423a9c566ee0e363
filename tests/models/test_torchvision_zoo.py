"""torchvision models by name: weight enums, the hub-cache check and the offline fail-fast message."""

from __future__ import annotations

import pytest

from lightning_quant.models import WeightsUnavailableError, torchvision_model
from lightning_quant.models.torchvision_zoo import is_offline, weights_cache_file


def test_random_init_with_classes():
    assert torchvision_model("mobilenet_v2", weights=None, num_classes=7).classifier[1].out_features == 7


def test_cache_file_under_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights_cache_file("resnet50", "DEFAULT") == tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet5'; use one of .*resnet50"):
        torchvision_model("resnet5")


def test_unknown_weights():
    with pytest.raises(ValueError, match="weights='IMAGENET9K' is not a weight of resnet50"):
        torchvision_model("resnet50", weights="IMAGENET9K")


def test_num_classes_mismatch():
    with pytest.raises(ValueError, match="have 1000 classes but num_classes=10"):
        torchvision_model("resnet50", num_classes=10)


def test_offline_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    assert is_offline()
    with pytest.raises(
        WeightsUnavailableError,
        match=r"Use recipe=x \(offline weights and data\) instead, copy mobilenet_v2-7ebf99e0.pth",
    ):
        torchvision_model("mobilenet_v2", offline_hint="recipe=x")


def test_cached_weights_load_offline(tmp_path, monkeypatch):
    """A weight file already in the hub cache is used offline (the download function is never asked)."""
    import torch
    import torchvision.models._api as api
    from torchvision.models import mobilenet_v2

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    src = mobilenet_v2(weights=None)
    path = weights_cache_file("mobilenet_v2")
    path.parent.mkdir(parents=True)
    torch.save(src.state_dict(), path)
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, *a, **k: torch.load(path, weights_only=True))
    loaded = torchvision_model("mobilenet_v2")
    assert torch.equal(loaded.classifier[1].weight, src.classifier[1].weight)
