"""The app under torchrun with 2 CPU processes: one summary, one set of files, calibration merged across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.app.conftest import needs_shared

ROOT = Path(__file__).resolve().parents[2]


@needs_shared
def test_torchrun_two_processes_write_once(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
        "recipe=resnet20_ptq_cifar10", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "data.batch_size=64", "data.calibration_size=256", "quant.calibration_batches=4", "data.num_workers=0",
        "trainer.limit_val_batches=4", "deploy=true", "export.formats=[onnx]", "trainer.enable_progress_bar=false",
        "quant.progress=false", "logger=none", f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("resnet20_ptq_cifar10 (mode=ptq, target=x86)") == 1  # the summary, from rank 0 only
    assert "on 4 batches across 2 processes" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["int8_top1"] > 50.0 and metrics["artefacts"]["onnx"]["path"].endswith("model_int8.onnx")
