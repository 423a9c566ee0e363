"""DPU ops beyond conv/pool/add: Hard-Sigmoid and Hard-Swish (the DPU's 2731 / 2**14), the element-wise multiply and
nearest/bilinear resize. Each small model goes quantize(target="dpu") -> export_xmodel -> run_xmodel, which must
equal the fake-quant output bit for bit, and inspect_dpu puts it on the DPU; what the DPU cannot run still raises,
naming the node, with the inspector's reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant import export_xmodel, inspect_dpu, prepare, quantize, scheme_for_target
from lightning_quant.config import RoundingMode
from lightning_quant.export.xir_builder import XIRBuilder
from lightning_quant.export.xmodel_interpreter import XModelInterpreter, attr_value, load_xmodel, run_xmodel
from lightning_quant.export.xmodel_lowering import UnsupportedOpError
from lightning_quant.quantizers.dpu import fix_quantize
from lightning_quant.quantizers.dpu_activations import (
    DPUHardsigmoid,
    DPUHardswish,
    dpu_hardsigmoid,
    dpu_hardswish,
)


class Head(nn.Module):
    """conv -> ``body`` -> conv -> relu: ``body`` sees a quantized 8-channel conv output and feeds a quantized op."""

    def __init__(self, body: nn.Module, out_channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = body
        self.tail = nn.Conv2d(out_channels, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.tail(self.body(self.conv(x))))


class SqueezeExcite(nn.Module):
    """MobileNetV3's block: x * hardsigmoid(fc2(relu(fc1(avgpool(x))))), after a depthwise conv + Hard-Swish."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act = nn.Hardswish()
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dw(x))
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return scale * x


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class TwoBranchMul(nn.Module):
    """conv(x) * conv(x): the element-wise multiply of two tensors of one shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(x)


class LinearHardswish(nn.Module):
    """MobileNetV3's classifier: linear -> Hard-Swish -> dropout -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc1, self.fc2 = nn.Linear(4 * 7 * 7, 16), nn.Linear(16, 5)
        self.act, self.drop = nn.Hardswish(), nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(torch.flatten(F.relu(self.conv(x)), 1)))))


def _relu_then(fn) -> nn.Module:
    """relu then ``fn``: the resize reads the relu's quantized output."""
    return nn.Sequential(nn.ReLU(), fn if isinstance(fn, nn.Module) else Lambda(fn))


OPS = {
    "hardswish": (lambda: Head(nn.Hardswish()), ["hard-sigmoid", "mul", "fix", "mul"]),
    "hardswish_functional": (lambda: Head(Lambda(F.hardswish)), ["hard-sigmoid", "mul", "fix", "mul"]),
    "hardsigmoid": (lambda: Head(nn.Hardsigmoid()), ["hard-sigmoid", "mul", "fix"]),
    "squeeze_excite": (lambda: Head(SqueezeExcite()), ["hard-sigmoid", "mul", "fix", "mul"]),
    "mul": (lambda: Head(TwoBranchMul()), ["mul"]),
    "linear_hardswish": (LinearHardswish, ["matmul", "fix", "hard-sigmoid", "mul", "fix", "mul"]),
    "nearest": (lambda: Head(_relu_then(nn.Upsample(scale_factor=2))), ["resize"]),
    "nearest_size": (lambda: Head(_relu_then(lambda x: F.interpolate(x, size=(48, 32)))), ["resize"]),
    "bilinear2": (lambda: Head(_relu_then(nn.Upsample(scale_factor=2, mode="bilinear"))), ["resize"]),
    "bilinear4": (lambda: Head(_relu_then(lambda x: F.interpolate(x, scale_factor=4, mode="bilinear"))), ["resize"]),
    # SqueezeNet's and GoogLeNet's pools: 16 -> 8 (7 without ceil_mode), the interpreter pads for XIR's CEIL mode
    "maxpool_ceil": (lambda: Head(_relu_then(nn.MaxPool2d(3, 2, ceil_mode=True))), ["maxpool2d"]),
}  # fmt: skip


def _quantized(model: nn.Module, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(2, 3, 16, 16, generator=g) * s for s in (1.0, 2.0)]
    return quantize(model, data, target="dpu", progress=False), torch.randn(4, 3, 16, 16, generator=g) * 1.5


