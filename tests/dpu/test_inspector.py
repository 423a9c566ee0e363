"""The DPU inspector: every op of the graph with DPU/CPU and the reason, the partition count, and the same rules as
export_xmodel (an op the inspector puts on the CPU is one export refuses, with the same reason)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_quant import DPUInspection, export_xmodel, inspect_dpu, quantize
from lightning_quant.export.xmodel_lowering import UnsupportedOpError
from tests.dpu.models import LeNet
from tests.helpers.models import TinyConvBN, UntraceableNet, warm_bn

LENET_X = torch.rand(1, 3, 32, 32) * 2 - 1
X = torch.rand(1, 3, 16, 16) * 2 - 1


class Middle(nn.Module):
    """conv-relu, then ``middle``, then conv-relu and a linear head: the DPU runs both ends."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.middle = middle
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tail(self.middle(self.head(x))))


class SigmoidGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)  # SiLU written out: the sigmoid leaves the DPU graph, the multiply comes back


MIDDLES = {
    "hardswish": (nn.Hardswish, "a standalone hard-swish after the relu", 1),  # fused only right after a conv/linear
    "kernel17": (lambda: nn.Conv2d(8, 8, 17, padding=8), "conv2d with kernel 17x17 (DPUCZDX8G: kernel sides 1..16)", 1),
    "stride9": (lambda: nn.Conv2d(8, 8, 3, stride=9, padding=1), "a conv2d with stride 9x9", 1),
    "padding": (lambda: nn.Conv2d(8, 8, 1, padding=1), "a conv2d with padding 1x1", 1),
    "multiplier": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=8), "channel multiplier 2", 1),
    "sigmoid": (SigmoidGate, "activation sigmoid", 1),
}  # fmt: skip


def _middle(kind: str) -> nn.Module:
    torch.manual_seed(0)
    middle = MIDDLES[kind][0]()
    if kind == "multiplier":  # 16 channels out of the middle: widen the tail's input
        net = Middle(middle)
        net.tail[0] = nn.Conv2d(16, 8, 3, padding=1)
        return net.eval()
    return Middle(middle).eval()


def test_lenet_runs_whole_on_the_dpu():
    model = LeNet().eval()
    report = inspect_dpu(model, LENET_X)
    assert isinstance(report, DPUInspection) and report.all_dpu
    assert report.partitions == 1 and report.cpu_subgraphs == 0 and not report.cpu_ops
    assert [op.op for op in report.ops] == [
        "conv2d", "relu", "maxpool2d", "conv2d", "relu", "maxpool2d", "reshape", "matmul", "relu", "matmul", "relu",
        "matmul",
    ]  # fmt: skip
    assert {op.target for op in report.ops} == {"DPU"} and {op.subgraph for op in report.ops} == {0}
    assert not any(hasattr(m, "weight_fake_quant") for m in model.modules())  # the model itself is not prepared


@pytest.mark.parametrize("kind", sorted(MIDDLES))
def test_an_op_in_the_middle_splits_the_dpu_graph(kind):
    _, reason, n_cpu = MIDDLES[kind]
    report = inspect_dpu(_middle(kind), X)
    cpu = report.cpu_ops
    assert len(cpu) == n_cpu and reason in cpu[0].reason
    assert report.partitions == 2 and report.cpu_subgraphs == 1  # DPU -> CPU -> DPU
    assert [op.subgraph for op in report.dpu_ops][:2] == [0, 0] and report.dpu_ops[-1].subgraph == 1
    table = str(report)
    assert table.splitlines()[1].split() == ["node", "op", "target", "reason"]
    assert f"{len(report.ops)} ops, {len(report.dpu_ops)} on the DPU, {n_cpu} on the CPU; 2 DPU subgraphs" in table
    assert json.loads(json.dumps(report.to_dict()))["ops"][0] == {
        "node": "head_0", "op": "conv2d", "target": "DPU", "reason": "", "layer": "head.0", "subgraph": 0,
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["hardswish", "kernel17", "multiplier"])
def test_export_refuses_what_the_inspector_puts_on_the_cpu_with_the_same_reason(kind, tmp_path):
    model = _middle(kind)
    reason = inspect_dpu(model, X).cpu_ops[0].reason
    qmodel = quantize(model, [torch.rand(2, 3, 16, 16) * 2 - 1], target="dpu", progress=False)
    with pytest.raises(UnsupportedOpError) as caught:
        export_xmodel(qmodel, tmp_path / "m.xmodel", X)
    assert reason in str(caught.value) and "inspect_dpu" in str(caught.value)
    assert inspect_dpu(qmodel, X).cpu_ops[0].reason == reason  # a quantized model is inspected the same way


def test_quantized_model_and_float_model_give_one_report():
    float_model = warm_bn(TinyConvBN())
    qmodel = quantize(float_model, [torch.rand(2, 3, 16, 16)], target="dpu", progress=False)
    assert inspect_dpu(qmodel, X).to_dict() == inspect_dpu(float_model, X).to_dict()


def test_excluded_layers_are_cpu_ops():
    report = inspect_dpu(LeNet().eval(), LENET_X, exclude=["fc3"])
    assert [(op.layer, op.target) for op in report.cpu_ops] == [("fc3", "CPU")]
    assert "float Linear" in report.cpu_ops[0].reason and report.partitions == 1


def test_bad_models_and_inputs_are_named():
    with pytest.raises(ValueError, match=r"traced whole.*control flow"):
        inspect_dpu(UntraceableNet().eval(), X)
    x86 = quantize(warm_bn(TinyConvBN()), [torch.rand(2, 3, 16, 16)], target="x86", progress=False)
    with pytest.raises(ValueError, match="prepared for target x86, not the DPU"):
        inspect_dpu(x86, X)
    with pytest.raises(ValueError, match=r"does not run on example_input of shape \[1, 5, 16, 16\]"):
        inspect_dpu(TinyConvBN().eval(), torch.rand(1, 5, 16, 16))
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        inspect_dpu(TinyConvBN().eval(), [X])


class ResidualAroundCPU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        return self.conv2(y + torch.sigmoid(y))


def test_a_dpu_op_waiting_for_the_cpu_starts_a_new_subgraph():
    report = inspect_dpu(ResidualAroundCPU().eval(), X)  # the add reads relu (DPU) and sigmoid (CPU)
    assert [(op.op, op.target, op.subgraph) for op in report.ops] == [
        ("conv2d", "DPU", 0), ("relu", "DPU", 0), ("sigmoid", "CPU", 0), ("add", "DPU", 1), ("conv2d", "DPU", 1),
    ]  # fmt: skip
    assert report.partitions == 2
