"""``deploy_check=true``: after the XModel export the app dumps both sides layer by layer, writes the comparison and
fails the run, naming the first differing op, when the XModel does not reproduce the fake-quant model. Runs on
generated images with a randomly initialised ResNet-20 (no shared folder needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lightning_quant.app import compose_config, train
from lightning_quant.export import deploy_check
from lightning_quant.export.deploy_check import DeployCheckError
from lightning_quant.export.xmodel_interpreter import load_xmodel
from tests.app.conftest import tiny_config


def _images(root, classes=("a", "b"), n=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _config(tmp_path, *extra):
    data = _images(tmp_path / "images")
    return tiny_config(
        "resnet20_ptq_cifar10_dpu",
        tmp_path,
        "data=imagenet",
        f"data.train_root={data}",
        f"data.val_root={data}",
        "data.image_size=32",
        "data.resize=32",
        "model.model.pretrained=false",
        "quant.options.bias_correction=false",
        "deploy=true",
        "export.formats=[xmodel]",
        "export.verify_batches=1",
        *extra,
        batch_size=8,
        val_batches=1,
    )


def test_deploy_check_dumps_both_sides_and_reports_agreement(tmp_path):
    metrics = train(_config(tmp_path, "deploy_check=true"))
    run = tmp_path / "run"
    check = metrics["artefacts"]["xmodel"]["deploy_check"]
    assert check["ok"] and check["first_difference"] is None and check["ops"] > 40
    folder = run / "deploy_check"
    assert sorted(p.name for p in folder.iterdir()) == ["fake_quant", "report.json", "report.txt", "xmodel"]
    report = json.loads((folder / "report.json").read_text())
    assert report["ok"] and all(op["status"] == "equal" for op in report["ops"])  # our interpreter: bit-exact
    assert (folder / "report.txt").read_text().startswith("deploy check (")
    fixes = [op.name for op in load_xmodel(run / "model_int8.xmodel").op_node if op.type == "fix"]
    assert [op["name"] for op in report["ops"]] == fixes
    assert json.loads((folder / "xmodel" / "dump.json").read_text())["input_shapes"] == [[1, 3, 32, 32]]
    assert "Deploy check: the xmodel file reproduces the fake-quant model op by op" in (run / "report.md").read_text()


def test_a_disagreeing_xmodel_fails_the_run_naming_the_op(tmp_path, monkeypatch):
    original = deploy_check.dump_xmodel
    moved = {}

    def dump_moved(path, example, out_dir, **kwargs):  # the XModel as a broken exporter would have written it
        graph = load_xmodel(path)
        fix = [op for op in graph.op_node if op.type == "fix"][3]
        fix.attr["fix_point"].int32_value -= 1
        moved["op"] = fix.name
        bad = tmp_path / "moved.xmodel"
        bad.write_bytes(graph.SerializeToString())
        return original(bad, example, out_dir, **kwargs)

    monkeypatch.setattr(deploy_check, "dump_xmodel", dump_moved)
    with pytest.raises(DeployCheckError, match="DIFFER, first at") as caught:
        train(_config(tmp_path, "deploy_check=true"))
    message = str(caught.value)
    assert f"first at {moved['op']}: fix position" in message and "report.txt" in message
    run = tmp_path / "run"
    assert "Nothing was written as model_int8.xmodel" in message and (run / "rejected_model_int8.xmodel").is_file()
    assert not (run / "model_int8.xmodel").exists()
    assert json.loads((run / "deploy_check" / "report.json").read_text())["first_difference"] == moved["op"]


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["recipe=resnet20_ptq_cifar10_dpu"], "deploy=false: nothing is exported"),
        (["recipe=resnet20_ptq_cifar10_dpu", "deploy=true", "export.formats=[onnx]"], "has no xmodel"),
        (["recipe=resnet20_ptq_cifar10", "deploy=true", "export.formats=[xmodel]"], "quant.target=x86"),
        (["recipe=resnet20_ptq_cifar10_dpu", "deploy=true", "mode=calib"], "mode=calib exports nothing"),
    ],
)
def test_deploy_check_without_an_xmodel_export_fails_at_composition(overrides, why):
    with pytest.raises(ValueError, match=f"deploy_check=true compares .* writes no XModel \\(.*{why}.*target=dpu"):
        compose_config([*overrides, "deploy_check=true"])
