"""Cross-layer equalization: the float function is kept, weight ranges get uniform, bias absorption, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_quant import QuantOptions, quantize
from lightning_quant.algorithms import equalization_pairs, equalize, relu6_to_relu
from lightning_quant.capture.bn_fold import fold_bn_into
from tests.helpers.models import TinyConvBN, random_images, warm_bn


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) * 3 + 0.05)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return model.eval()


def _dw_separable(act=nn.ReLU) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), act(),
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6),
    )  # fmt: skip
    return _randomize_bn(model)


def _spread(weight: torch.Tensor) -> float:
    """Largest over smallest per-output-channel range: 1 is perfectly uniform."""
    r = weight.abs().reshape(weight.shape[0], -1).amax(1)
    return (r.max() / r.min()).item()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_depthwise_separable_keeps_function_and_equalizes():
    model = _dw_separable()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    before = [_spread(fold_bn_into(model[i], model[i + 1]).weight) for i in (0, 3)]
    report = equalize(model, absorb_bias=False)
    assert report.pairs == [("0", "3"), ("3", "6")] and report.folded_bn == []  # the BatchNorms stay
    assert report.iterations > 1  # the chain needs several sweeps
    # the bias-less convs got a zero bias: a checkpoint of a 0.1 equalized model (which folded the BatchNorms into
    # them) has the same keys
    assert all(torch.equal(model[i].bias, torch.zeros(model[i].out_channels)) for i in (0, 3, 6))
    with torch.no_grad():
        assert _rel_err(model(x), ref) < 1e-4
    after = [_spread(fold_bn_into(model[i], model[i + 1]).weight) for i in (0, 3)]  # the weights that get quantized
    assert all(a < b for a, b in zip(after, before, strict=True))
    assert after[1] < 0.5 * before[1]  # the depthwise layer, the one per-tensor quantization suffers on


@pytest.mark.parametrize("absorb_bias", [False, True])
def test_an_equalized_model_trains_as_before(absorb_bias):
    """QAT fine-tunes the equalized model with BatchNorm on batch statistics: its training-mode output must be the
    original's too. (Folding BatchNorm into the conv and leaving an identity behind, as 0.1 did, normalized every
    equalized channel by its batch statistics: MobileNetV2 QAT after CLE started at chance level.)"""
    model = _dw_separable()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    equalized = copy.deepcopy(model)
    equalize(equalized, absorb_bias=absorb_bias)
    # absorption moves a constant from one layer's output into the next one's bias: exact where the ReLU inputs
    # stay above it, and a BatchNorm after the second layer removes it again in training mode
    with torch.no_grad():
        assert _rel_err(equalized.train()(x), model.train()(x)) < 1e-4
    running = {k: v for k, v in equalized.state_dict().items() if "running" in k}
    for key, value in running.items():  # the same statistics update (to float rounding: w * s times x / s)
        torch.testing.assert_close(value, model.state_dict()[key], msg=key)


def test_mobilenet_v2_keeps_function():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.mobilenet_v2(weights=None))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    report = equalize(model, absorb_bias=False)
    assert report.pairs  # the linear pairs: a block's project conv -> the next block's expand conv
    assert any("ReLU6" in why for why in report.skipped.values())  # default: ReLU6 pairs are left alone
    with torch.no_grad():
        assert _rel_err(model(x), ref) < 1e-4


def test_mobilenet_v2_replace_relu6_equalizes_depthwise_pairs():
    torchvision = pytest.importorskip("torchvision")
    model = _randomize_bn(torchvision.models.mobilenet_v2(weights=None))
    report = equalize(model, replace_relu6=True, absorb_bias=False)
    assert report.replaced_relu6 and not any("ReLU6" in why for why in report.skipped.values())
    assert all(isinstance(model.get_submodule(name), nn.ReLU) for name in report.replaced_relu6)
    assert len(report.pairs) > 2 * len(model.features) - 10  # two pairs per inverted residual block


def test_relu6_pairs_skipped_unless_opted_in():
    model = _dw_separable(nn.ReLU6)
    assert equalization_pairs(model) == [("0", "3"), ("3", "6")]
    report = equalize(copy.deepcopy(model))
    assert report.pairs == [] and set(report.skipped) == {"0 -> 3", "3 -> 6"}
    assert "replace_relu6=True" in report.skipped["0 -> 3"]


def test_bias_absorption_against_reference_and_exact_when_inputs_exceed_c():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([5.0, 4.0, 0.0, 6.0]))
        model[1].weight.copy_(torch.tensor([0.5, 1.0, 1.0, 0.2]))
    folded = fold_bn_into(model[0], model[1])
    plain = copy.deepcopy(model)
    equalize(plain, absorb_bias=False)
    report = equalize(model)
    assert report.absorbed_bias == [("0", "3")]
    torch.testing.assert_close(model[0].weight, plain[0].weight)  # absorption does not touch the weights
    torch.testing.assert_close(model[1].weight, plain[1].weight)
    refolded = fold_bn_into(plain[0], plain[1]).weight
    s = folded.weight.abs().reshape(4, -1).amax(1) / refolded.abs().reshape(4, -1).amax(1)
    beta, gamma = torch.tensor([5.0, 4.0, 0.0, 6.0]), torch.tensor([0.5, 1.0, 1.0, 0.2])
    c = torch.clamp(beta / s - 3 * gamma / s, min=0)  # numpy-style reference of the paper's rule
    assert (c > 0).sum() == 3
    torch.testing.assert_close(model[1].bias, plain[1].bias - c)  # out of the BatchNorm's shift
    torch.testing.assert_close(model[3].bias, plain[3].bias + plain[3].weight[:, :, 0, 0] @ c)
    x = torch.randn(2, 3, 4, 4) * 0.01  # pre-activations stay near beta, above c: absorption is exact
    with torch.no_grad():
        assert _rel_err(model(x), plain(x)) < 1e-5


def test_bias_absorption_skipped_without_bn_or_with_padding():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    model = _randomize_bn(model)
    report = equalize(model)
    assert report.absorbed_bias == []
    assert report.skipped == {"bias absorption 0 -> 2": "no BatchNorm statistics after the first layer"}
    padded = _dw_separable()
    report = equalize(padded)
    assert report.skipped["bias absorption 0 -> 3"].startswith("the second layer zero-pads")
    assert report.absorbed_bias == [("3", "6")]


def test_quantize_with_cross_layer_equalization():
    torch.manual_seed(0)
    model = warm_bn(TinyConvBN())
    before = copy.deepcopy(model.state_dict())
    data = [(x, y) for x, y in torch.utils.data.DataLoader(random_images(16), batch_size=8)]
    qmodel = quantize(model, data, progress=False, options=QuantOptions(cross_layer_equalization=True))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched
    with torch.no_grad():
        x = data[0][0]
        assert _rel_err(qmodel(x), model(x)) < 0.2


def _relu6_net() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    )  # fmt: skip
    return _randomize_bn(model)


def test_relu6_to_relu_swaps_only_relu6_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Sequential(nn.ReLU6(), nn.ReLU()), nn.Hardtanh(0, 6))
    assert relu6_to_relu(model) == ["1", "2.0"]
    assert [type(m).__name__ for m in (model[1], model[2][0], model[2][1], model[3])] == [
        "ReLU", "ReLU", "ReLU", "Hardtanh",
    ]  # fmt: skip
    assert relu6_to_relu(model) == []  # idempotent


def test_quantize_replace_relu6_lets_cle_pair_the_layers():
    torch.manual_seed(0)
    model = _relu6_net()
    data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    both = QuantOptions(cross_layer_equalization=True, replace_relu6=True)
    qmodel = quantize(model, data, progress=False, options=both)
    assert not any(isinstance(m, nn.ReLU6) for m in qmodel.modules())
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())  # the input model is untouched
    plain = quantize(model, data, progress=False, options=QuantOptions(cross_layer_equalization=True))
    folded = fold_bn_into(model[0], model[1]).weight
    assert torch.allclose(plain.get_submodule("0").weight, folded)  # ReLU6 pairs skipped: weights as folded
    assert not torch.allclose(qmodel.get_submodule("0").weight, folded)  # swapped: the pair was equalized
    swapped = copy.deepcopy(model)
    relu6_to_relu(swapped)
    assert equalize(copy.deepcopy(swapped)).pairs == [("0", "3"), ("3", "6")]
    assert equalize(copy.deepcopy(model)).pairs == []


def test_pairs_through_max_pooling_keep_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 8, 1),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight[2] *= 30.0  # one channel far wider than the rest
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    report = equalize(model)
    assert report.pairs == [("0", "3"), ("3", "6")]
    assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-5)
    ranges = model[0].weight.abs().amax(dim=(1, 2, 3))
    assert ranges.max() / ranges.min() < 30.0  # the wide channel was brought in


def test_validation_errors():
    model = _dw_separable()
    with pytest.raises(ValueError, match="iterations=0 must be an integer >= 1"):
        equalize(model, iterations=0)
    with pytest.raises(ValueError, match="tolerance=0.0 must be > 0"):
        equalize(model, tolerance=0.0)
    with pytest.raises(ValueError, match=r"BatchNorm layers in training mode \(1, 4, 7\).*model\.eval\(\)"):
        equalize(model.train())

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="needs a torch.fx graph of Branchy.*traceable submodule"):
        equalize(Branchy())


def test_shared_relu_module_pairs_like_torchvision_resnets():
    """torchvision's Bottleneck calls one ``self.relu`` three times: its conv pairs must still be equalized."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(num_classes=10).eval()
    pairs = equalization_pairs(model)
    assert ("layer1.0.conv1", "layer1.0.conv2") in pairs and ("layer1.0.conv2", "layer1.0.conv3") in pairs
    assert len(pairs) == 2 * 16  # two pairs in each of the 16 bottlenecks (the stem conv feeds a max pool + add)
    block = model.layer1[0]
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        before = block(x)
        equalize(block)
        after = block(x)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert equalization_pairs(_SharedReLU6()) == []  # swapping it for ReLU would change both call sites


class _SharedReLU6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(self.act(x))))  # one ReLU6 module, two call sites
