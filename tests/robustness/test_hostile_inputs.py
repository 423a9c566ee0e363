"""Hostile and broken inputs: each gets a clear error naming the problem, or is skipped with a count, and never
leaves a half-written artefact. Complements tests/test_api.py (wrong batch shape, empty data), tests/data (corrupt
images), tests/callbacks/test_checkpoint_resume.py (truncated file, other model/mode/target) and
tests/export/test_bad_inputs.py / test_atomic.py (bad paths, failed saves)."""

from __future__ import annotations

import io
import os
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_quant import (
    CheckpointMismatchError,
    QuantCallback,
    export_onnx,
    export_torchscript,
    export_xmodel,
    quantize,
)
from lightning_quant.checkpoint import load_quantized_checkpoint
from lightning_quant.data import CalibrationFolder
from tests.helpers.models import LitClassifier, TinyConvBN, TinyDataModule, quiet_trainer, seeded_lit, warm_bn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


@pytest.fixture(scope="module")
def qmodel(tiny) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    return quantize(tiny, [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)], progress=False)


# --- calibration batches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "type_name"),
    [(np.zeros((2, 3, 16, 16), np.float32), "numpy.ndarray"), (None, "builtins.NoneType"), ([X], "builtins.list")],
    ids=["numpy", "none", "nested_list"],
)
def test_non_tensor_batch_names_its_type(tiny, batch, type_name):
    # before: AttributeError: 'numpy.ndarray' object has no attribute 'numel', from deep inside an observer
    with pytest.raises(
        ValueError,
        match=rf"calibration batch 0 could not be fed .*quantizer 'x' received a {type_name}, not a torch\.Tensor; "
        r"convert batches to tensors",
    ):
        quantize(tiny, [batch], progress=False)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64, torch.int64])
def test_wrong_dtype_names_the_dtype(tiny, dtype):
    batch = torch.zeros(2, 3, 16, 16, dtype=dtype)  # e.g. raw uint8 pixels without ToTensor
    with pytest.raises(
        ValueError, match=rf"could not be fed .*received Tensor\(shape=\(2, 3, 16, 16\), dtype={dtype}\)"
    ):
        quantize(tiny, [batch], progress=False)


def test_batches_of_size_zero_are_an_error_not_a_half_calibrated_model(tiny):
    # before: a warning blaming "branches the calibration inputs never take" and a model with float activations
    empty = torch.zeros(0, 3, 16, 16)
    with pytest.raises(ValueError, match=r"all 2 calibration batch\(es\) hold no samples .*shape=\(0, 3, 16, 16\)"):
        quantize(tiny, [empty, empty], progress=False)
    qmodel = quantize(tiny, [empty, X], progress=False)  # one empty batch among good ones is harmless
    # the biases too: bias correction divided by the empty batch's 0 positions and made them NaN, which torch's
    # fake-quant kernel then turned into finite garbage downstream
    assert all(torch.isfinite(p).all() for p in qmodel.parameters())
    assert torch.isfinite(qmodel(X)).all()


# --- unlabeled calibration folder -------------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb as far as Pillow can tell)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _truncated(fmt: str) -> bytes:
    """A real image cut in half: the header opens, decoding the pixels fails."""
    pixels = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _damaged_files(folder: Path) -> int:
    (folder / "bomb.png").write_bytes(_png_header_only(20000, 20000))  # 400 MP: Pillow refuses to open it
    (folder / "cut.png").write_bytes(_truncated("PNG"))
    (folder / "cut.jpg").write_bytes(_truncated("JPEG"))
    (folder / "empty.webp").write_bytes(b"")
    return 4


def test_undecodable_images_are_skipped_with_a_count(tmp_path):
    # before: the decompression bomb raised PIL.Image.DecompressionBombError out of the constructor
    for i in range(3):
        Image.new("RGB", (12, 10), (40 * i, 0, 0)).save(tmp_path / f"good{i}.png")
    bad = _damaged_files(tmp_path)
    with pytest.warns(UserWarning, match=rf"skipped {bad} image\(s\) that cannot be decoded .*using 3"):
        ds = CalibrationFolder(tmp_path)
    assert sorted(p.name for p in ds.files) == ["good0.png", "good1.png", "good2.png"]
    batch = torch.stack([ds[i] for i in range(len(ds))])
    assert batch.shape == (3, 3, 10, 12)


