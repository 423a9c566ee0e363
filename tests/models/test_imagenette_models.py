"""Offline pretrained Imagenette models: loading, output shape, a small float accuracy check.

Needs ``<shared>/weights`` (and ``<shared>/data`` for the accuracy checks); skips with the reason otherwise.
The data is extracted into the default cache once (see tests/data/test_imagenette.py).
"""

from __future__ import annotations

import pytest
import torch

from lightning_quant.data import ImagenetteDataModule, calibration_subset
from lightning_quant.evaluation import top1_accuracy
from lightning_quant.models import (
    IMAGENETTE_EVAL_SIZES,
    IMAGENETTE_MODELS,
    mobilenet_v2_imagenette,
    resnet50_imagenette,
)
from lightning_quant.models.weights import WeightsMismatchError
from lightning_quant.paths import shared_dir


def _require(*relative: str) -> None:
    shared = shared_dir()
    if shared is None:
        pytest.skip("no shared assets folder (set LIGHTNING_QUANT_SHARED to the folder holding weights/ and data/)")
    for rel in relative:
        if not (shared / rel).is_file():
            pytest.skip(f"{shared / rel} is missing")


@pytest.mark.parametrize(("name", "size"), [("mobilenet_v2", 224), ("resnet50", 128)])
def test_loads_eval_float32_and_gives_10_logits(name, size):
    _require(f"weights/{name}_imagenette.pth")
    model = IMAGENETTE_MODELS[name]()
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_missing_weights_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file not found.*mobilenet_v2_imagenette\(weights_path="):
        mobilenet_v2_imagenette(weights_path=tmp_path / "none.pth")
    with pytest.raises(FileNotFoundError, match=r"resnet50_imagenette\(weights_path="):
        resnet50_imagenette(weights_path=tmp_path / "none.pth")


def test_no_shared_folder_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_SHARED", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"weights_path=.*LIGHTNING_QUANT_SHARED"):
        resnet50_imagenette()


def test_wrong_architecture_weights_raise(tmp_path):
    from torchvision.models import resnet18

    net = resnet18(num_classes=10)
    torch.save({"state_dict": {k: v.half() for k, v in net.state_dict().items()}}, tmp_path / "r.pth")
    with pytest.raises(WeightsMismatchError, match=r"does not fit ResNet: .*missing .*another architecture"):
        resnet50_imagenette(weights_path=tmp_path / "r.pth")


def _val_sample(name: str, n: int = 128) -> torch.utils.data.DataLoader:
    """``n`` val images drawn at random over all classes (the val folder is sorted by class)."""
    dm = ImagenetteDataModule(num_workers=0, **IMAGENETTE_EVAL_SIZES[name])
    dm.setup()
    return torch.utils.data.DataLoader(calibration_subset(dm.val_dataset, n, seed=0), batch_size=64)


@pytest.mark.parametrize(("name", "minimum"), [("mobilenet_v2", 90.0), ("resnet50", 50.0)])
def test_float_accuracy_sanity(name, minimum):
    _require(f"weights/{name}_imagenette.pth", "data/imagenette_val.tar.gz", "data/imagenette_train.tar.gz")
    result = top1_accuracy(IMAGENETTE_MODELS[name](), _val_sample(name))
    assert result["images"] == 128
    assert result["top1"] > minimum, result
