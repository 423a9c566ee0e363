"""``mode=inspect``: the recipe's model judged op by op for the DPU on one image of a tiny generated CIFAR-like
folder; the table is printed, ``dpu_inspection.json`` written, and nothing is calibrated."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lightning_quant.app import RECIPES_DIR, train
from lightning_quant.app.help import help_page
from tests.app.conftest import tiny_config


def _cifar_like(root: Path) -> Path:
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (60 * i, 90, 160)).save(root / split / c / f"{i}.png")
    return root


def test_inspect_mode_writes_the_dpu_table_and_calibrates_nothing(tmp_path, capsys):
    data = _cifar_like(tmp_path / "cifar")
    overrides = ["mode=inspect", f"data.root={data}", "model.model.pretrained=false", "quant.exclude=[linear]"]
    metrics = train(tiny_config("resnet20_ptq_cifar10_dpu", tmp_path, *overrides, batch_size=2))
    run = tmp_path / "run"
    saved = json.loads((run / "dpu_inspection.json").read_text())
    assert saved["name"] == "resnet20_ptq_cifar10_dpu" and saved["input_shapes"] == [[1, 3, 32, 32]]
    cpu = [op for op in saved["ops"] if op["target"] == "CPU"]
    assert [op["layer"] for op in cpu] == ["linear"] and "float Linear" in cpu[0]["reason"]  # quant.exclude kept it
    assert saved["partitions"] == metrics["partitions"] == 1 and metrics["cpu_ops"] == 1
    assert {"conv2d", "add", "strided_slice", "pad", "avgpool2d"} <= {op["op"] for op in saved["ops"]}
    assert sorted(p.name for p in run.iterdir()) == ["dpu_inspection.json"]  # no state file, metrics or report
    assert not (tmp_path / "state").exists()
    out = capsys.readouterr().out
    assert "DPU inspection for DPUCZDX8G" in out and "node" in out and "reason" in out
    assert "inspect" in help_page(RECIPES_DIR)
