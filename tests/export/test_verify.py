"""verify_export: the report, and the failure path on a tampered artefact (directly and through the export flag)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lightning_quant.export.onnx as onnx_export
import lightning_quant.export.torchscript as ts_export
from lightning_quant import ExportVerificationError, export_onnx, export_torchscript, verify_export
from lightning_quant.export.deploy import deploy_model
from tests.export.utils import export_float_onnx, export_float_torchscript, initializers

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def _tamper_scale(proto: onnx.ModelProto, name: str = "fc.weight_scale") -> None:
    """Scale each output channel of a weight by a different factor (0.05x .. 20x): the argmax moves."""
    init = initializers(proto)[name]
    scale = numpy_helper.to_array(init)
    factors = np.geomspace(0.05, 20.0, scale.size)[::-1].astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(scale * factors, name))


def _labelled(batches):
    return [(x, torch.arange(x.shape[0]) % 10) for x in batches]


def test_report_has_diffs_agreement_accuracy_latency_and_sizes(tiny_exports, tiny_float, eval_batches, tmp_path):
    x86 = tiny_exports["x86"]
    float_path = export_float_onnx(tiny_float, tmp_path / "float.onnx", eval_batches[0][:1])
    report = verify_export(x86.qmodel, x86.path, _labelled(eval_batches), float_path=float_path, latency_runs=5)
    assert report.num_samples == 64
    assert report.max_abs_diff >= report.mean_abs_diff >= 0 and report.max_diff_steps is not None
    assert report.top1_agreement == 1.0
    assert report.artifact_accuracy is not None and report.artifact_accuracy == report.model_accuracy
    assert report.latency_ms > 0 and report.float_latency_ms > 0
    assert report.file_bytes == x86.path.stat().st_size
    assert report.float_file_bytes == float_path.stat().st_size
    assert json.loads(report.to_json())["top1_agreement"] == 1.0
    assert "top-1 agreement" in report.to_table() and "100.00%" in report.to_table()


def test_report_for_torchscript_against_float_torchscript(tiny_torchscript, tiny_float, eval_batches, tmp_path):
    float_path = export_float_torchscript(tiny_float, tmp_path / "float.pt", eval_batches[0][:1])
    report = verify_export(
        tiny_torchscript.qmodel, tiny_torchscript.path, eval_batches, float_path=float_path, latency_runs=3
    )
    assert report.max_abs_diff < 1e-5 and report.top1_agreement == 1.0
    assert report.latency_ms > 0 and report.float_latency_ms > 0 and report.float_file_bytes > 0


def test_tampered_onnx_scale_fails_verification(tiny_exports, eval_batches, tmp_path):
    x86 = tiny_exports["x86"]
    proto = onnx.load(str(x86.path))
    _tamper_scale(proto)
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    expected = r"top-1 agreement with the fake-quant model on \d+ samples is .*< 99\.00%"
    with pytest.raises(ExportVerificationError, match=expected):
        verify_export(x86.qmodel, tampered, eval_batches, latency_runs=0)


def test_small_drift_fails_the_max_diff_gate(tiny_exports, eval_batches, tmp_path):
    x86 = tiny_exports["x86"]
    proto = onnx.load(str(x86.path))
    init = initializers(proto)["conv1.weight_scale"]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
    drifted = tmp_path / "drifted.onnx"
    onnx.save(proto, str(drifted))
    kwargs = dict(latency_runs=0, min_top1_agreement=0.0)
    with pytest.raises(ExportVerificationError, match=r"max difference is .* output quantization steps \(> 1"):
        verify_export(x86.qmodel, drifted, eval_batches, max_diff_steps=1, **kwargs)
    assert verify_export(x86.qmodel, drifted, eval_batches, **kwargs).max_diff_steps > 1  # no gate: report only


def test_export_onnx_verify_flag_raises_and_keeps_earlier_file(tiny_exports, eval_batches, tmp_path, monkeypatch):
    x86 = tiny_exports["x86"]
    target = tmp_path / "model.onnx"
    target.write_bytes(b"earlier artefact")
    original = onnx_export.strip_metadata

    def strip_then_tamper(proto):
        original(proto)
        _tamper_scale(proto)

    monkeypatch.setattr(onnx_export, "strip_metadata", strip_then_tamper)
    with pytest.raises(ExportVerificationError, match="top-1 agreement"):
        export_onnx(x86.qmodel, target, eval_batches[0])
    assert target.read_bytes() == b"earlier artefact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    export_onnx(x86.qmodel, target, eval_batches[0], verify=False)  # the flag off: written without the gate
    assert target.stat().st_size > 1000


def test_export_torchscript_verify_flag_raises(tiny_exports, eval_batches, tmp_path, monkeypatch):
    def tampered_deploy(qmodel, **kwargs):
        deployed = deploy_model(qmodel, **kwargs)
        deployed.fc.weight_scale.mul_(torch.from_numpy(np.geomspace(0.05, 20.0, 10)[::-1].astype(np.float32)))
        return deployed

    monkeypatch.setattr(ts_export, "deploy_model", tampered_deploy)
    with pytest.raises(ExportVerificationError, match="top-1 agreement"):
        export_torchscript(tiny_exports["x86"].qmodel, tmp_path / "model.pt", eval_batches[0])
    assert not list(tmp_path.iterdir())


def test_empty_data_and_unknown_file_type(tiny_exports, tmp_path):
    x86 = tiny_exports["x86"]
    with pytest.raises(ValueError, match="verification data is empty"):
        verify_export(x86.qmodel, x86.path, [], latency_runs=0)
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot verify .*use a \.onnx, \.pt"):
        verify_export(x86.qmodel, other, [torch.randn(1, 3, 16, 16)])


def test_near_tie_flips_are_excused_decisive_flips_are_not():
    from lightning_quant.export.verify import _Tally

    expected = np.array([[1.0, 0.99, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.0, 0.49]], dtype=np.float32)
    got = expected.copy()
    got[0] = [0.99, 1.0, 0.0]  # flip between classes the model keeps 0.01 apart: a near tie at step 0.01, tie 4 steps
    got[2] = [0.0, 0.0, 3.0]  # flip between classes 2.0 apart: decisive
    tally = _Tally()
    tally.add(expected, got, None, tie=4 * 0.01)
    assert (tally.agree, tally.near_ties, tally.total) == (2, 1, 4)
    strict = _Tally()
    strict.add(expected, got, None, tie=0.0)
    assert strict.near_ties == 0


def test_tolerant_agreement_and_negative_tie_steps(tiny_exports, eval_batches):
    x86 = tiny_exports["x86"]
    report = verify_export(x86.qmodel, x86.path, eval_batches[:1], latency_runs=0)
    assert report.near_tie_flips is not None and report.tolerant_agreement >= report.top1_agreement
    assert "near-tie flips" in report.to_table()
    with pytest.raises(ValueError, match="tie_steps=-1 must be >= 0"):
        verify_export(x86.qmodel, x86.path, eval_batches[:1], latency_runs=0, tie_steps=-1)


def _poisoned_runner(monkeypatch, value: float) -> None:
    """The artefact's runtime gives ``value`` for logit 3 of every sample (an exporter or kernel bug)."""
    import lightning_quant.export.verify as verify

    real = verify.load_runner

    def load(path, *args, **kwargs):
        run = real(path, *args, **kwargs)

        def poisoned(inputs):
            out = np.array(run(inputs), copy=True)
            out[:, 3] = value
            return out

        return poisoned

    monkeypatch.setattr(verify, "load_runner", load)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_outputs_of_the_artefact_fail_verification(tiny_exports, eval_batches, monkeypatch, value):
    # before: max() dropped the NaN differences and, with the agreement gate off, the NaN artefact passed
    x86 = tiny_exports["x86"]
    _poisoned_runner(monkeypatch, value)
    with pytest.raises(
        ExportVerificationError,
        match=r"tiny_x86\.onnx: NaN/inf outputs on the 64 verification sample\(s\): 64 value\(s\) from the "
        r"artefact, 0 from the fake-quant model; a non-finite output never counts as agreeing",
    ):
        verify_export(x86.qmodel, x86.path, eval_batches, latency_runs=0, min_top1_agreement=0.0, max_diff_steps=1e6)


def test_nan_outputs_of_the_model_fail_verification(tiny_exports, eval_batches, monkeypatch):
    x86 = tiny_exports["x86"]
    _poisoned_runner(monkeypatch, float("nan"))
    model = copy.deepcopy(x86.qmodel)
    model.register_forward_hook(lambda module, args, out: out.index_fill(1, torch.tensor([3]), float("nan")))
    with pytest.raises(ExportVerificationError, match=r"64 value\(s\) from the artefact, 64 from the fake-quant"):
        verify_export(model, x86.path, eval_batches, latency_runs=0, min_top1_agreement=0.0)


def test_finite_outputs_report_no_nonfinite_values(tiny_exports, eval_batches):
    x86 = tiny_exports["x86"]
    report = verify_export(x86.qmodel, x86.path, eval_batches, latency_runs=0)
    assert report.nonfinite_outputs == report.model_nonfinite_outputs == 0 and np.isfinite(report.max_abs_diff)
