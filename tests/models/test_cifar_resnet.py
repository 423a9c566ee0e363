"""CIFAR ResNet-20/32/44/56: architecture, the published state-dict keys, and real accuracy with the shared weights."""

from __future__ import annotations

import pytest
import torch

from lightning_quant.models import CIFAR_RESNET_WEIGHTS, cifar_resnet
from lightning_quant.models.cifar_resnet import CifarResNet, load_cifar_resnet_weights
from lightning_quant.models.weights import WeightsMismatchError
from lightning_quant.paths import shared_dir

needs_shared = pytest.mark.skipif(
    shared_dir() is None, reason="needs the shared data/weights folder (../shared or LIGHTNING_QUANT_SHARED)"
)


@pytest.mark.parametrize(("depth", "blocks"), [(20, 3), (32, 5), (44, 7), (56, 9)])
def test_architecture(depth, blocks):
    model = cifar_resnet(depth, pretrained=False)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not model.training


def test_option_a_shortcut_has_no_parameters():
    block = cifar_resnet(20, pretrained=False).layer2[0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    assert block.shortcut(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)


@pytest.mark.parametrize("depth", [0, 21, 7, True])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="must be 6n \\+ 2"):
        cifar_resnet(depth, pretrained=False)


def test_no_published_weights_for_depth():
    with pytest.raises(ValueError, match="no published weights for depth=8"):
        cifar_resnet(8)


def test_bad_blocks():
    with pytest.raises(ValueError, match="blocks=0 must be a positive integer"):
        CifarResNet(blocks=0)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass the path of a resnetNN"):
        load_cifar_resnet_weights(CifarResNet(), tmp_path / "nope.th")


def test_missing_shared_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QUANT_SHARED", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")  # never download, even on a machine with the internet
    with pytest.raises(FileNotFoundError, match="weights_path=.*LIGHTNING_QUANT_SHARED"):
        cifar_resnet(20)


def test_wrong_depth_file_is_refused(tmp_path):
    src = cifar_resnet(32, pretrained=False)
    path = tmp_path / "r32.th"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    with pytest.raises(WeightsMismatchError, match=r"unexpected .*another architecture.*resnet56_cifar"):
        cifar_resnet(20, weights_path=path)


@needs_shared
@pytest.mark.parametrize("depth", sorted(CIFAR_RESNET_WEIGHTS))
def test_published_keys_load(depth):
    checkpoint = torch.load(shared_dir() / "weights" / CIFAR_RESNET_WEIGHTS[depth], map_location="cpu")
    keys = {k.removeprefix("module.") for k in checkpoint["state_dict"]}
    expected = {k for k in cifar_resnet(depth, pretrained=False).state_dict() if "num_batches_tracked" not in k}
    assert keys - {k for k in keys if "num_batches_tracked" in k} == expected
    cifar_resnet(depth)  # strict load


@needs_shared
def test_resnet20_float_accuracy_on_cifar10():
    from lightning_quant.data import CIFAR10DataModule, calibration_subset

    dm = CIFAR10DataModule(batch_size=256, num_workers=0, calibration_size=1)
    dm.setup()
    images, labels = next(iter(torch.utils.data.DataLoader(calibration_subset(dm.val_dataset, 256, seed=0), 256)))
    with torch.inference_mode():
        top1 = (cifar_resnet(20)(images).argmax(1) == labels).float().mean().item()
    assert top1 > 0.70  # 81.0 % on the full JPEG test set
