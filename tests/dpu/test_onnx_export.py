"""DPU-scheme models to ONNX QDQ (the Vitis AI ONNX / Ryzen AI flows): power-of-two scales, int8, zero point 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_quant import export_onnx
from tests.dpu.models import reference_dir

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


def _qdq_params(model) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(op, scale, zero point) of every Q/DQ node, scales and zero points from initializers or Constant nodes."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    rows = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            rows.append((node.op_type, values[node.input[1]], zero_point))
    return rows


def _is_power_of_two(scale: np.ndarray) -> bool:
    return all(float(s) > 0 and math.log2(float(s)).is_integer() for s in np.ravel(scale))


def test_lenet_exports_like_vitis_ai_onnx(tmp_path, lenet_export):
    qmodel, _ = lenet_export
    x = torch.zeros(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="round half up .*QuantizeLinear rounds exact ties half to even"):
        path = export_onnx(qmodel, tmp_path / "lenet_dpu.onnx", x)  # the verification gate runs on export
    ours = onnx.load(str(path))
    theirs = onnx.load(str(reference_dir() / "LeNet_int.onnx"))
    for model in (ours, theirs):  # both: every scale 2^-fp, every zero point int8 0
        params = _qdq_params(model)
        assert params and all(_is_power_of_two(s) for _, s, _ in params)
        assert all(z is None or (z.dtype == np.int8 and not z.any()) for _, _, z in params)
    # the fc weights: our int8 codes and scale give the values Vitis AI's file quantizes them to (2^-8 grid)
    int8 = [numpy_helper.to_array(i) for i in ours.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    weights = {i: w for i, w in enumerate(int8) if w.ndim >= 2}  # zero points are int8 too
    assert sorted(w.shape for w in weights.values()) == sorted([(6, 3, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120),
                                                                 (10, 84)])  # fmt: skip
    fc3 = next(w for w in weights.values() if w.shape == (10, 84))
    expected = np.clip(np.round(qmodel.fc3.weight.detach().numpy() * 2**8), -128, 127)
    assert np.array_equal(fc3, expected.astype(np.int8))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(16, 3, 32, 32, generator=g)
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        want = qmodel(batch).numpy()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()  # ties one code apart at most, not a different model


@pytest.mark.parametrize("pool", ["global", "window"])
def test_dpu_average_pooling_exports_its_multiply(tmp_path, pool):
    """Before: torch.onnx dropped avg_pool2d's divisor_override, so the file divided by the window twice."""
    from torch import nn

    from lightning_quant import quantize

    torch.manual_seed(0)
    pooling = nn.AdaptiveAvgPool2d(1) if pool == "global" else nn.AvgPool2d(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), pooling, nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 3, 8, 8))
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    qmodel = quantize(model.eval(), data, target="dpu", progress=False)
    x = torch.randn(16, 3, 8, 8)
    with pytest.warns(UserWarning, match="round half up"):
        path = export_onnx(qmodel, tmp_path / "pool.onnx", x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = qmodel(x).numpy()
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
