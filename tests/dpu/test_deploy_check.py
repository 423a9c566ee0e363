"""The per-layer dump ("deploy_check"): our XModel and its fake-quant model agree op by op, a corrupted weight or a
moved fix position is named as the first difference, and Vitis AI's own LeNet_int.xmodel dumps every op."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lightning_quant import export_xmodel, quantize
from lightning_quant.export import deploy_check
from lightning_quant.export.deploy_check import (
    DeployCheckError,
    compare_dumps,
    dump_fake_quant,
    dump_xmodel,
    read_dump,
)
from lightning_quant.export.xmodel_interpreter import load_xmodel
from tests.dpu.conftest import _quantized
from tests.dpu.models import reference_dir


def _input(shape, seed=3) -> torch.Tensor:
    return torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Conv-BN residual net, its XModel and the fake-quant dump of one input."""
    qmodel, shape = _quantized("tiny")
    folder = tmp_path_factory.mktemp("deploy_check_tiny")
    x = _input(shape)
    path = export_xmodel(qmodel, folder / "tiny.xmodel", x)
    return qmodel, x, path, dump_fake_quant(qmodel, x, folder / "fake_quant")


def _rewrite(path, out, edit):
    """A copy of the XModel at ``path`` written to ``out`` after ``edit(ops by name)``."""
    graph = load_xmodel(path)
    edit({op.name: op for op in graph.op_node})
    out.write_bytes(graph.SerializeToString())
    return out


def test_dumps_of_an_export_agree_op_by_op(exported, tmp_path):
    name, qmodel, shape, path = exported
    x = _input(shape)
    report = compare_dumps(
        dump_fake_quant(qmodel, x, tmp_path / "fq"), dump_xmodel(path, x, tmp_path / "xm"), tolerance=0
    )
    graph = load_xmodel(path)
    fixes = [op.name for op in graph.op_node if op.type == "fix"]
    assert report.ok, f"{name}:\n{report}"
    assert [op.name for op in report.ops] == fixes  # graph order, every fix op of the XModel
    assert all(op.status == "equal" for op in report.ops)
    assert not report.only_fake_quant and not report.only_xmodel
    assert len(report.not_compared) == len(graph.op_node) - len(fixes)
    assert report.first_difference is None and "agree" in report.summary()


def test_dump_files_follow_the_vitis_layout(tiny, tmp_path):
    qmodel, x, path, fq = tiny
    dump = read_dump(fq)
    graph = dump.graph
    assert dump.side == "fake_quant" and sorted(p.name for p in fq.iterdir()) == [graph, "dump.json", "dump.npz"]
    files = sorted(p.name for p in (fq / graph).iterdir())
    assert files == sorted([f"{name}.bin" for name in dump.order] + ["shape.txt"])
    for name in dump.order:  # raw int8 codes, flattened in the XIR layout (NHWC / OHWI)
        codes = np.fromfile(fq / graph / f"{name}.bin", dtype=np.int8)
        assert np.array_equal(codes, dump.tensors[name].reshape(-1)) and name.endswith("_fix")
    first = (fq / graph / "shape.txt").read_text().splitlines()[0]
    assert first == f"[1, 16, 16, 3]: {dump.order[0]}"  # the network input, NHWC
    assert set(json.loads((fq / "dump.json").read_text())["fix_pos"]) == set(dump.order)

    text = dump_xmodel(path, x, tmp_path / "xm_txt", data_format="txt")
    xm = read_dump(text)
    conv = next(n for n in xm.order if n not in xm.fix_pos and xm.tensors[n].ndim == 4 and n != xm.order[0])
    values = np.loadtxt(text / xm.graph / f"{conv}.txt")
    assert np.allclose(values, xm.tensors[conv].reshape(-1), rtol=1e-5, atol=1e-6)  # float ops: float32 values
    fix = xm.order[1]
    assert np.array_equal(np.loadtxt(text / xm.graph / f"{fix}.txt"), xm.tensors[fix].reshape(-1))


