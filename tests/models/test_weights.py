"""load_weights: every file shape users bring, and clear errors for the wrong ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import quantize
from lightning_quant.models import ImageClassifier, WeightsMismatchError, load_weights
from tests.helpers.models import TinyConvBN, warm_bn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


def _assert_same(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va.float(), vb.float(), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,  # plain state dict
        lambda sd: {"state_dict": sd},  # checkpoint dict
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},  # DataParallel
        lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3},  # Lightning checkpoint
    ],
    ids=["plain", "checkpoint", "dataparallel", "lightning"],
)
def test_file_layouts_load(wrap, tmp_path):
    src = _net()
    torch.save(wrap(src.state_dict()), tmp_path / "w.pt")
    dst = load_weights(TinyConvBN(), tmp_path / "w.pt")
    _assert_same(src, dst)


def test_float16_file_loads_into_float32(tmp_path):
    src = _net()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}, tmp_path / "h.pt")
    dst = load_weights(TinyConvBN(), tmp_path / "h.pt")
    assert dst.conv1.weight.dtype == torch.float32
    _assert_same(src, dst, atol=1e-2)


def test_lightning_checkpoint_of_image_classifier(tmp_path):
    clf = ImageClassifier(_net())
    torch.save({"state_dict": clf.state_dict(), "pytorch-lightning_version": "2.6"}, tmp_path / "c.ckpt")
    fresh = ImageClassifier(TinyConvBN(), weights_file=str(tmp_path / "c.ckpt"))
    _assert_same(clf.model, fresh.model)


def test_other_architecture_names_counts_and_fix(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 10))
    torch.save(other.state_dict(), tmp_path / "o.pt")
    with pytest.raises(
        WeightsMismatchError, match=r"does not fit TinyConvBN: \d+ missing .*\d+ unexpected .*another arch"
    ):
        load_weights(TinyConvBN(), tmp_path / "o.pt")


def test_other_number_of_classes_names_the_shape(tmp_path):
    src = TinyConvBN()
    state = src.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(5, 8), torch.zeros(5)
    torch.save(state, tmp_path / "c5.pt")
    with pytest.raises(
        WeightsMismatchError, match=r"2 of another shape \(e.g. 'fc.weight': file \(5, 8\), model \(10, 8\)\)"
    ):
        load_weights(TinyConvBN(), tmp_path / "c5.pt")


def test_quantized_checkpoint_is_refused_with_the_right_loader(tmp_path):
    qmodel = quantize(_net(), [torch.randn(4, 3, 16, 16)], progress=False)
    torch.save({"state_dict": {"model." + k: v for k, v in qmodel.state_dict().items()}}, tmp_path / "q.ckpt")
    with pytest.raises(WeightsMismatchError, match="quantized checkpoint.*mode=test state_file"):
        load_weights(TinyConvBN(), tmp_path / "q.ckpt")


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(TinyConvBN(), tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(WeightsMismatchError, match="not a loadable weights file"):
        load_weights(TinyConvBN(), tmp_path / "bad.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsMismatchError, match="holds no state dict"):
        load_weights(TinyConvBN(), tmp_path / "list.pt")
