"""quantization_report: per-layer SQNR rows, logger metrics, the console table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_quant import QuantReport, quantization_report, quantize
from lightning_quant.calibration import calibrate
from lightning_quant.config import QuantOptions, scheme_for_target
from lightning_quant.quantizers import iter_quantizers, prepare, prepare_info
from lightning_quant.quantizers.functional import sqnr_db
from lightning_quant.quantizers.modules import quantized_layer_from_float
from lightning_quant.report import LayerReport
from tests.helpers.models import TinyConvBN, TwoInputNet, UntraceableNet, warm_bn


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=g) * 2 + 0.5 for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


@pytest.fixture(scope="module")
def batch():
    return _images(1, seed=11)[0]


def _quantize(model, weight_bits: int = 8, **kw):
    return quantize(
        model, _images(3, seed=1), scheme=scheme_for_target("x86", weight_bits=weight_bits), progress=False, **kw
    )


def test_rows_per_quantized_layer(tiny, batch):
    qmodel = _quantize(tiny)
    report = quantization_report(qmodel, batch)
    assert [r.name for r in report.rows] == prepare_info(qmodel).quantized_layers == ["conv1", "conv2", "fc"]
    assert [r.kind for r in report.rows] == ["Conv2d", "Conv2d", "Linear"]
    for row in report.rows:
        assert math.isfinite(row.sqnr_db) and row.sqnr_db > 15
        scale = qmodel.get_submodule(row.name).weight_fake_quant.scale
        assert (row.weight_scale_min, row.weight_scale_max) == (scale.min().item(), scale.max().item())
        assert row.weight_scale_min < row.weight_scale_max  # per-channel scales differ
    assert set(report.activations) == {n for n, _ in iter_quantizers(qmodel) if not n.endswith("weight_fake_quant")}
    assert set(report.activations["activation_quantizers.x"]) == {
        "scale_min",
        "scale_max",
        "zero_point",
        "range_min",
        "range_max",
    }
    # output SQNR: quantized model against the float model (BN folding changes nothing measurable)
    with torch.no_grad():
        expected = sqnr_db(tiny(batch), qmodel(batch))
    assert report.output_sqnr_db == pytest.approx(expected, abs=0.05)


def test_eight_bit_weights_beat_four_bit(tiny, batch):
    r8 = quantization_report(_quantize(tiny, 8), batch)
    r4 = quantization_report(_quantize(tiny, 4), batch)
    for a, b in zip(r8.rows, r4.rows, strict=True):
        assert a.name == b.name
        assert a.sqnr_db > b.sqnr_db + 6, a.name
        assert b.weight_scale_max > 8 * a.weight_scale_max
    assert r8.output_sqnr_db > r4.output_sqnr_db


def test_metrics_keys_and_values(tiny, batch):
    report = quantization_report(_quantize(tiny), batch)
    metrics = report.metrics()
    assert set(metrics) == {
        "quant/output_sqnr_db",
        "quant/output_sqnr_median_db",
        "quant/min_layer_sqnr_db",
        "quant/sqnr_db/conv1",
        "quant/sqnr_db/conv2",
        "quant/sqnr_db/fc",
        "quant/float_layers",
    }
    assert metrics["quant/min_layer_sqnr_db"] == min(r.sqnr_db for r in report.rows) == report.min_sqnr()
    assert metrics["quant/float_layers"] == 0.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert set(report.metrics(prefix="val/q")) == {k.replace("quant/", "val/q/", 1) for k in metrics}


def test_metrics_drop_non_finite_values():
    report = QuantReport(
        rows=[LayerReport("a", "Conv2d", float("inf"), 0.1, 0.2), LayerReport("b", "Linear", 30.0, 0.1, 0.2)],
        activations={},
        float_layers={"x": "why"},
        untraced={},
        output_sqnr_db=float("nan"),
    )
    assert report.metrics() == {"quant/min_layer_sqnr_db": 30.0, "quant/sqnr_db/b": 30.0, "quant/float_layers": 1.0}
    assert math.isnan(QuantReport([], {}, {}, {}, 0.0).min_sqnr())


def test_report_restores_switches_and_mode(tiny, batch):
    qmodel = _quantize(tiny).train()
    fq = qmodel.get_submodule("activation_quantizers.relu")
    fq.disable_fake_quant()
    fq.enable_observer()
    scale = fq.scale.clone()
    quantization_report(qmodel, batch)
    assert qmodel.training
    assert fq.fake_quant_enabled.item() == 0 and fq.observer_enabled.item() == 1
    assert torch.equal(fq.scale, scale)  # the report's own forward passes do not observe
    others = [q for n, q in iter_quantizers(qmodel) if q is not fq]
    assert all(q.fake_quant_enabled.item() == 1 and q.observer_enabled.item() == 0 for q in others)


def test_report_on_qat_model_and_tuple_inputs(batch):
    torch.manual_seed(0)
    qat = prepare(warm_bn(TinyConvBN()), scheme_for_target("x86", mode="qat"), mode="qat")
    calibrate(qat, _images(2, seed=3), progress=False)
    report = quantization_report(qat, batch)
    assert [r.kind for r in report.rows] == ["Conv2d+BN", "Conv2d+BN", "Linear"]
    two = TwoInputNet().eval()
    g = torch.Generator().manual_seed(4)
    inputs = (torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g))
    qtwo = quantize(two, [inputs] * 2, transform_fn=lambda b: b, progress=False)
    report = quantization_report(qtwo, inputs)
    assert [r.name for r in report.rows] == ["a", "b", "head"]
    assert math.isfinite(report.output_sqnr_db)


def test_table_lists_untraced_module_level_and_float_layers():
    torch.manual_seed(0)
    model = warm_bn(UntraceableNet())
    qmodel = quantize(model, _images(3, seed=5), exclude=["head.2"], progress=False)
    report = quantization_report(qmodel, _images(1, seed=6)[0])
    assert [r.name for r in report.rows] == ["stem.0", "block.conv"]
    table = report.to_table()
    assert str(report) == table
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "SQNR"]
    assert any(line.startswith("stem.0 ") and "Conv2d" in line for line in lines)
    assert "model output SQNR" in table and "2 layers quantized" in table
    assert "not captured as a graph" in table
    assert any(line.strip().startswith("<model>: data-dependent Python control flow") for line in lines)
    assert any(line.strip().startswith("block: data-dependent Python control flow") for line in lines)
    assert (
        "kept in float:" in table
        and "  head.2: excluded (exclude=...: a user pattern or an accuracy-control choice)" in lines
    )
    assert "quantized on their own (graph capture failed around them): block.conv" in lines
    assert report.metrics()["quant/float_layers"] == 1.0


def test_report_without_prepare_info(batch):
    """Quantized layers assembled by hand (no prepare()): rows still work, no float/untraced sections."""
    torch.manual_seed(0)
    layer = quantized_layer_from_float(nn.Conv2d(3, 4, 3), scheme_for_target("x86"), "0", quantize_input=True)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    calibrate(model, _images(2, seed=7), progress=False)
    report = quantization_report(model, batch)
    assert [r.name for r in report.rows] == ["0"] and math.isfinite(report.rows[0].sqnr_db)
    assert report.float_layers == {} and report.untraced == {} and report.notes == []
    assert set(report.activations) == {"0.input_fake_quant"}
    assert "kept in float" not in report.to_table() and "not captured" not in report.to_table()


def test_median_output_sqnr_is_not_pulled_down_by_one_outlier_sample():
    from lightning_quant.report import _median_sample_sqnr

    ref = torch.ones(5, 4)
    approx = ref + torch.tensor([0.01, 0.01, 0.01, 0.01, 10.0]).view(5, 1)  # four samples at 40 dB, one at -20 dB
    assert _median_sample_sqnr(ref, approx) == pytest.approx(40.0)
    assert sqnr_db(ref, approx) < 0.0  # the pooled value is the outlier's


def test_report_carries_the_median_output_sqnr(tiny):
    qmodel = quantize(tiny, _images(2, 0), progress=False)
    report = quantization_report(qmodel, _images(1, 1)[0])
    assert math.isfinite(report.output_sqnr_median_db)
    assert "median over samples" in report.to_table()
    assert report.metrics()["quant/output_sqnr_median_db"] == report.output_sqnr_median_db


def test_sqnr_reference_is_the_float_model_after_weight_refinements():
    """Bias correction / fast finetune move float weights; the report's reference must not move with them."""
    from lightning_quant.algorithms import correct_bias, fast_finetune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    data = _images(3, seed=1)
    calibrated_only = QuantOptions(bias_correction=False)
    qmodel = quantize(
        model, data, scheme=scheme_for_target("x86", weight_bits=4), options=calibrated_only, progress=False
    )
    correct_bias(qmodel, data, progress=False)
    fast_finetune(qmodel, data, steps=30, progress=False)
    prepare_info(qmodel).refinements += ["bias_correction", "fast_finetune"]  # as refine_calibrated notes them
    x = _images(1, seed=5)[0]
    report = quantization_report(qmodel, x)
    with torch.no_grad():
        true_sqnr = sqnr_db(model(x), qmodel(x))
    assert report.output_sqnr_db == pytest.approx(true_sqnr, abs=1e-3)
    assert any("as before bias correction, fast finetune (recorded for 2 layers)" in n for n in report.notes)


def test_report_says_when_the_float_weights_are_gone():
    from lightning_quant.algorithms import fast_finetune
    from lightning_quant.algorithms.float_reference import recorded_float_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    data = _images(2, seed=1)
    qmodel = quantize(model, data, scheme=scheme_for_target("x86", weight_bits=4), progress=False)
    fast_finetune(qmodel, data, steps=10, progress=False)
    prepare_info(qmodel).refinements.append("fast_finetune")
    recorded_float_parameters(qmodel).clear()  # as after restoring the refined model from a state file
    report = quantization_report(qmodel, data[0])
    assert any("not against the float model" in n for n in report.notes)
