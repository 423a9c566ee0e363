"""ResNet50 and MobileNetV2 through both exporters: onnxruntime fusion, parity with fake-quant, file sizes.

Uses the pretrained offline Imagenette weights when the shared folder has them (random-init MobileNetV2 logits
collapse, which makes top-1 agreement meaningless), else torchvision random init with BatchNorm warmed.
Each model is quantized and exported once per module; the whole file takes minutes on 2 CPU cores, hence slow.
Inputs are seeded Gaussian noise in normalized-image space (calibration and evaluation use different seeds).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from lightning_quant import export_onnx, export_torchscript, quantize, verify_export
from lightning_quant.models import IMAGENETTE_EVAL_SIZES, IMAGENETTE_MODELS
from lightning_quant.paths import shared_dir
from tests.export.utils import (
    activation_zero_point_types,
    consumers,
    export_float_onnx,
    export_float_torchscript,
    fake_quant_output,
    load_torchscript_elsewhere,
    op_counts,
    ort_optimized,
    run_ort,
    weight_dequantizers,
)
from tests.helpers.models import warm_bn

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")]

# Measured on this machine with the pretrained weights (see the issue note): ResNet50 max 2 steps; MobileNetV2
# max ~5 steps, mean ~1 step. A 1-ulp difference at a rounding tie in an early layer flips one code, and
# MobileNetV2's depthwise/expand stack amplifies it; ORT's float QDQ graph without fusion drifts the same way.
MAX_DIFF_STEPS = {"resnet50": 3.0, "mobilenet_v2": 8.0}
MEAN_DIFF_STEPS = {"resnet50": 0.5, "mobilenet_v2": 1.5}
# int8 weights are 25% of the float file; per-channel weight scales, int32 biases and their scales add ~0.5% for
# ResNet50 but ~2.5% for MobileNetV2 (17k output channels for 2.2M weights), the graph's Q/DQ nodes ~1%.
MAX_ONNX_RATIO = {"resnet50": 0.26, "mobilenet_v2": 0.29}
MAX_TORCHSCRIPT_RATIO = {"resnet50": 0.26, "mobilenet_v2": 0.31}
CONVS = {"resnet50": 53, "mobilenet_v2": 52}
ADDS = {"resnet50": 16, "mobilenet_v2": 10}


def _load(name: str) -> tuple[torch.nn.Module, bool]:
    shared = shared_dir()
    if shared is not None and (shared / "weights" / f"{name}_imagenette.pth").is_file():
        return IMAGENETTE_MODELS[name](), True
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    return warm_bn(model, size=IMAGENETTE_EVAL_SIZES[name]["image_size"]), False


def _noise(seed: int, n: int, batch: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=["resnet50", "mobilenet_v2"])
def exported(request, tmp_path_factory):
    name = request.param
    size = IMAGENETTE_EVAL_SIZES[name]["image_size"]
    model, pretrained = _load(name)
    out = tmp_path_factory.mktemp(name)
    calib = _noise(seed=10, n=4, batch=8, size=size)
    qmodel = quantize(model, calib, progress=False)
    example = calib[0][:2]
    onnx_path = export_onnx(qmodel, out / f"{name}_int8.onnx", example)  # verify=True: the gate runs here too
    return SimpleNamespace(
        name=name,
        size=size,
        pretrained=pretrained,
        qmodel=qmodel,
        onnx_path=onnx_path,
        proto=onnx.load(str(onnx_path)),
        optimized=ort_optimized(onnx_path, out),
        script_path=export_torchscript(qmodel, out / f"{name}_int8.pt", example),
        float_onnx=export_float_onnx(model, out / f"{name}_fp32.onnx", example),
        float_script=export_float_torchscript(model, out / f"{name}_fp32.pt", example),
        out=out,
    )


def test_every_conv_add_and_gemm_is_fused_by_onnxruntime(exported):
    before, after = op_counts(exported.proto), op_counts(exported.optimized)
    assert before["Conv"] == CONVS[exported.name] and before["Gemm"] == 1
    assert after["QLinearConv"] == before["Conv"], after
    assert after["QLinearAdd"] == before["Add"] == ADDS[exported.name], after
    assert after["QGemm"] == 1, after
    assert not {"Conv", "FusedConv", "Gemm", "Add", "Relu", "Clip"} & set(after), after
    # what stays float: the global average pool (ReduceMean) and the Q/DQ at the graph's edges
    assert after["QuantizeLinear"] <= 2 and after["DequantizeLinear"] <= 2, after


def test_weights_are_int8_and_no_float_weight_initializer_remains(exported):
    proto = exported.proto
    inits = {init.name: init for init in proto.graph.initializer}
    dequantizers = weight_dequantizers(proto)
    assert len(dequantizers) == CONVS[exported.name] + 1
    assert all(inits[dq.input[0]].data_type == TensorProto.INT8 for dq in dequantizers.values())
    used_by = consumers(proto)
    scale_uses = {("QuantizeLinear", 1), ("DequantizeLinear", 1)}
    for init in proto.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            uses = {(node.op_type, index) for node, index in used_by[init.name]}
            # float arrays are per-channel Q/DQ scales only; scalars may also be ReLU6's Clip bounds (MobileNetV2)
            allowed = scale_uses if list(init.dims) else scale_uses | {("Clip", 1), ("Clip", 2)}
            assert uses <= allowed, (init.name, uses)
    assert "BatchNormalization" not in op_counts(proto)
    assert activation_zero_point_types(proto) == {"uint8"}


def test_onnxruntime_matches_fake_quant(exported, record_property):
    data = _noise(seed=11, n=4, batch=16, size=exported.size)
    report = verify_export(exported.qmodel, exported.onnx_path, data, latency_runs=0)
    step = report.max_abs_diff / report.max_diff_steps if report.max_diff_steps else 1.0
    mean_steps = report.mean_abs_diff / step
    record_property(f"{exported.name}_max_diff_steps", report.max_diff_steps)
    record_property(f"{exported.name}_mean_diff_steps", mean_steps)
    print(f"{exported.name}: {report.to_table()}\nmean diff {mean_steps:.2f} output steps")
    if exported.pretrained or exported.name != "mobilenet_v2":
        assert report.top1_agreement >= 0.99, report
    assert report.max_diff_steps <= MAX_DIFF_STEPS[exported.name], report
    assert mean_steps <= MEAN_DIFF_STEPS[exported.name], report


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(exported, batch):
    (graph_input,) = exported.proto.graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    x = _noise(seed=12, n=1, batch=batch, size=exported.size)[0]
    got = run_ort(exported.onnx_path, {graph_input.name: x.numpy()})
    expected = fake_quant_output(exported.qmodel, x)
    assert got.shape == (batch, 10)
    step = float(np.abs(got - expected).max())
    assert step < 1.0  # logits within a few output steps (each ~0.02-0.1 here)


def test_torchscript_loads_elsewhere_and_matches(exported, tmp_path):
    x = _noise(seed=13, n=1, batch=4, size=exported.size)[0]
    out, facts = load_torchscript_elsewhere(exported.script_path, (x,), tmp_path)
    assert facts["import_refused"] and not facts["lightning_quant_loaded"]
    assert facts["float_weight_elements"] == 0 and facts["int8_elements"] > 2_000_000
    torch.testing.assert_close(out, torch.from_numpy(fake_quant_output(exported.qmodel, x)), rtol=0, atol=1e-4)


def test_file_sizes_about_a_quarter_of_float(exported, record_property):
    onnx_ratio = exported.onnx_path.stat().st_size / exported.float_onnx.stat().st_size
    script_ratio = exported.script_path.stat().st_size / exported.float_script.stat().st_size
    record_property(f"{exported.name}_onnx_ratio", round(onnx_ratio, 4))
    record_property(f"{exported.name}_torchscript_ratio", round(script_ratio, 4))
    print(f"{exported.name}: ONNX int8/fp32 {onnx_ratio:.3f}, TorchScript int8/fp32 {script_ratio:.3f}")
    assert 0.25 <= onnx_ratio <= MAX_ONNX_RATIO[exported.name]
    assert 0.25 <= script_ratio <= MAX_TORCHSCRIPT_RATIO[exported.name]
