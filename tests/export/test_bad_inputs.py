"""Every validation branch of the exporters, with the message that names the fix. No file is written."""

from __future__ import annotations

import pytest
import torch

from lightning_quant import NotCalibratedError, export_onnx, export_torchscript, export_xmodel, prepare, quantize
from lightning_quant.config import scheme_for_target
from tests.helpers.models import TinyConvBN, warm_bn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def x86_qmodel(tiny_exports):
    return tiny_exports["x86"].qmodel


@pytest.fixture(scope="module")
def dpu_qmodel(tiny_float, calib_batches):
    return quantize(tiny_float, calib_batches, target="dpu", progress=False)


def _model_for(exporter, x86_qmodel, dpu_qmodel):
    """export_xmodel takes DPU models only; the other exporters the x86 one."""
    return dpu_qmodel if exporter is export_xmodel else x86_qmodel


@pytest.mark.parametrize(
    ("exporter", "name"), [(export_onnx, "m.onnx"), (export_torchscript, "m.pt"), (export_xmodel, "m.xmodel")]
)
def test_export_before_calibration_raises(exporter, name, tmp_path):
    qmodel = prepare(warm_bn(TinyConvBN()), scheme_for_target("dpu" if exporter is export_xmodel else "x86"))
    with pytest.raises(NotCalibratedError, match="calibrat"):
        exporter(qmodel, tmp_path / name, X)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exporter", [export_onnx, export_torchscript, export_xmodel])
def test_directory_path_raises(exporter, x86_qmodel, dpu_qmodel, tmp_path):
    with pytest.raises(ValueError, match=r"is a directory; pass a file path such as"):
        exporter(_model_for(exporter, x86_qmodel, dpu_qmodel), tmp_path, X)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("exporter", "name", "expected"),
    [
        (export_onnx, "model.pt", r"should end with \.onnx"),
        (export_torchscript, "model.onnx", r"should end with \.pt"),
        (export_xmodel, "model.onnx", r"should end with \.xmodel"),
    ],
)
def test_wrong_suffix_raises(exporter, name, expected, x86_qmodel, dpu_qmodel, tmp_path):
    with pytest.raises(ValueError, match=expected):
        exporter(_model_for(exporter, x86_qmodel, dpu_qmodel), tmp_path / name, X)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("opset", "expected"),
    [(12, r"opset=12: per-channel QDQ needs opset >= 13"), (17, r"opset=17: .*opset 18 or newer")],
)
def test_opset_too_old_raises(opset, expected, x86_qmodel, tmp_path):
    with pytest.raises(ValueError, match=expected):
        export_onnx(x86_qmodel, tmp_path / "m.onnx", X, opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_newer_opset_is_written(x86_qmodel, tmp_path):
    import onnx

    path = export_onnx(x86_qmodel, tmp_path / "m.onnx", X, opset=21)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 21


def test_four_bit_activations_to_onnx_names_torchscript(calib_batches, tmp_path):
    qmodel = quantize(
        warm_bn(TinyConvBN()), calib_batches[:2], scheme=scheme_for_target("x86", activation_bits=4), progress=False
    )
    with pytest.raises(ValueError, match=r"is 4-bit; ONNX QuantizeLinear supports 8-bit .*export TorchScript"):
        export_onnx(qmodel, tmp_path / "m.onnx", X)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weight_bits", [4, 6])
def test_low_bit_weights_export_as_int8_codes(weight_bits, calib_batches, tmp_path):
    import onnx
    from onnx import numpy_helper

    qmodel = quantize(
        warm_bn(TinyConvBN()),
        calib_batches[:2],
        scheme=scheme_for_target("x86", weight_bits=weight_bits),
        progress=False,
    )
    path = export_onnx(qmodel, tmp_path / "m.onnx", X)  # verified against the fake-quant model on export
    limit = 2 ** (weight_bits - 1) - 1
    codes = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name.endswith("weight_int8")]
    assert len(codes) == 3 and all(c.dtype.name == "int8" and abs(c).max() <= limit for c in codes)


def test_half_up_rounding_without_power_of_two_scales_to_onnx_raises(calib_batches, tmp_path):
    scheme = scheme_for_target("x86", activation_rounding="half_up")  # float scales: QuantizeLinear cannot follow
    qmodel = quantize(warm_bn(TinyConvBN()), calib_batches[:2], scheme=scheme, progress=False)
    with pytest.raises(ValueError, match=r"rounds half_up, but ONNX QuantizeLinear rounds half to even.*power-of-two"):
        export_onnx(qmodel, tmp_path / "m.onnx", X)
    assert list(tmp_path.iterdir()) == []


def test_dpu_target_to_onnx_warns_about_ties_and_exports(calib_batches, tmp_path):
    qmodel = quantize(warm_bn(TinyConvBN()), calib_batches[:2], target="dpu", progress=False)
    with pytest.warns(UserWarning, match="round half up .*The verification gate measures the agreement"):
        export_onnx(qmodel, tmp_path / "m.onnx", X)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