@pytest.mark.parametrize("kind", sorted(OPS))
def test_xmodel_equals_fake_quant_bit_for_bit(kind, tmp_path):
    torch.manual_seed(0)
    model = OPS[kind][0]().eval()
    assert inspect_dpu(model, torch.zeros(1, 3, 16, 16)).all_dpu
    qmodel, x = _quantized(model)
    path = export_xmodel(qmodel, tmp_path / f"{kind}.xmodel", x[:1])
    (out,) = run_xmodel(path, x.numpy())
    with torch.no_grad():
        expected = qmodel(x).numpy()
    assert np.array_equal(out, expected), f"{kind}: max diff {np.abs(out - expected).max()}"
    types = [op.type for op in load_xmodel(path).op_node if op.type != "const"]
    chain = OPS[kind][1]
    assert any(types[i : i + len(chain)] == chain for i in range(len(types))), types


def test_hardswish_is_written_as_vitis_ai_writes_it(tmp_path):
    """hard-sigmoid -> mul by 6 * 2731 / 2**14 -> fix at position 7 (DPU rounding) -> mul with the input."""
    torch.manual_seed(0)
    qmodel, x = _quantized(Head(nn.Hardswish()).eval())
    graph = load_xmodel(export_xmodel(qmodel, tmp_path / "m.xmodel", x[:1]))
    ops = {op.name: op for op in graph.op_node}
    hsig = next(op for op in graph.op_node if op.type == "hard-sigmoid")
    mul = next(op for op in graph.op_node if op.type == "mul" and hsig.name in op.args[0].ops)
    const = ops[mul.args[0].ops[1]]
    assert np.frombuffer(attr_value(const.attr["data"]), "<f4").tolist() == [6 * 2731 / 2**14]
    fix = next(op for op in graph.op_node if op.type == "fix" and op.args[0].ops == [mul.name])
    attrs = {k: attr_value(v) for k, v in fix.attr.items()}
    assert attrs == {"bit_width": 8, "fix_point": 7, "if_signed": True, "round_mode": "DPU_ROUND"}
    product = next(op for op in graph.op_node if op.type == "mul" and fix.name in op.args[0].ops)
    assert product.args[0].ops == [fix.name, hsig.args[0].ops[0]]  # the factor times hard-swish's (fixed) input


def test_bilinear_writes_half_pixel_centers(tmp_path):
    torch.manual_seed(0)
    qmodel, x = _quantized(OPS["bilinear2"][0]().eval())
    graph = load_xmodel(export_xmodel(qmodel, tmp_path / "m.xmodel", x[:1]))
    resize = next(op for op in graph.op_node if op.type == "resize")
    attrs = {k: attr_value(v) for k, v in resize.attr.items()}
    assert attrs == {"mode": "BILINEAR", "align_corners": False, "half_pixel_centers": True, "scale": [2.0, 2.0]}


@pytest.mark.parametrize("fix_in", [4, 9, 10, 11, 12])
def test_hardsigmoid_rounds_as_the_exact_dpu_value(fix_in):
    """Every int8 input code at every output position: the float32 module then the DPU's fix rounds as the exact
    ``relu6(x + 3) * 2731 / 2**14`` does (float32 cannot hold that product for inputs at positions 10 and up)."""
    x = torch.arange(-128, 128, dtype=torch.float32) / 2**fix_in
    exact = np.clip(x.double().numpy() + 3.0, 0.0, 6.0) * 2731 / 2**14
    for fix_out in range(3, 13):
        got = fix_quantize(dpu_hardsigmoid(x), fix_out, RoundingMode.HALF_UP).double().numpy()
        want = np.clip(np.floor(exact * 2**fix_out + 0.5), -128, 127) / 2**fix_out
        assert np.array_equal(got, want), (fix_in, fix_out)


def test_hardswish_values_and_gradient():
    x = torch.tensor([-4.0, -1.0, 0.5, 3.0], requires_grad=True)
    y = dpu_hardswish(x)
    assert y.tolist() == [-0.0, -43 / 128, 0.5 * 75 / 128, 3 * 127 / 128]  # 127: the 8-bit factor saturates
    y.sum().backward()
    assert x.grad is not None and dpu_hardsigmoid(x).requires_grad


def test_prepare_swaps_in_the_dpu_activations_for_the_dpu_target_only():
    net = Head(nn.Sequential(nn.Hardswish(), Lambda(F.hardsigmoid))).eval()
    dpu = prepare(net, scheme_for_target("dpu"))
    kinds = {type(m) for m in dpu.modules()}
    assert {DPUHardswish, DPUHardsigmoid} <= kinds and nn.Hardswish not in kinds
    x86 = prepare(net, scheme_for_target("x86"))
    assert not {DPUHardswish, DPUHardsigmoid} & {type(m) for m in x86.modules()}


class AddThenHardswish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(self.a(x) + self.b(x))


