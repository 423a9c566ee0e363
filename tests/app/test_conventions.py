"""Hydra and Lightning conventions of the app: typos fail before any model is built, the app's own --help, loggers
(TensorBoard logged to, W&B/MLflow naming their extra), QAT checkpoints that resume, calibration from a folder
without a train split."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from lightning_quant.app import compose_config, train
from lightning_quant.app.main import _build_datamodule, _build_logger
from tests.app.conftest import needs_shared, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "lightning_quant", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_help_is_the_apps_own_page_from_any_directory(tmp_path):
    done = _cli("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = done.stdout
    assert page.startswith("lightning-quant: INT8")
    for expected in ("resnet20_ptq_cifar10", "mobilenetv2_ptq_imagenette_dpu", "calib", "x86_vnni", "Examples:"):
        assert expected in page
    assert "quant_base" not in page and "common" not in page  # the base settings are not a choice


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.bias_correction=true", r"quant.bias_correction is not a setting \(did you mean quant.options."),
        ("+quant.bias_correction=true", r"did you mean quant.options.bias_correction"),
        ("mode=ptqq", r"mode='ptqq' is not allowed \(did you mean mode=ptq\?\)"),
        ("quant.scheme.activation_observer=minmaxx", r"observer='minmaxx' is not registered"),
        ("+data.batchsize=8", r"data.batchsize is not a parameter of .*did you mean data.batch_size"),
    ],
)
def test_typos_fail_before_anything_is_built(tmp_path, override, message):
    start = time.perf_counter()
    done = _cli("recipe=resnet20_ptq_cifar10", override, cwd=tmp_path)
    assert done.returncode != 0
    assert __import__("re").search(message, done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()  # no run started
    assert time.perf_counter() - start < 120


def test_schema_rejects_keys_and_types_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_config(["quant.options.bias_corection=true"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["quant.calibration_batches=many"])
    with pytest.raises(ValueError, match="deplyo is not a setting .did you mean deploy"):
        compose_config(["+deplyo=true"])
    with pytest.raises(ValueError, match="trainer.max_epoch is not a parameter .*did you mean trainer.max_epochs"):
        compose_config(["+trainer.max_epoch=2"])


def test_loggers_that_need_an_extra_name_it():
    import importlib.util

    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is not None:  # installed here: nothing to name
            continue
        with pytest.raises(ModuleNotFoundError, match=rf"pip install 'lightning-quant\[{name}\]'"):
            _build_logger(compose_config([f"logger={name}"]))


def _images(folder: Path, classes: tuple[str, ...], n: int) -> Path:
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (40 * i % 255, 90, 160)).save(folder / c / f"{i}.png")
    return folder


def test_calibration_dir_alone_needs_no_train_split(tmp_path):
    val = _images(tmp_path / "val", ("a", "b"), 2)
    calib = _images(tmp_path / "calib", ("unlabeled",), 3)
    cfg = compose_config(
        ["data=imagenet", f"data.val_root={val}", f"data.calibration_dir={calib}", "data.num_workers=0"]
    )
    dm = _build_datamodule(cfg)
    dm.setup()
    assert len(dm.val_dataloader().dataset) == 4
    with pytest.raises(ValueError, match="no train split.*data.train_root"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="data.train_root is required"):
        _build_datamodule(compose_config(["data=imagenet", f"data.val_root={val}", "mode=qat"]))


@needs_shared
def test_deploy_with_calib_says_nothing_is_exported(tmp_path, capsys):
    train(tiny_config("resnet20_ptq_cifar10", tmp_path, "mode=calib", "deploy=true"))
    assert "deploy=true has no effect with mode=calib: nothing is exported" in capsys.readouterr().out


@needs_shared
def test_tensorboard_logger_receives_the_quantization_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config("resnet20_ptq_cifar10", tmp_path, "logger=tensorboard", "quant.report=true"))
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert any(tag.startswith("quant/") for tag in tags), tags
    assert any("val" in tag for tag in tags), tags


@needs_shared
def test_app_qat_keeps_checkpoints_and_resumes(tmp_path):
    qat = ("trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "quant.calibration_batches=1")
    first = tiny_config("resnet20_qat_cifar10", tmp_path, *qat, "trainer.max_epochs=1")
    train(first)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resumed = tiny_config(
        "resnet20_qat_cifar10", tmp_path, *qat, "trainer.max_epochs=2", "ckpt_path=last",
        f"paths.output_dir={tmp_path / 'run2'}",
    )  # fmt: skip
    first_epoch = torch.load(last, weights_only=True)["epoch"]
    metrics = train(resumed)
    assert metrics["resumed_from"] == str(last)
    assert metrics["calibration_seconds"] is None  # the restored quantizers were not calibrated again
    assert torch.load(tmp_path / "run2" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == first_epoch + 1
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no earlier run"):
        train(tiny_config("resnet20_qat_cifar10", tmp_path / "elsewhere", *qat, "ckpt_path=last"))