def test_a_corrupted_weight_code_is_the_first_difference(tiny, tmp_path):
    _, x, path, fq = tiny
    weight = "TinyConvBN__conv2_weight"

    def corrupt(ops):
        op = ops[weight]
        data = np.frombuffer(op.attr["data"].bytes_value.value, "<f4").copy()
        data[5] += 3 * 2.0 ** -ops[f"{weight}_fix"].attr["fix_point"].int32_value  # 3 codes
        op.attr["data"].bytes_value.value = data.tobytes()

    bad = _rewrite(path, tmp_path / "bad.xmodel", corrupt)
    report = compare_dumps(fq, dump_xmodel(bad, x, tmp_path / "xm"))
    assert not report.ok and report.first_difference == f"{weight}_fix"
    op = next(o for o in report.ops if o.name == f"{weight}_fix")
    assert (op.status, op.max_abs_diff, op.num_differing) == ("differs", 3, 1)
    before = [o for o in report.ops[: report.ops.index(op)]]
    assert before and all(o.status == "equal" for o in before)  # the input and conv1 still agree
    assert f"{weight}_fix" in report.summary() and "<- first difference" in str(report)
    assert report.to_dict()["first_difference"] == f"{weight}_fix"
    with pytest.raises(DeployCheckError, match=f"first at {weight}_fix: 1 of .* values differ, by up to 3"):
        report.check()


def test_one_code_passes_the_default_tolerance_but_not_exact(tiny, tmp_path):
    _, x, path, fq = tiny
    bias = "TinyConvBN__fc_bias"

    def nudge(ops):
        op = ops[bias]
        data = np.frombuffer(op.attr["data"].bytes_value.value, "<f4").copy()
        data[0] += 2.0 ** -ops[f"{bias}_fix"].attr["fix_point"].int32_value
        op.attr["data"].bytes_value.value = data.tobytes()

    xm = dump_xmodel(_rewrite(path, tmp_path / "nudged.xmodel", nudge), x, tmp_path / "xm")
    loose = compare_dumps(fq, xm)
    assert next(o for o in loose.ops if o.name == f"{bias}_fix").status == "within tolerance"
    assert compare_dumps(fq, xm, tolerance=0).first_difference == f"{bias}_fix"


def test_a_moved_fix_position_is_the_first_difference(tiny, tmp_path):
    _, x, path, fq = tiny
    graph = load_xmodel(path)
    activation = next(op.name for op in graph.op_node if op.type == "fix" and "relu" in op.name)

    def move(ops):
        ops[activation].attr["fix_point"].int32_value += 1

    report = compare_dumps(fq, dump_xmodel(_rewrite(path, tmp_path / "moved.xmodel", move), x, tmp_path / "xm"))
    assert report.first_difference == activation
    op = next(o for o in report.ops if o.name == activation)
    assert op.status == "fix position differs" and op.fix_pos[1] == op.fix_pos[0] + 1
    assert "fix position" in report.summary()


