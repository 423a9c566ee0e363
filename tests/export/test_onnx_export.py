"""INT8 QDQ ONNX export of the tiny models: graph contract, onnxruntime fusion and parity with fake-quant.

Every ONNX file here is written by ``export_onnx`` with ``verify=True`` (the default), so the verification gate
runs after each export as well.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from lightning_quant import export_onnx, export_torchscript, quantize, verify_export
from lightning_quant.calibration import calibrate
from lightning_quant.config import scheme_for_target
from lightning_quant.export.verify import load_runner, runs_on_cpu_int8_kernels
from lightning_quant.quantizers import prepare
from tests.export.utils import (
    SCALE_MATH_OPS,
    activation_zero_point_types,
    activation_zero_points,
    consumers,
    fake_quant_output,
    initializers,
    op_counts,
    ort_optimized,
    run_ort,
    weight_dequantizers,
)
from tests.helpers.models import DictInputNet, TinyConvBN, TwoInputNet, UntraceableNet, warm_bn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def _identity(item):
    return item


def test_opset_and_onnx_checker(tiny_exports):
    proto = tiny_exports["x86"].proto
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) >= 13
    onnx.checker.check_model(proto, full_check=True)


def test_batchnorm_folded_and_no_scale_math_in_graph(tiny_exports):
    counts = op_counts(tiny_exports["x86"].proto)
    assert "BatchNormalization" not in counts
    assert not SCALE_MATH_OPS & set(counts), counts
    assert counts["Conv"] == 2 and counts["Gemm"] == 1


def test_weights_are_int8_initializers_with_constant_per_channel_scales(tiny_exports):
    proto = tiny_exports["x86"].proto
    inits = initializers(proto)
    dequantizers = weight_dequantizers(proto)
    assert len(dequantizers) == 3  # conv1, conv2, fc
    for node_name, dq in dequantizers.items():
        weight, scale, zero_point = (inits[name] for name in dq.input)
        assert weight.data_type == TensorProto.INT8, node_name
        assert scale.data_type == TensorProto.FLOAT and list(scale.dims) == [weight.dims[0]], node_name
        assert zero_point.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero_point).any()
        assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
        assert np.abs(numpy_helper.to_array(weight)).max() <= 127  # narrow range, symmetric


def test_no_float_weight_initializers_remain(tiny_exports):
    """Every float initializer is a Q/DQ scale: no float weights, biases or scale arithmetic inputs."""
    proto = tiny_exports["x86"].proto
    used_by = consumers(proto)
    floats = [init for init in proto.graph.initializer if init.data_type == TensorProto.FLOAT]
    assert floats
    for init in floats:
        uses = {(node.op_type, index) for node, index in used_by[init.name]}
        assert uses <= {("QuantizeLinear", 1), ("DequantizeLinear", 1)}, (init.name, uses)
    biases = [init for init in proto.graph.initializer if init.name.endswith("bias_int32")]
    assert len(biases) == 3 and all(b.data_type == TensorProto.INT32 for b in biases)


def test_dynamic_batch_runs_batch_1_and_5(tiny_exports, eval_batches):
    x86 = tiny_exports["x86"]
    (graph_input,) = x86.proto.graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 5):
        x = eval_batches[0][:batch]
        got = run_ort(x86.path, {graph_input.name: x.numpy()})
        expected = fake_quant_output(x86.qmodel, x)
        assert got.shape == (batch, 10)
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_batch_of_one_example_still_gives_dynamic_batch(tiny_exports, eval_batches, tmp_path):
    x86 = tiny_exports["x86"]
    path = export_onnx(x86.qmodel, tmp_path / "b1.onnx", eval_batches[0][:1])
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert op_counts(proto) == op_counts(x86.proto)  # same graph as from a batch-2 example
    report = verify_export(x86.qmodel, path, [eval_batches[1][:5]], latency_runs=0, max_diff_steps=1)
    assert report.num_samples == 5 and report.top1_agreement == 1.0


@pytest.mark.parametrize(("target", "zp_type"), [("x86", "uint8"), ("tensorrt", "int8")])
def test_target_decides_activation_signedness(tiny_exports, target, zp_type):
    proto = tiny_exports[target].proto
    assert activation_zero_point_types(proto) == {zp_type}
    if target == "tensorrt":  # symmetric activations: every zero point is 0
        assert set(activation_zero_points(proto)) == {0}


def test_onnxruntime_fuses_every_conv_add_and_gemm(tiny_exports):
    x86 = tiny_exports["x86"]
    optimized = op_counts(ort_optimized(x86.path, x86.dir))
    assert optimized["QLinearConv"] == 2, optimized  # conv1 (+ReLU folded into its Q), conv2
    assert optimized["QLinearAdd"] == 1, optimized  # residual add (+ReLU)
    assert optimized["QGemm"] == 1, optimized  # fc
    assert not {"Conv", "Gemm", "FusedConv", "Add", "Relu"} & set(optimized), optimized


def test_max_pool_runs_as_an_integer_pool_and_matches_fake_quant(tmp_path):
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1),
        torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(1), torch.nn.Linear(4 * 8 * 8, 5),
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(3)]
    # with a clipping estimator a quantizer of its own would pick another range for the pooled (larger) values
    scheme = scheme_for_target("x86", activation_observer="percentile", activation_percentile=99.0)
    qmodel = quantize(model, data, scheme=scheme, progress=False)
    path = export_onnx(qmodel, tmp_path / "pool.onnx", data[0][:1])
    optimized = op_counts(ort_optimized(path, tmp_path))
    # the pool reads and writes uint8 on one grid, so onnxruntime keeps it integer between the two QLinearConvs:
    # the only float boundaries left are the model input (Q) and output (DQ)
    assert optimized["QLinearConv"] == 2 and optimized["QGemm"] == 1, optimized
    assert optimized["QuantizeLinear"] == optimized["DequantizeLinear"] == 1, optimized
    x = torch.randn(4, 3, 16, 16, generator=g)
    step = float(qmodel.get_submodule("activation_quantizers._6").scale)  # the output quantizer
    diff = np.abs(run_ort(path, {"input": x.numpy()}) - fake_quant_output(qmodel, x))
    assert diff.max() <= 1.01 * step and diff.mean() <= 0.1 * step  # integer requantization: a rare 1-step tie


def test_ort_matches_fake_quant_on_tiny_model(tiny_exports, eval_batches):
    for target in ("x86", "tensorrt"):
        report = verify_export(
            tiny_exports[target].qmodel, tiny_exports[target].path, eval_batches, latency_runs=0, max_diff_steps=2
        )
        assert report.num_samples == 64
        assert report.top1_agreement >= 0.99, (target, report)
        assert report.max_diff_steps <= 2, (target, report)
        step = report.max_abs_diff / report.max_diff_steps if report.max_diff_steps else 0.0
        assert report.mean_abs_diff <= 0.1 * step, (target, report)  # almost every output is exact


def _calib_pairs(seed: int, n: int = 3, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 12, 12, generator=g), torch.randn(batch, 1, 12, 12, generator=g)) for _ in range(n)]


def test_two_input_net_exports_and_verifies(tmp_path):
    torch.manual_seed(3)
    data = _calib_pairs(0)
    qmodel = quantize(TwoInputNet().eval(), data, transform_fn=_identity, progress=False)
    path = export_onnx(qmodel, tmp_path / "two.onnx", data[0])
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["rgb", "depth"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in proto.graph.input)
    held_out = _calib_pairs(1, n=4, batch=16)
    report = verify_export(qmodel, path, held_out, transform_fn=_identity, latency_runs=0, max_diff_steps=2)
    assert report.top1_agreement >= 0.99 and report.artifact_accuracy is None  # inputs are not (input, label)
    rgb, depth = held_out[0]
    got = run_ort(path, {"rgb": rgb[:5].numpy(), "depth": depth[:5].numpy()})
    np.testing.assert_array_equal(got.argmax(1), fake_quant_output(qmodel, (rgb[:5], depth[:5])).argmax(1))
    script = export_torchscript(qmodel, tmp_path / "two.pt", data[0])
    assert verify_export(qmodel, script, held_out, transform_fn=_identity, latency_runs=0).max_abs_diff < 1e-5


def test_dict_input_net_exports_and_verifies(tmp_path):
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(0)
    data = [
        ({"image": torch.randn(8, 3, 10, 10, generator=g), "extra": torch.randn(8, 2, generator=g)},) for _ in range(4)
    ]
    qmodel = quantize(DictInputNet().eval(), data[:3], transform_fn=_identity, progress=False)
    path = export_onnx(qmodel, tmp_path / "dict.onnx", data[0])
    assert len(onnx.load(str(path)).graph.input) == 2
    report = verify_export(qmodel, path, data, transform_fn=_identity, latency_runs=0, max_diff_steps=2)
    assert report.top1_agreement >= 0.99
    script = export_torchscript(qmodel, tmp_path / "dict.pt", data[0])
    assert verify_export(qmodel, script, data, transform_fn=_identity, latency_runs=0).max_abs_diff < 1e-5


def test_qat_model_exports_and_verifies(tmp_path, calib_batches, eval_batches):
    torch.manual_seed(5)
    qmodel = prepare(warm_bn(TinyConvBN()), scheme_for_target("x86", mode="qat"), mode="qat")
    calibrate(qmodel, calib_batches[:2], progress=False)
    qmodel.train()  # a few QAT steps so weights, BN statistics and moving-average ranges move
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    labels = torch.arange(16) % 10
    for x in calib_batches:
        loss = torch.nn.functional.cross_entropy(qmodel(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qmodel.eval()
    path = export_onnx(qmodel, tmp_path / "qat.onnx", calib_batches[0][:2])
    assert "BatchNormalization" not in op_counts(onnx.load(str(path)))  # QAT conv+BN folded on export
    report = verify_export(qmodel, path, eval_batches, latency_runs=0, max_diff_steps=2)
    assert report.top1_agreement >= 0.99
    script = export_torchscript(qmodel, tmp_path / "qat.pt", calib_batches[0][:2])
    assert verify_export(qmodel, script, eval_batches, latency_runs=0).max_abs_diff < 1e-5


def test_untraceable_model_onnx_error_names_torchscript(tmp_path, calib_batches):
    qmodel = quantize(warm_bn(UntraceableNet()), calib_batches[:2], progress=False)
    with pytest.raises(RuntimeError, match=r"torch.export could not capture.*export_torchscript"):
        export_onnx(qmodel, tmp_path / "untraceable.onnx", calib_batches[0][:2])
    assert not list(tmp_path.iterdir())
    script = export_torchscript(qmodel, tmp_path / "untraceable.pt", calib_batches[0][:2])
    assert verify_export(qmodel, script, calib_batches[2:], latency_runs=0).max_abs_diff < 1e-5


def test_exporter_chatter_is_silenced_and_log_levels_restored(tmp_path, calib_batches, caplog):
    # an app logging at INFO (Hydra does) must not print the exporter's hundreds of graph-pass messages
    import logging

    names = ("torch.onnx", "onnxscript", "onnx_ir")
    before = [logging.getLogger(n).level for n in names]
    caplog.set_level(logging.INFO)
    qmodel = quantize(warm_bn(TinyConvBN()), calib_batches, progress=False)
    export_onnx(qmodel, tmp_path / "m.onnx", calib_batches[0])
    noisy = [r for r in caplog.records if r.name.split(".")[0] in ("onnxscript", "onnx_ir") or r.name == "torch.onnx"]
    assert noisy == []
    assert [logging.getLogger(n).level for n in names] == before


class TokenMLP(torch.nn.Module):
    """Linear layers on 3-D (batch, tokens, features) inputs: exported as ``DQ(w) -> Transpose -> MatMul``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).mean(dim=1)


