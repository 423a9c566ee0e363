"""Where prepare() puts weight and activation quantizers, checked on torchvision ResNet-50 / MobileNetV2."""

from __future__ import annotations

import operator

import pytest
import torch
import torchvision
from torch import fx, nn

from lightning_quant.config import scheme_for_target
from lightning_quant.quantizers import FakeQuantize, iter_quantizers, prepare, prepare_info
from lightning_quant.quantizers.modules import QuantConv2d, QuantConvBn, QuantLinear
from tests.helpers.models import TinyConvBN, warm_bn

X86 = scheme_for_target("x86")

# measured with torchvision 0.29 (weights=None): the placement the issue specifies
EXPECTED = {
    "resnet50": dict(weights=54, activations=72, folded_bn=53, head="fc"),  # the stem max pool reuses its input's
    "mobilenet_v2": dict(weights=53, activations=65, folded_bn=52, head="classifier.1"),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return _build("resnet50")


@pytest.fixture(scope="module")
def mobilenet_v2() -> nn.Module:
    return _build("mobilenet_v2")


@pytest.fixture(scope="module", params=list(EXPECTED))
def prepared(request):
    """(name, float model, model prepared for x86), built once per module."""
    model = request.getfixturevalue(request.param)
    return request.param, model, prepare(model, X86)


def _split(model: nn.Module) -> tuple[list[str], list[str]]:
    names = [n for n, _ in iter_quantizers(model)]
    weights = [n for n in names if n.endswith("weight_fake_quant")]
    return weights, [n for n in names if n not in weights]


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_act_q(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), FakeQuantize)


def test_quantizer_counts(prepared):
    name, model, qmodel = prepared
    expected = EXPECTED[name]
    weights, activations = _split(qmodel)
    info = prepare_info(qmodel)
    assert len(weights) == expected["weights"]
    assert len(activations) == expected["activations"]
    assert len(info.folded_bn) == expected["folded_bn"]
    assert len(info.quantized_layers) == expected["weights"]
    assert info.untraced == {} and info.float_layers == {} and info.traced == ["<model>"]
    # every float conv/linear was swapped, every BN folded away; the input model is untouched
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d) for m in qmodel.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == expected["folded_bn"]
    assert not any(isinstance(m, FakeQuantize) for m in model.modules())


def test_activation_placement_rules(prepared):
    name, _, gm = prepared
    graph_nodes = list(gm.graph.nodes)
    weight_nodes = [n for n in graph_nodes if isinstance(_module(gm, n), (QuantConv2d, QuantLinear))]
    assert len(weight_nodes) == EXPECTED[name]["weights"]
    fused_acts = (nn.ReLU, nn.ReLU6)
    for node in weight_nodes:
        users = list(node.users)
        assert len(users) == 1, node.name
        user = users[0]
        if isinstance(_module(gm, user), fused_acts):
            # never between a conv and its ReLU: the quantizer comes after the activation
            assert all(_is_act_q(gm, u) for u in user.users), node.name
        else:
            assert _is_act_q(gm, user), f"output of {node.name} is not quantized"
        # the layer's input is quantized (possibly through a flatten or dropout, which only move values)
        src = node.args[0]
        while src.target is torch.flatten or isinstance(_module(gm, src), nn.Dropout):
            src = src.args[0]
        assert _is_act_q(gm, src), f"input of {node.name} is not quantized"
    # the model input is quantized before anything else sees it
    (placeholder,) = [n for n in graph_nodes if n.op == "placeholder"]
    assert placeholder.users and all(_is_act_q(gm, u) for u in placeholder.users)
    # every residual add takes quantized inputs
    adds = [n for n in graph_nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)]
    assert len(adds) == (16 if name == "resnet50" else 10)
    for add in adds:
        assert all(_is_act_q(gm, a) for a in add.args), add.name
    # the classifier output is quantized and is the model output
    (head,) = [n for n in graph_nodes if n.op == "call_module" and n.target == EXPECTED[name]["head"]]
    assert [_is_act_q(gm, u) for u in head.users] == [True]
    (output,) = [n for n in graph_nodes if n.op == "output"]
    assert output.args[0] in head.users
    # max pools reuse their input's quantizer (called again without observing), so they run as integer pools
    for pool in (n for n in graph_nodes if isinstance(_module(gm, n), nn.MaxPool2d)):
        (user,) = pool.users
        assert _is_act_q(gm, user) and user.kwargs == {"observe": False}, pool.name
        assert user.target == pool.args[0].target, "not the quantizer of the pool's input"
    # no quantizer is applied twice to the same value
    for node in graph_nodes:
        if _is_act_q(gm, node):
            assert not _is_act_q(gm, node.args[0]), node.name


