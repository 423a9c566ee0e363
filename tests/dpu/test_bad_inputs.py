"""Every bad input to the DPU path gets an error naming the problem and the fix; failed exports leave no file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_quant import NotCalibratedError, export_xmodel, prepare, quantize, scheme_for_target
from lightning_quant.config import QuantSpec
from lightning_quant.export.xmodel import UnsupportedOpError, quant_info_path_for, read_quant_info
from lightning_quant.quantizers.dpu import DPUFixPosObserver, fix_pos_from_scale
from lightning_quant.quantizers.dpu_pool import avgpool_multiplier, use_dpu_avgpool
from lightning_quant.quantizers.dpu_shifts import check_dpu_shifts, enforce_dpu_shifts
from tests.helpers.models import TinyConvBN, UntraceableNet, warm_bn

X = torch.rand(1, 3, 16, 16) * 2 - 1
DATA = [torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(2)]


class Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def _dpu(model: nn.Module) -> nn.Module:
    return quantize(model.eval(), DATA, target="dpu", progress=False)


def test_non_dpu_model_is_refused(tmp_path):
    q = quantize(warm_bn(TinyConvBN()), DATA, target="x86", progress=False)
    with pytest.raises(ValueError, match=r"is not a DPU quantizer .*quantized for x86.*target='dpu'"):
        export_xmodel(q, tmp_path / "m.xmodel", X)
    with pytest.raises(ValueError, match="not prepared by lightning_quant"):
        export_xmodel(TinyConvBN().eval(), tmp_path / "m.xmodel", X)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_is_named(tmp_path):
    with pytest.raises(UnsupportedOpError, match=r"cannot lower .*sigmoid.*node 'sigmoid'.*Supported: conv2d"):
        export_xmodel(_dpu(Sigmoid()), tmp_path / "m.xmodel", X)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU())
    q = quantize(grouped.eval(), [torch.randn(2, 4, 8, 8)], target="dpu", progress=False)
    with pytest.raises(UnsupportedOpError, match=r"grouped conv \(groups=2"):
        export_xmodel(q, tmp_path / "m.xmodel", torch.randn(1, 4, 8, 8))
    assert list(tmp_path.iterdir()) == []


class Sliced(nn.Module):
    """A conv, then ``index`` applied to its output, then ``pad`` (zero padding unless ``mode`` says otherwise)."""

    def __init__(self, index, pad=(0, 0), mode="constant") -> None:
        super().__init__()
        self.conv, self.index, self.pads, self.mode = nn.Conv2d(3, 4, 3), index, pad, mode

    def forward(self, x):
        return torch.nn.functional.pad(torch.relu(self.conv(x))[self.index], self.pads, mode=self.mode)


@pytest.mark.parametrize(
    ("index", "pad", "mode", "message"),
    [
        ((slice(0, 1),), (0, 0), "constant", "a slice of the batch dimension"),
        ((slice(None), 0), (0, 0), "constant", "not plain slicing"),
        ((slice(None), slice(None), slice(None, None, 2)), (1, 1, 1, 1), "reflect", "not constant zero padding"),
    ],
)
def test_unsupported_slices_and_pads_are_named(index, pad, mode, message, tmp_path):
    with pytest.raises(UnsupportedOpError, match=message):
        export_xmodel(_dpu(Sliced(index, pad, mode)), tmp_path / "m.xmodel", X)
    assert list(tmp_path.iterdir()) == []


def test_untraced_and_uncalibrated_models(tmp_path):
    q = _dpu(UntraceableNet())
    with pytest.raises(ValueError, match="needs a model torch.fx traced whole"):
        export_xmodel(q, tmp_path / "m.xmodel", X)
    with pytest.raises(NotCalibratedError, match="cannot convert"):
        export_xmodel(prepare(TinyConvBN().eval(), scheme_for_target("dpu")), tmp_path / "m.xmodel", X)


def test_failed_export_keeps_the_earlier_files(tmp_path):
    good = _dpu(warm_bn(TinyConvBN()))
    path = export_xmodel(good, tmp_path / "m.xmodel", X)
    before = path.read_bytes(), (tmp_path / "m.quant_info.json").read_text()
    with pytest.raises(UnsupportedOpError):
        export_xmodel(_dpu(Sigmoid()), path, X)
    assert (path.read_bytes(), (tmp_path / "m.quant_info.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.quant_info.json", "m.xmodel"]


def test_two_exports_into_one_folder_keep_their_own_pairs(tmp_path):
    # before: both wrote quant_info.json, so the first XModel was left beside the second one's fix positions
    first = export_xmodel(_dpu(warm_bn(TinyConvBN())), tmp_path / "first.xmodel", X)
    second = export_xmodel(_dpu(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), tmp_path / "second.xmodel", X)
    names = ["first.quant_info.json", "first.xmodel", "second.quant_info.json", "second.xmodel"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for path in (first, second):  # read_quant_info checks graph_md5 against the XModel's bytes
        assert read_quant_info(path)["graph_md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    assert read_quant_info(first)["param"] != read_quant_info(second)["param"]


def test_a_pair_is_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """The XModel is replaced, then its quant_info file fails to be: the XModel gets its earlier bytes back."""
    path = export_xmodel(_dpu(warm_bn(TinyConvBN())), tmp_path / "m.xmodel", X)
    before = path.read_bytes(), quant_info_path_for(path).read_text()
    real_replace = os.replace

    def refuse_info(src, dst, *args, **kwargs):
        if Path(dst).name == "m.quant_info.json":
            raise PermissionError(13, "Permission denied (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse_info)
    with pytest.raises(PermissionError, match="simulated"):
        export_xmodel(_dpu(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), path, X)
    assert (path.read_bytes(), quant_info_path_for(path).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.quant_info.json", "m.xmodel"]  # no temporary left
    assert read_quant_info(path)["graph_md5"] == hashlib.md5(path.read_bytes()).hexdigest()


def test_export_without_quant_info_removes_the_stale_pair_file(tmp_path):
    path = export_xmodel(_dpu(warm_bn(TinyConvBN())), tmp_path / "m.xmodel", X)
    export_xmodel(_dpu(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), path, X, quant_info_path=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.xmodel"]  # the old file described the old graph


def test_read_quant_info_reads_the_old_name_only_when_it_belongs_to_the_xmodel(tmp_path):
    path = export_xmodel(_dpu(warm_bn(TinyConvBN())), tmp_path / "m.xmodel", X)
    quant_info_path_for(path).rename(tmp_path / "quant_info.json")  # as earlier versions named it
    assert read_quant_info(path)["graph_md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    export_xmodel(_dpu(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), path, X, quant_info_path=False)
    with pytest.raises(ValueError, match=r"quant_info\.json' belongs to another export: its graph_md5 .* Export"):
        read_quant_info(path)
    (tmp_path / "quant_info.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"looked for m\.quant_info\.json and quant_info\.json"):
        read_quant_info(path)


def test_bad_paths_and_inputs(tmp_path):
    q = _dpu(warm_bn(TinyConvBN()))
    with pytest.raises(ValueError, match=r"should end with \.xmodel"):
        export_xmodel(q, tmp_path / "m.onnx", X)
    with pytest.raises(ValueError, match="is a directory"):
        export_xmodel(q, tmp_path, X)
    with pytest.raises(ValueError, match=r"should end with \.json"):
        export_xmodel(q, tmp_path / "m.xmodel", X, quant_info_path=tmp_path / "info.txt")
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        export_xmodel(q, tmp_path / "m.xmodel", [X])
    assert list(tmp_path.iterdir()) == []
    export_xmodel(q, tmp_path / "m.xmodel", X, quant_info_path=None)
    assert [p.name for p in tmp_path.iterdir()] == ["m.xmodel"]


def test_shift_constraints_are_enforced():
    q = _dpu(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    q.get_submodule("0").weight_fake_quant.scale.fill_(2.0**-30)  # shift_cut far above 16
    q.get_submodule("2").bias_fake_quant.scale.fill_(2.0**10)  # shift_bias far above 16
    assert len(check_dpu_shifts(q)) == 3  # layer 0: shift_cut and shift_bias; layer 2: shift_bias
    moved = enforce_dpu_shifts(q)
    assert {(a.layer, a.reason.split(":")[0]) for a in moved} == {("0", "shift_cut > 16"), ("2", "shift_bias > 16")}
    assert check_dpu_shifts(q) == [] and enforce_dpu_shifts(q) == []


def test_dpu_building_blocks_reject_bad_values():
    with pytest.raises(ValueError, match="per-tensor, symmetric, signed, power-of-two specs"):
        DPUFixPosObserver(QuantSpec(observer="dpu_pot", granularity="per_channel"), 4)
    with pytest.raises(ValueError, match="not a power of two"):
        fix_pos_from_scale(0.3)
    with pytest.raises(ValueError, match="not a positive power of two"):
        fix_pos_from_scale(0.0)
    with pytest.raises(ValueError, match="kernel sides must be >= 1"):
        avgpool_multiplier(0, 3)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.AvgPool2d(3, ceil_mode=True)))
    with pytest.raises(ValueError, match="ceil_mode=True .* use ceil_mode=False"):
        use_dpu_avgpool(gm)