def test_a_flattened_activation_is_dumped_in_nhwc_order(tmp_path):
    """A quantized activation after a flatten: the XModel holds it in (H, W, C) order, so must the dump."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.ReLU(), nn.Linear(4 * 4 * 4, 3)).eval()
    g = torch.Generator().manual_seed(0)
    qmodel = quantize(model, [torch.randn(4, 3, 6, 6, generator=g) for _ in range(2)], target="dpu", progress=False)
    x = _input((3, 6, 6))
    path = export_xmodel(qmodel, tmp_path / "flat.xmodel", x)
    report = compare_dumps(
        dump_fake_quant(qmodel, x, tmp_path / "fq"), dump_xmodel(path, x, tmp_path / "xm"), tolerance=0
    )
    assert report.ok, str(report)
    assert any(op.shape == (1, 64) for op in report.ops)


def test_ops_in_one_dump_only_are_listed(tiny, tmp_path):
    _, x, path, fq = tiny
    other, shape = _quantized("depthwise")
    xm = dump_xmodel(export_xmodel(other, tmp_path / "dw.xmodel", _input(shape)), _input(shape), tmp_path / "xm")
    report = compare_dumps(fq, xm)
    assert not report.ok and report.only_fake_quant and report.only_xmodel
    assert "only in the fake-quant dump: TinyConvBN__" in str(report)


def test_vitis_lenet_xmodel_dumps_every_op(tmp_path):
    ref = reference_dir()  # skips, saying why, when the shared reference folder is absent
    graph = load_xmodel(ref / "LeNet_int.xmodel")
    out = dump_xmodel(ref / "LeNet_int.xmodel", _input((3, 32, 32)).numpy(), tmp_path / "vitis")
    dump = read_dump(out)
    assert len(dump.order) == len(graph.op_node) == 44 and dump.order == [op.name for op in graph.op_node]
    fixes = [op.name for op in graph.op_node if op.type == "fix"]
    assert sorted(dump.fix_pos) == sorted(fixes) and all(dump.tensors[n].dtype == np.int8 for n in fixes)
    assert dump.fix_pos["LeNet__input_0_fix"] == 6  # Vitis AI's input position
    assert len(list((out / "LeNet").glob("*.bin"))) == 44
    assert (out / "LeNet" / "LeNet__LeNet_ret_5_fix.bin").stat().st_size == 28 * 28 * 6  # int8, NHWC


def test_a_failed_dump_keeps_the_earlier_one(tiny, tmp_path, monkeypatch):
    qmodel, x, path, _ = tiny
    out = dump_xmodel(path, x, tmp_path / "xm")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deploy_check.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        dump_fake_quant(qmodel, x, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xm"]  # no partial folder left beside it


def test_bad_destinations_and_arguments(tiny, tmp_path):
    qmodel, x, path, fq = tiny
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files and no earlier dump"):
        dump_xmodel(path, x, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; a dump is a folder"):
        dump_fake_quant(qmodel, x, tmp_path / "file")
    with pytest.raises(ValueError, match="data_format='npy' is not allowed; use one of bin, txt"):
        dump_xmodel(path, x, tmp_path / "a", data_format="npy")
    with pytest.raises(FileNotFoundError, match="no XModel at"):
        dump_xmodel(tmp_path / "missing.xmodel", x, tmp_path / "b")
    with pytest.raises(ValueError, match="the graph has 1 input"):
        dump_xmodel(path, (x, x), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="holds no dump .*dump_xmodel"):
        compare_dumps(fq, tmp_path)
    with pytest.raises(ValueError, match="tolerance=-1 must be a whole number of codes"):
        compare_dumps(fq, fq, tolerance=-1)
    with pytest.raises(ValueError, match="not quantized with|not a DPU quantizer"):
        dump_fake_quant(quantize(nn.Sequential(nn.Linear(4, 2)).eval(), [torch.randn(4, 4)], progress=False),
                        torch.randn(1, 4), tmp_path / "d")  # fmt: skip


def test_our_lenet_against_vitis_lenet_parameter_by_parameter(lenet_export, tmp_path):
    """Our dump of the reference LeNet against a dump of Vitis AI's own XModel: the parameter ops (named alike on
    both sides) show what docs/dpu.md's table says: fc weights bit-exact, biases within one code, conv weights
    apart (Vitis AI equalizes conv1/conv2)."""
    qmodel, _ = lenet_export
    x = _input((3, 32, 32))
    fq = dump_fake_quant(qmodel, x, tmp_path / "fq")
    report = compare_dumps(fq, dump_xmodel(reference_dir() / "LeNet_int.xmodel", x, tmp_path / "vitis"))
    ops = {op.name: op for op in report.ops}
    assert len(ops) == 10  # 5 weights + 5 biases; activations are named after different fx/torch nodes
    for layer in ("fc1", "fc2", "fc3"):
        assert ops[f"LeNet__{layer}_weight_fix"].status == "equal"
    differing = {name: (op.num_differing, op.max_abs_diff) for name, op in ops.items() if name.endswith("bias_fix")}
    assert differing["LeNet__fc1_bias_fix"] == (40, 1) and differing["LeNet__fc2_bias_fix"] == (27, 1)
    assert differing["LeNet__fc3_bias_fix"] == (3, 1) and differing["LeNet__conv2_bias_fix"] == (3, 1)
    assert ops["LeNet__conv2_weight_fix"].num_differing == 1652 and ops["LeNet__conv2_weight_fix"].max_abs_diff == 25
    assert ops["LeNet__conv1_weight_fix"].status == "fix position differs"  # 9 here, 8 in Vitis AI (CLE)
    assert report.first_difference == "LeNet__conv2_weight_fix" and not report.ok
    assert "LeNet__input_0_fix" in report.only_xmodel and "LeNet__x_fix" in report.only_fake_quant