UNSUPPORTED = {
    "standalone_hardswish": (lambda: Head(AddThenHardswish()), "a standalone hard-swish after the add"),
    "mul_by_constant": (lambda: Head(Lambda(lambda x: F.relu(x) * 0.5)), "a multiply by a constant"),
    "bilinear3": (lambda: Head(_relu_then(nn.Upsample(scale_factor=3, mode="bilinear"))), "a bilinear resize by 3x3"),
    "align_corners": (
        lambda: Head(_relu_then(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))), "align_corners=True"
    ),
    "fractional": (lambda: Head(_relu_then(lambda x: F.interpolate(x, scale_factor=1.5))), "integer factors"),
    "unquantized_resize": (  # Hard-Swish feeds no quantized op, so its output has no quantizer
        lambda: Head(nn.Sequential(nn.Hardswish(), nn.Upsample(scale_factor=2))), "a resize of a tensor that is not"
    ),
    "bicubic": (lambda: Head(_relu_then(nn.Upsample(scale_factor=2, mode="bicubic"))), "mode='bicubic'"),
    "transposed_conv": (
        lambda: Head(nn.ConvTranspose2d(8, 8, 2, stride=2)), "does not quantize transposed convs yet"
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
def test_unsupported_ops_raise_naming_the_node(kind, tmp_path):
    torch.manual_seed(0)
    model, reason = UNSUPPORTED[kind][0]().eval(), UNSUPPORTED[kind][1]
    report = inspect_dpu(model, torch.zeros(1, 3, 16, 16))
    (cpu_op,) = report.cpu_ops
    assert reason in cpu_op.reason and report.partitions == 2
    qmodel, x = _quantized(model)
    with pytest.raises(UnsupportedOpError, match=rf"cannot lower .*\(node '{cpu_op.node}'"):
        export_xmodel(qmodel, tmp_path / "m.xmodel", x[:1])


def test_interpreter_runs_xir_resize_and_hard_swish_by_their_definitions():
    b = XIRBuilder("Net")
    x = b.add("x", "data", [1, 3, 2, 2], {"shape": [1, 3, 2, 2], "data_type": "FLOAT32"})
    attrs = {"mode": "BILINEAR", "align_corners": False, "half_pixel_centers": True, "scale": [2.0, 2.0]}
    bilinear = b.add("bilinear", "resize", [1, 6, 4, 2], attrs | {"scale": [2.0, 2.0]}, [("input", [x])])
    nearest = b.add("nearest", "resize", [1, 3, 6, 2], attrs | {"mode": "NEAREST", "half_pixel_centers": False,
                                                               "scale": [3.0, 1.0]}, [("input", [x])])  # fmt: skip
    swish = b.add("swish", "hard-swish", [1, 3, 2, 2], {}, [("input", [x])])
    value = np.random.default_rng(0).normal(size=(1, 3, 2, 2)) * 3  # NHWC
    out = XModelInterpreter(b.graph).run({x: value})
    nchw = torch.from_numpy(value.transpose(0, 3, 1, 2))
    want = F.interpolate(nchw, scale_factor=2, mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert np.allclose(out[bilinear], want)
    want = F.interpolate(nchw, scale_factor=(1, 3)).numpy().transpose(0, 2, 3, 1)
    assert np.array_equal(out[nearest], want)
    assert np.allclose(out[swish], F.hardswish(torch.from_numpy(value)).numpy())


def test_deploy_check_compares_the_hardswish_factor_too(tmp_path):
    """The XModel's fix at position 7 inside Hard-Swish has its fake-quant twin in the per-layer dump."""
    from lightning_quant.export.deploy_check import compare_dumps, dump_fake_quant, dump_xmodel

    torch.manual_seed(0)
    qmodel, x = _quantized(Head(SqueezeExcite()).eval())
    path = export_xmodel(qmodel, tmp_path / "m.xmodel", x[:1])
    report = compare_dumps(
        dump_fake_quant(qmodel, x[:1], tmp_path / "fq"), dump_xmodel(path, x[:1], tmp_path / "xm"), tolerance=0
    )
    assert report.ok, report.summary()
    assert any(op.name.endswith("_hsigmoid_mul_fix") for op in report.ops)


def test_onnx_and_torchscript_exports_take_the_dpu_activations(tmp_path):
    from lightning_quant import export_onnx, export_torchscript

    torch.manual_seed(0)
    qmodel, x = _quantized(Head(SqueezeExcite()).eval())
    assert export_onnx(qmodel, tmp_path / "m.onnx", x[:1]).is_file()  # its verification gate passes
    scripted = torch.jit.load(str(export_torchscript(qmodel, tmp_path / "m.pt", x[:1])))
    with torch.no_grad():
        assert torch.equal(scripted(x), qmodel(x))
