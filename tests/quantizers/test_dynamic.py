"""Dynamic quantization of Linear layers: onnxruntime's DynamicQuantizeLinear numerics, ONNX integer ops, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_quant import NothingToQuantizeError, export_onnx, export_torchscript, quantize, quantize_dynamic
from lightning_quant.quantizers.dynamic import DynamicQuantLinear, dynamic_fake_quantize, dynamic_qparams

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _reference_qparams(x: np.ndarray) -> tuple[float, int]:
    """The ONNX spec of DynamicQuantizeLinear, written out."""
    low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((high - low) / 255.0)
    zero_point = int(np.clip(np.round(np.float32(0 - low) / scale), 0, 255))
    return float(scale), zero_point


def _ort_dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(n, t, None) for n, t in (("q", TensorProto.UINT8), ("s", 1), ("z", 2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, s, z = session.run(None, {"x": x})
    return q, float(s), int(z)


@pytest.mark.parametrize("seed", range(5))
def test_qparams_match_the_spec_and_onnxruntime(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 33, generator=g) * (seed + 1) + (seed - 2)  # skewed ranges, one all-positive
    scale, zero_point = dynamic_qparams(x)
    assert (float(scale), int(zero_point)) == pytest.approx(_reference_qparams(x.numpy()))
    q, ort_scale, ort_zero_point = _ort_dynamic_quantize(x.numpy())
    assert (float(scale), int(zero_point)) == pytest.approx((ort_scale, ort_zero_point))
    ours = dynamic_fake_quantize(x)
    theirs = (q.astype(np.float32) - ort_zero_point) * ort_scale
    assert np.abs(ours.numpy() - theirs).max() <= 1.01 * ort_scale  # ties may round one code apart at most
    assert np.mean(np.abs(ours.numpy() - theirs) < 1e-6) > 0.99


def test_all_zero_input_stays_zero():
    assert torch.equal(dynamic_fake_quantize(torch.zeros(3, 4)), torch.zeros(3, 4))


def _mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64, bias=bias), nn.GELU(), nn.Linear(64, 10)).eval()


def test_quantize_dynamic_swaps_linear_layers_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 2))
    qmodel = quantize_dynamic(model, exclude=["4"])
    assert [type(m).__name__ for m in qmodel] == ["Conv2d", "Flatten", "DynamicQuantLinear", "ReLU", "Linear"]
    assert type(model[2]) is nn.Linear  # the input model is untouched
    layer = qmodel[2]
    assert layer.weight_bits == 7 and quantize_dynamic(model, "x86_vnni")[2].weight_bits == 8
    assert quantize_dynamic(model, weight_bits=4)[2].weight_int8().abs().max() <= 7
    codes = layer.weight_int8()
    assert codes.dtype == torch.int8 and codes.abs().max() == 63  # 7-bit narrow range: the largest weight maps to 63
    assert torch.allclose(codes.float() * layer.weight_scale[:, None], layer.quantized_weight())


def test_errors():
    with pytest.raises(ValueError, match="the DPU runs fixed-point activations only"):
        quantize_dynamic(_mlp(), "dpu")
    expected = r"no float nn.Linear layer in Sequential outside exclude=\['\*'\]"
    with pytest.raises(NothingToQuantizeError, match=expected):
        quantize_dynamic(_mlp(), exclude=["*"])
    with pytest.raises(NothingToQuantizeError, match="quantizes nn.Linear only"):
        quantize_dynamic(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="bits"):
        quantize_dynamic(_mlp(), weight_bits=1)


@pytest.mark.parametrize("shape", [(5, 32), (2, 7, 32)])  # batches and token sequences
@pytest.mark.parametrize("bias", [True, False])
def test_onnx_export_uses_integer_ops_and_matches(tmp_path, shape, bias):
    qmodel = quantize_dynamic(_mlp(bias))
    x = torch.randn(*shape)
    path = export_onnx(qmodel, tmp_path / "mlp.onnx", x)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 2
    assert "MatMul" not in ops and "Gemm" not in ops
    weights = [i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sorted(tuple(w.dims) for w in weights) == [(32, 64), (64, 10)]  # int8, stored (in, out)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, torch.randn(3, *shape[1:]) * 4):  # the batch dimension is dynamic; another range
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            expected = qmodel(batch).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_static_convolutions_with_a_dynamic_head(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
        nn.Linear(32, 4),
    ).eval()  # fmt: skip
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    qmodel = quantize_dynamic(quantize(model, data, exclude=["4", "6"], progress=False))
    assert sum(isinstance(m, DynamicQuantLinear) for m in qmodel.modules()) == 2
    x = torch.randn(2, 3, 8, 8)
    path = export_onnx(qmodel, tmp_path / "mixed.onnx", x)  # verifies against the model (raises on disagreement)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" in ops and ops.count("MatMulInteger") == 2
    scripted = torch.jit.load(str(export_torchscript(qmodel, tmp_path / "mixed.pt", x)))
    with torch.no_grad():
        assert torch.allclose(scripted(x), qmodel(x), atol=1e-5)


def test_torch_ao_call_shape_maps_onto_quantize_dynamic():
    # before: ValueError: target={<class 'torch.nn.modules.linear.Linear'>} ... / unexpected keyword 'dtype'
    model = _mlp()
    qmodel = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    reference = quantize_dynamic(model)
    assert [type(m).__name__ for m in qmodel] == ["DynamicQuantLinear", "GELU", "DynamicQuantLinear"]
    x = torch.randn(4, 32)
    assert torch.equal(qmodel(x), reference(x))  # the same as our own default call
    only_head = quantize_dynamic(model, {"2"}, dtype=torch.qint8)  # a set of names: only those layers
    assert [type(m).__name__ for m in only_head] == ["Linear", "GELU", "DynamicQuantLinear"]
    assert type(quantize_dynamic(model, dtype=torch.qint8)[0]) is DynamicQuantLinear


def test_torch_ao_call_shapes_without_an_equivalent_name_the_call():
    with pytest.raises(ValueError, match=r"quantizes nn.Linear only; LSTM has no dynamic quantization here\. Call "
                                         r"quantize_dynamic\(model\)"):  # fmt: skip
        quantize_dynamic(_mlp(), {nn.Linear, nn.LSTM}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"dtype=torch.float16: .*call quantize_dynamic\(model\).*model\.half\(\)"):
        quantize_dynamic(_mlp(), {nn.Linear}, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"dtype=torch.quint8: .*torch.qint8 is the only dtype"):
        quantize_dynamic(_mlp(), dtype=torch.quint8)
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    with pytest.raises(TypeError, match=r"torch.ao's per-type qconfig.*call quantize_dynamic\(model, 'x86'\)"):
        quantize_dynamic(_mlp(), {nn.Linear: qconfig})
    with pytest.raises(TypeError, match=r"qconfig_spec entries are module types or layer names, got 3"):
        quantize_dynamic(_mlp(), {nn.Linear, 3})
    with pytest.raises(NothingToQuantizeError, match=r"at or under \['head'\]"):
        quantize_dynamic(_mlp(), {"head"})


def test_exclude_accepts_module_types():
    # before: TypeError: object of type 'type' has no len() (fnmatch on a class)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(NothingToQuantizeError, match=r"outside exclude=\[<class 'torch\.nn\.modules\.linear\.Linear'>"):
        quantize_dynamic(model, exclude=[nn.Linear])
    assert type(quantize_dynamic(model, exclude=[nn.Conv2d])[2]) is DynamicQuantLinear  # a type that matches none
    with pytest.raises(TypeError, match=r"got an instance of Linear \(pass the type, exclude=\[Linear\]\)"):
        quantize_dynamic(model, exclude=[model[0]])
