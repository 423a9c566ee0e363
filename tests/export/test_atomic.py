"""Atomic writes: a save that fails half-way leaves no partial file and keeps the earlier artefact."""

from __future__ import annotations

import onnx
import pytest
import torch

from lightning_quant import export_onnx, export_torchscript

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def _partial_then_fail(*args, **kwargs):
    destination = args[1] if len(args) > 1 else kwargs.get("f")
    with open(destination, "wb") as handle:
        handle.write(b"\x08\x07half-written")
    raise OSError("No space left on device (simulated)")


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if "partial" in p.name]


def test_failed_onnx_save_keeps_earlier_file(tiny_exports, calib_batches, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    export_onnx(tiny_exports["x86"].qmodel, target, calib_batches[0][:2])
    before = target.read_bytes()
    onnx.checker.check_model(str(target))
    monkeypatch.setattr(onnx, "save", _partial_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export_onnx(tiny_exports["tensorrt"].qmodel, target, calib_batches[0][:2])
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_failed_onnx_save_without_earlier_file_leaves_nothing(tiny_exports, calib_batches, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx, "save", _partial_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export_onnx(tiny_exports["x86"].qmodel, tmp_path / "model.onnx", calib_batches[0][:2])
    assert list(tmp_path.iterdir()) == []


def test_failed_torchscript_save_keeps_earlier_file(tiny_torchscript, calib_batches, tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    export_torchscript(tiny_torchscript.qmodel, target, calib_batches[0][:2])
    before = target.read_bytes()
    monkeypatch.setattr(torch.jit, "save", _partial_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export_torchscript(tiny_torchscript.qmodel, target, calib_batches[0][:2])
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    torch.jit.load(str(target))  # still a loadable file


def test_successful_export_replaces_earlier_file(tiny_exports, calib_batches, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    export_onnx(tiny_exports["tensorrt"].qmodel, target, calib_batches[0][:2])
    onnx.checker.check_model(str(target))
    assert _leftovers(tmp_path) == []