def test_prepared_mobilenet_runs_and_calibrates_every_quantizer(mobilenet_v2):
    # one forward pass is enough to show the rewritten graph runs; ResNet-50's 25M weights make it slow on CPU
    qmodel = prepare(mobilenet_v2, X86)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = qmodel(x)
        ref = mobilenet_v2(x)
    assert out.shape == ref.shape == (1, 1000)
    assert torch.isfinite(out).all()
    assert all(fq.calibrated.item() == 1 for _, fq in iter_quantizers(qmodel))


def test_qat_keeps_batchnorm_in_quant_conv_bn(resnet50):
    qmodel = prepare(resnet50, scheme_for_target("x86", mode="qat"), mode="qat")
    fused = [m for m in qmodel.modules() if isinstance(m, QuantConvBn)]
    assert len(fused) == 53
    assert all(isinstance(m.bn, nn.BatchNorm2d) and not m.bn_frozen.item() for m in fused)
    # each BN lives only inside its QuantConvBn: no stale top-level copy in the state dict
    bn_keys = [k for k in qmodel.state_dict() if k.endswith("running_mean")]
    assert len(bn_keys) == 53 and all(k.endswith(".bn.running_mean") for k in bn_keys)
    info = prepare_info(qmodel)
    assert info.folded_bn == [] and len(info.quantized_layers) == 54
    assert isinstance(qmodel.get_submodule("fc"), QuantLinear)
    weights, activations = _split(qmodel)
    assert (len(weights), len(activations)) == (54, 72)
    assert all(fq.spec.observer == "moving_average" for _, fq in iter_quantizers(qmodel) if not fq.spec.per_channel)


# --- small models: exact placement ------------------------------------------------------------------------------


def test_tiny_conv_bn_exact_activation_points():
    qmodel = prepare(warm_bn(TinyConvBN()), X86)
    _, activations = _split(qmodel)
    assert activations == [f"activation_quantizers.{n}" for n in ("x", "relu", "conv2", "relu_1", "pool", "fc")]
    assert prepare_info(qmodel).folded_bn == ["bn1", "bn2"]
    assert prepare_info(qmodel).quantized_layers == ["conv1", "conv2", "fc"]


class _Pools(nn.Module):
    """conv -> relu -> max pool -> max pool -> conv, and a functional max pool before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.pool1, self.pool2 = nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.pool2(self.pool1(torch.relu(self.conv1(x)))))
        return self.fc(torch.flatten(torch.nn.functional.max_pool2d(y, 4), 1))


def test_max_pools_reuse_their_input_quantizer_without_observing_again():
    qmodel = prepare(_Pools().eval(), X86)
    _, activations = _split(qmodel)
    assert activations == [f"activation_quantizers.{n}" for n in ("x", "relu", "conv2", "fc")]
    calls = [(n.target, n.args[0].name, n.kwargs) for n in qmodel.graph.nodes if _is_act_q(qmodel, n)]
    shared = [(t, src) for t, src, kw in calls if kw == {"observe": False}]
    assert shared == [("activation_quantizers.relu", "pool1"), ("activation_quantizers.relu", "pool2"),
                      ("activation_quantizers.conv2", "max_pool2d")]  # fmt: skip
    # the pooled values are not counted again: the histogram holds exactly the ReLU output's elements
    pct = prepare(_Pools().eval(), scheme_for_target("x86", activation_observer="percentile"))
    with torch.no_grad():
        pct(torch.randn(2, 3, 16, 16))
    assert int(pct.get_submodule("activation_quantizers.relu").observer.histogram.sum()) == 2 * 8 * 16 * 16
    # a pool's output is on its input's grid, so the shared call changes nothing once calibrated
    qmodel.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        qmodel(x)
    for _, fq in iter_quantizers(qmodel):
        fq.disable_observer()
    relu_q = qmodel.get_submodule("activation_quantizers.relu")
    on_grid = relu_q(torch.relu(torch.randn(2, 8, 16, 16)))
    assert torch.equal(relu_q(torch.nn.functional.max_pool2d(on_grid, 2), observe=False),
                       torch.nn.functional.max_pool2d(on_grid, 2))  # fmt: skip


def test_exclude_keeps_layers_float_with_reason():
    qmodel = prepare(warm_bn(TinyConvBN()), X86, exclude=["fc"])
    info = prepare_info(qmodel)
    assert info.quantized_layers == ["conv1", "conv2"]
    assert "excluded (exclude=" in info.float_layers["fc"]
    assert type(qmodel.get_submodule("fc")) is nn.Linear


def test_norm_without_conv_before_it_is_reported_float():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    info = prepare_info(prepare(model, X86))
    assert info.folded_bn == []
    assert "no conv/linear right before it" in info.float_layers["2"]