def test_folder_of_only_undecodable_images_fails_clearly(tmp_path):
    bad = _damaged_files(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"none of its {bad} image file\(s\) could be"):
        CalibrationFolder(tmp_path)


# --- quantization state / checkpoint files ----------------------------------------------------------------------


def _lit(num_classes: int = 10) -> LitClassifier:
    return seeded_lit(0, num_classes)


def _trainer(root: Path, callbacks: list) -> pl.Trainer:
    return quiet_trainer(root, callbacks, enable_checkpointing=False)


def _callback() -> QuantCallback:
    return QuantCallback(calibration_batches=1, progress=False, report=False)


@pytest.fixture(scope="module")
def ptq_state(tmp_path_factory) -> Path:
    """A PTQ state file as the app's ``mode=calib`` writes it (``trainer.save_checkpoint`` after calibration)."""
    root = tmp_path_factory.mktemp("ptq_state")
    trainer = _trainer(root, [_callback()])
    trainer.validate(_lit(), datamodule=TinyDataModule(), verbose=False)
    trainer.save_checkpoint(root / "quant_state.ckpt")
    return root / "quant_state.ckpt"


def _edited(source: Path, target: Path, edit) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    edit(checkpoint)
    torch.save(checkpoint, target)
    return target


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5])
def test_state_with_invalid_scales_is_rejected(ptq_state, tmp_path, value):
    # before: loaded silently; the model then computed garbage (NaN / inf / 0 scales) without any error
    key = "model.activation_quantizers.relu.scale"

    def damage(checkpoint: dict) -> None:
        checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], value)

    bad = _edited(ptq_state, tmp_path / "bad.ckpt", damage)
    expected = rf"invalid quantization scales \({key}: NaN, inf or <= 0\)"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_quantized_checkpoint(_lit(), bad)
    with pytest.raises(CheckpointMismatchError, match=expected):  # the Trainer path goes through the same guard
        _trainer(tmp_path, [_callback()]).validate(_lit(), datamodule=TinyDataModule(), ckpt_path=bad, verbose=False)


def test_state_from_same_architecture_other_size_is_rejected(ptq_state, tmp_path):
    """Same layer names, different head size: caught by the scale-shape check, not a wall of size mismatches."""
    expected = r"quantizer shapes differ from the checkpoint \(model\.fc\.weight_fake_quant\..*another layer size"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_quantized_checkpoint(_lit(num_classes=5), ptq_state)
    with pytest.raises(CheckpointMismatchError, match=expected):
        _trainer(tmp_path, [_callback()]).validate(
            _lit(num_classes=5), datamodule=TinyDataModule(), ckpt_path=ptq_state, verbose=False
        )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lambda: _lit().state_dict(), r"holds a dict without 'state_dict', not a Lightning checkpoint"),
        (lambda: [1, 2, 3], r"holds list, not a Lightning checkpoint .*bare model\.state_dict\(\) file"),
    ],
    ids=["bare_state_dict", "list"],
)
def test_file_that_is_not_a_checkpoint_is_rejected(tmp_path, content, expected):
    # before: KeyError / AttributeError: 'list' object has no attribute 'get'
    torch.save(content(), tmp_path / "state.pth")
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_quantized_checkpoint(_lit(), tmp_path / "state.pth")


@pytest.mark.parametrize("field", ["scheme", "mode"])
def test_state_with_incomplete_callback_config_is_rejected(ptq_state, tmp_path, field):
    # before: KeyError: 'scheme'
    def damage(checkpoint: dict) -> None:
        for state in checkpoint["callbacks"].values():
            del state[field]

    bad = _edited(ptq_state, tmp_path / "bad.ckpt", damage)
    with pytest.raises(CheckpointMismatchError, match=rf"QuantCallback state lacks {field}: it is damaged"):
        load_quantized_checkpoint(_lit(), bad)


# --- read-only output folders -----------------------------------------------------------------------------------

