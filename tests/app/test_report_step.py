"""Run report: model sizes by hand, Markdown content, the SQNR plot, atomic JSON/Markdown writes."""

from __future__ import annotations

import json

import torch
from torch import nn

from lightning_quant import quantize, scheme_for_target
from lightning_quant.app.report_step import model_sizes, report_markdown, write_run_report
from lightning_quant.report import quantization_report
from tests.helpers.models import TinyConvBN, warm_bn


def _qmodel(target: str = "x86_vnni", **overrides):
    torch.manual_seed(0)
    scheme = scheme_for_target(target, **overrides)
    return quantize(warm_bn(TinyConvBN()), [torch.randn(8, 3, 16, 16)], scheme=scheme, progress=False)


def test_model_sizes_by_hand():
    float_net = warm_bn(TinyConvBN())
    float_bytes = sum(p.numel() for p in float_net.parameters()) * 4
    for bits in (8, 4):
        sizes = model_sizes(_qmodel(weight_bits=bits))
        # BN folded into the convs (which gain a bias): conv1 216 + 8 bias, conv2 576 + 8, fc 80 + 10
        weights, biases, scales = 216 + 576 + 80, 8 + 8 + 10, 8 + 8 + 10
        assert (
            sizes["quantized_bytes"]
            == (216 * bits + 7) // 8 + (576 * bits + 7) // 8 + (80 * bits + 7) // 8 + (biases + scales) * 4
        )
        assert sizes["float_bytes"] == (weights + biases) * 4
    assert float_bytes == (216 + 16 + 576 + 16 + 80 + 10) * 4  # the unfolded float net, BN affine included


def test_model_sizes_count_qat_conv_bn_weights_as_quantized():
    """A QAT model keeps conv+BN unfolded (the weight lives in ``.conv``): it must still count as 8-bit."""
    from lightning_quant import prepare

    torch.manual_seed(0)
    qat = prepare(warm_bn(TinyConvBN()).train(), scheme_for_target("x86_vnni", mode="qat"), mode="qat")
    assert any(type(m).__name__ == "QuantConvBn" for m in qat.modules())
    sizes = model_sizes(qat)
    ptq = model_sizes(_qmodel())
    assert sizes["quantized_bytes"] < sizes["float_bytes"] / 2
    assert sizes["float_bytes"] - sizes["quantized_bytes"] >= ptq["float_bytes"] - ptq["quantized_bytes"] - 16 * 4


def test_markdown_and_plot(tmp_path):
    qmodel = _qmodel()
    report = quantization_report(qmodel, torch.randn(4, 3, 16, 16))
    metrics = {"name": "tiny", "mode": "ptq", "target": "x86_vnni", "float_top1": 90.0, "float_top5": 99.0,
               "int8_top1": 89.0, "int8_top5": 99.0, "sizes": model_sizes(qmodel), "calibration_seconds": 0.5,
               "calibration_batches": 1, "batch_size": 8}  # fmt: skip
    text = report_markdown(metrics, report, "sqnr.png")
    assert (
        "| delta (points) | -1.00 |" in text and "| conv1 | Conv2d |" in text and "![per-layer SQNR](sqnr.png)" in text
    )
    paths = write_run_report(tmp_path, metrics, report)
    assert (tmp_path / "sqnr.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "report.json").read_text())
    assert [row["name"] for row in data["layers"]] == ["conv1", "conv2", "fc"]
    assert sorted(paths) == ["json", "markdown", "plot"]
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_float_only_run_has_no_plot(tmp_path):
    paths = write_run_report(tmp_path, {"name": "f", "mode": "float", "target": "x86", "float_top1": 70.0}, None)
    assert sorted(paths) == ["json", "markdown"] and not (tmp_path / "sqnr.png").exists()
    assert "| float | 70.00 | - |" in (tmp_path / "report.md").read_text()


def test_plain_float_model_has_equal_sizes():
    net = nn.Sequential(nn.Linear(4, 2))
    assert model_sizes(net) == {"float_bytes": 40, "quantized_bytes": 40}


def test_accuracy_control_line_keeps_its_case_in_markdown():
    control = {"kept_float": ["Layer1.Conv"], "quantized_layers": 20, "metric_float": 90.0, "metric_final": 88.0,
               "max_accuracy_drop": 0.5, "met": False}  # fmt: skip
    text = report_markdown({"name": "r", "mode": "ptq", "target": "x86", "accuracy_control": control}, None)
    assert "Accuracy control: 1 of 20 layers kept in float (Layer1.Conv); " in text
    assert "bound 0.5 points: NOT met." in text
