"""BatchNorm folding: tensors, fx graphs and the QAT conv+BN module must match the unfolded float math."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from lightning_quant.capture.bn_fold import fold_batchnorm, fold_bn_into, foldable_pairs
from lightning_quant.config import scheme_for_target
from lightning_quant.quantizers import prepare, prepare_info, set_fake_quant
from lightning_quant.quantizers.modules import QuantConv2d, QuantConvBn, QuantLinear
from tests.helpers.models import TinyConvBN, warm_bn

SCHEME = scheme_for_target("x86", mode="qat")


def _randomize_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (negative gammas included)."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
        if bn.affine:
            bn.weight.copy_((torch.rand(n, generator=g) * 1.5 + 0.5) * torch.where(torch.arange(n) % 3 == 0, -1, 1))
            bn.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return bn.eval()


CASES = {
    "conv2d_bias": (lambda: nn.Conv2d(3, 6, 3, padding=1), lambda: nn.BatchNorm2d(6), (2, 3, 8, 8)),
    "conv2d_nobias": (lambda: nn.Conv2d(3, 6, 3, bias=False), lambda: nn.BatchNorm2d(6), (2, 3, 8, 8)),
    "linear_bn1d": (lambda: nn.Linear(5, 4), lambda: nn.BatchNorm1d(4), (7, 5)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False), lambda: nn.BatchNorm2d(6), (2, 6, 8, 8)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), lambda: nn.BatchNorm1d(4), (2, 3, 12)),
    "conv2d_bn_not_affine": (lambda: nn.Conv2d(3, 4, 1), lambda: nn.BatchNorm2d(4, affine=False), (2, 3, 5, 5)),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_fold_bn_into_matches_layer_then_bn(case):
    make_layer, make_bn, shape = CASES[case]
    torch.manual_seed(0)
    layer, bn = make_layer().eval(), _randomize_bn(make_bn())
    weight_before = layer.weight.detach().clone()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = bn(layer(x))
        folded = fold_bn_into(layer, bn)
        out = folded(x)
    assert _rel_err(out, ref) < 1e-5
    assert folded.bias is not None
    assert torch.equal(layer.weight, weight_before)  # the original layer is untouched
    assert type(folded) is type(layer)


def test_fold_bn_into_needs_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_bn_into(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))


def test_fold_batchnorm_on_graph_removes_bn_nodes():
    model = warm_bn(TinyConvBN())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    assert len(foldable_pairs(gm)) == 2
    folded = fold_batchnorm(gm)
    assert folded == ["bn1", "bn2"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "bn1" not in targets and "bn2" not in targets
    assert gm.conv1.bias is not None and gm.conv2.bias is not None
    with torch.no_grad():
        assert _rel_err(gm(x), ref) < 1e-5


class SharedConvBN(nn.Module):
    """The conv is called twice: folding the BN into it would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class BranchedConvBN(nn.Module):
    """The conv output feeds the BN and a skip connection, so the BN cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("cls", [SharedConvBN, BranchedConvBN])
def test_fold_batchnorm_leaves_unsafe_pairs(cls):
    model = cls().eval()
    _randomize_bn(model.bn)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    assert foldable_pairs(gm) == []
    assert fold_batchnorm(gm) == []
    assert isinstance(gm.bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [SharedConvBN, BranchedConvBN])
@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_prepare_does_not_fuse_unsafe_pairs(cls, mode):
    model = cls().eval()
    _randomize_bn(model.bn)
    qmodel = prepare(model, scheme_for_target("x86", mode=mode), mode=mode).eval()
    assert not any(isinstance(m, QuantConvBn) for m in qmodel.modules())
    assert prepare_info(qmodel).folded_bn == []
    set_fake_quant(qmodel, False)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=0, atol=1e-6)


# --- QAT conv+BN -------------------------------------------------------------------------------------------------


def _qat_pair(case: str, seed: int = 0):
    make_layer, make_bn, shape = CASES[case]
    torch.manual_seed(seed)
    layer, bn = make_layer(), _randomize_bn(make_bn(), seed)
    fused = QuantConvBn(copy.deepcopy(layer), copy.deepcopy(bn), SCHEME, name="blk")
    return layer, bn, fused, torch.randn(*shape) * 2


@pytest.mark.parametrize("case", ["conv2d_bias", "conv2d_nobias", "linear_bn1d", "depthwise"])
def test_quant_conv_bn_without_fake_quant_matches_float(case):
    layer, bn, fused, x = _qat_pair(case)
    fused.weight_fake_quant.disable_fake_quant()
    fused.freeze_bn()
    with torch.no_grad():
        ref = bn.eval()(layer(x))
        fused.eval()
        assert _rel_err(fused(x), ref) < 1e-5
        fused.train()  # frozen BN uses running statistics in training too
        assert _rel_err(fused(x), ref) < 1e-5
        assert fused.bn.num_batches_tracked.item() == 0


def test_quant_conv_bn_training_uses_batch_statistics_until_frozen():
    layer, bn, fused, x = _qat_pair("conv2d_bias")
    fused.weight_fake_quant.disable_fake_quant()
    bn.train()
    fused.train()
    with torch.no_grad():
        ref = bn(layer(x))
        out = fused(x)
    assert _rel_err(out, ref) < 1e-5
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    fused.freeze_bn()
    mean_before = fused.bn.running_mean.clone()
    with torch.no_grad():
        frozen_out = fused(x)
    assert torch.equal(fused.bn.running_mean, mean_before)
    assert not torch.allclose(frozen_out, out, atol=1e-3)


@pytest.mark.parametrize("case", ["conv2d_bias", "conv2d_nobias", "linear_bn1d", "depthwise"])
def test_quant_conv_bn_to_folded_matches_in_eval(case):
    layer, bn, fused, x = _qat_pair(case, seed=3)
    fused.eval()
    with torch.no_grad():
        fused(x)  # calibrates the weight quantizer on the BN-scaled weight
        fused.weight_fake_quant.disable_observer()
        assert fused.weight_fake_quant.calibrated.item() == 1
        out = fused(x)
        folded = fused.to_folded()
        assert type(folded) is (QuantLinear if case == "linear_bn1d" else QuantConv2d)
        folded_out = folded.eval()(x)
        float_out = bn(layer(x))
    assert torch.equal(folded.weight_fake_quant.scale, fused.weight_fake_quant.scale)
    assert _rel_err(folded_out, out) < 1e-5
    # fake quant really was on: the result differs from the float conv->bn
    assert _rel_err(out, float_out) > 1e-5


def test_quant_conv_bn_weight_quantizer_sees_folded_weight():
    layer, bn, fused, x = _qat_pair("conv2d_nobias")
    fused.eval()
    with torch.no_grad():
        fused(x)
    folded_weight = fold_bn_into(layer, bn).weight
    amax = folded_weight.abs().flatten(1).amax(1)
    torch.testing.assert_close(fused.weight_fake_quant.scale, amax / SCHEME.weight.quant_range()[1])


# --- DPU: the folded bias is 8-bit on the device ----------------------------------------------------------------
DPU_QAT = scheme_for_target("dpu", mode="qat")


def _dpu_pair(case: str, seed: int = 0):
    make_layer, make_bn, shape = CASES[case]
    torch.manual_seed(seed)
    layer, bn = make_layer(), _randomize_bn(make_bn(), seed)
    with torch.no_grad():  # folded biases far apart, so an 8-bit power-of-two grid rounds the small ones visibly
        bn.bias.mul_(torch.linspace(0.01, 20.0, bn.num_features))
    return QuantConvBn(copy.deepcopy(layer), copy.deepcopy(bn), DPU_QAT, name="blk"), torch.randn(*shape) * 2


@pytest.mark.parametrize("case", ["conv2d_bias", "conv2d_nobias", "linear_bn1d", "depthwise"])
def test_dpu_qat_conv_bn_in_eval_is_the_deployed_conv(case):
    fused, x = _dpu_pair(case)
    with torch.no_grad():
        fused.train()(x)  # batch statistics: observers calibrate, running statistics move
        fused.eval()
        out = fused(x)
        folded = fused.to_folded().eval()
        deployed = folded(x)
    assert folded.bias_fake_quant is not None and folded.bias_fake_quant.calibrated.item() == 1
    assert torch.equal(folded.bias_fake_quant.scale, fused.bias_fake_quant.scale)
    torch.testing.assert_close(out, deployed, rtol=0, atol=1e-5)
    # the bias really is rounded: the same conv with the float folded bias differs
    with torch.no_grad():
        folded.bias.copy_(fused.folded_bias())
        folded.bias_fake_quant = None
        assert (out - folded(x)).abs().max() > 1e-3


def test_dpu_qat_conv_bn_training_sees_the_rounded_bias_without_its_gradient():
    fused, x = _dpu_pair("conv2d_nobias")
    with torch.no_grad():
        fused.eval()(x)  # calibrate both quantizers on running statistics first
    fused.train()
    fused.weight_fake_quant.disable_observer()
    fused.bias_fake_quant.disable_observer()
    reference = copy.deepcopy(fused)
    reference.bias_fake_quant = None  # the same layer without the deployed bias
    out, ref = fused(x), reference(x)
    bias = fused.folded_bias().detach()
    rounding = (fused.bias_fake_quant(bias) - bias).reshape(1, -1, 1, 1)
    assert rounding.abs().max() > 1e-3
    torch.testing.assert_close(out, ref + rounding, rtol=0, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    assert torch.allclose(fused.bn.bias.grad, reference.bn.bias.grad)


def test_dpu_qat_state_without_bias_quantizer_loads_and_calibrates_it():
    """QAT checkpoints of 0.2 and earlier hold no folded-bias quantizer: they still load, and the layer then
    quantizes its folded bias as their export did (calibrated on the loaded folded bias)."""
    fused, x = _dpu_pair("conv2d_bias")
    with torch.no_grad():
        fused.eval()(x)
    old_state = {k: v for k, v in fused.state_dict().items() if not k.startswith("bias_fake_quant.")}
    fresh, _ = _dpu_pair("conv2d_bias", seed=5)
    assert fresh.bias_fake_quant.calibrated.item() == 0
    fresh.load_state_dict(old_state)
    assert fresh.bias_fake_quant.calibrated.item() == 1
    assert torch.equal(fresh.bias_fake_quant.scale, fused.bias_fake_quant.scale)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), fused(x), rtol=0, atol=1e-6)