@pytest.mark.parametrize("target", ["x86", "tensorrt"])
def test_linear_on_tokens_keeps_signed_per_channel_weights(tmp_path, target):
    """Regression: a Q/DQ pair repeated after the weight's Transpose had no zero point (so uint8: every negative
    weight became 0) and lost the per-channel axis; ViT/Swin MLPs came out of onnxruntime as noise."""
    torch.manual_seed(0)
    data = [torch.randn(4, 5, 8) for _ in range(3)]
    qmodel = quantize(TokenMLP().eval(), data, target=target, progress=False)
    path = export_onnx(qmodel, tmp_path / "tokens.onnx", data[0])
    model = onnx.load(str(path))
    inits = initializers(model)
    for node in weight_dequantizers(model).values():  # every MatMul reads a stored signed weight directly
        assert node.input[0] in inits and inits[node.input[0]].data_type == TensorProto.INT8
    assert "Transpose" not in op_counts(model)
    # tensorrt's signed activations are checked by the graph's definition (onnxruntime's s8s8 CPU kernels saturate
    # on CPUs without VNNI; see verify_export), x86 through onnxruntime's fused integer kernels
    got = load_runner(path, int8_kernels=runs_on_cpu_int8_kernels(qmodel))(data[2])
    expected = fake_quant_output(qmodel, data[2])
    step = qmodel.activation_quantizers[next(reversed(qmodel.activation_quantizers.keys()))].scale.item()
    assert np.abs(got - expected).max() <= step * 1.01