EXPORTERS = [(export_onnx, "model.onnx"), (export_torchscript, "model.pt"), (export_xmodel, "model.xmodel")]
IDS = ["onnx", "torchscript", "xmodel"]


@pytest.fixture(scope="module")
def dpu_qmodel(tiny) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    return quantize(tiny, [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)], target="dpu", progress=False)


@pytest.fixture
def exported_model(request, qmodel, dpu_qmodel):
    """The model each exporter takes: the x86 one, or for export_xmodel the DPU one."""
    return dpu_qmodel if request.node.callspec.params["exporter"] is export_xmodel else qmodel


def _earlier_artefact(folder: Path, name: str) -> bytes:
    content = b"earlier artefact, must survive"
    (folder / name).write_bytes(content)
    return content


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the simulated cases below")
@pytest.mark.parametrize(("exporter", "name"), EXPORTERS, ids=IDS)
def test_read_only_folder_refuses_before_any_work(exported_model, tmp_path, exporter, name):
    earlier = _earlier_artefact(tmp_path, name)
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError, match="the folder is read-only; choose another output path"):
            exporter(exported_model, tmp_path / name, X)
        assert sorted(p.name for p in tmp_path.iterdir()) == [name]
        assert (tmp_path / name).read_bytes() == earlier
    finally:
        tmp_path.chmod(stat.S_IRWXU)


@pytest.mark.parametrize(("exporter", "name"), EXPORTERS, ids=IDS)
def test_read_only_filesystem_refuses_before_any_work(exported_model, tmp_path, monkeypatch, exporter, name):
    """A read-only mount: access(2) reports the folder unwritable even to root, as simulated here."""
    earlier = _earlier_artefact(tmp_path, name)
    real_access = os.access

    def read_only_mount(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == tmp_path.resolve():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", read_only_mount)
    with pytest.raises(PermissionError, match="the folder is read-only; choose another output path"):
        exporter(exported_model, tmp_path / name, X)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (tmp_path / name).read_bytes() == earlier


@pytest.mark.parametrize(("exporter", "name"), EXPORTERS, ids=IDS)
@pytest.mark.parametrize("refused", ["create", "replace"])
def test_folder_refusing_writes_after_the_check_keeps_earlier_artefact(
    exported_model, tmp_path, monkeypatch, exporter, name, refused
):
    """The access check passes but the folder refuses the write (ACLs, a root-squashed NFS export, a folder made
    read-only while exporting): creating the temporary file, or renaming it over the earlier artefact, fails. The
    earlier file stays as it was and no temporary file or folder is left."""
    earlier = _earlier_artefact(tmp_path, name)
    real_replace = os.replace

    def refusing(create):
        def create_in(*args, **kwargs):
            if refused == "create" and Path(kwargs.get("dir") or ".").resolve() == tmp_path.resolve():
                raise PermissionError(13, "Permission denied (simulated read-only folder)")
            return create(*args, **kwargs)

        return create_in

    def replace(src, dst, *args, **kwargs):
        if refused == "replace" and Path(dst).resolve() == (tmp_path / name).resolve():
            raise PermissionError(13, "Permission denied (simulated read-only folder)")
        return real_replace(src, dst, *args, **kwargs)

    for create in ("mkdtemp", "mkstemp"):  # whichever the atomic writer uses for its temporary file
        monkeypatch.setattr(tempfile, create, refusing(getattr(tempfile, create)))
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError, match="simulated read-only folder"):
        exporter(exported_model, tmp_path / name, X)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (tmp_path / name).read_bytes() == earlier


@pytest.mark.parametrize(("exporter", "name"), EXPORTERS, ids=IDS)
def test_exports_get_the_usual_file_permissions(exported_model, tmp_path, exporter, name):
    """Artefacts are readable like any file the process writes (umask), e.g. by a serving process of another user.
    Before, the temporary file from ``mkstemp`` was renamed into place and kept its owner-only mode 0600."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = exporter(exported_model, tmp_path / name, X)
    for written in tmp_path.iterdir():  # an XModel's quant_info file too
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written.name
    assert path.exists()
