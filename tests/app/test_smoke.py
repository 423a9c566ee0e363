"""End-to-end runs of the offline recipes with tiny overrides (a few batches each), plus the CLI from another cwd."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lightning_quant.app import RECIPES_DIR, train
from tests.app.conftest import FAST, needs_shared, tiny_config

pytestmark = needs_shared

# recipe: extra overrides (Imagenette recipes: small batches, one batch of everything)
OFFLINE = {
    "resnet20_ptq_cifar10_tensorrt": [],
    "resnet20_ptq_cifar10_dpu": ["deploy=true", "export.verify_batches=1", "export.formats=[torchscript,onnx,xmodel]"],
    "mobilenetv2_ptq_imagenette_dpu": ["deploy=true", "export.verify_batches=1"],
    "mobilenetv2_ptq_imagenette_dpu_ff": ["deploy=true", "export.verify_batches=1"],
    "resnet50_ptq_imagenette_dpu": ["deploy=true", "export.verify_batches=1"],
    "resnet20_qat_cifar10": ["trainer.max_epochs=1", "trainer.limit_train_batches=2"],
    "mobilenetv2_ptq_imagenette": [],
    "mobilenetv2_ptq_imagenette_tensorrt": [],
    "resnet50_ptq_imagenette": [],
    "mobilenetv2_qat_imagenette": ["trainer.max_epochs=1", "trainer.limit_train_batches=1"],
    "mobilenetv2_qat_imagenette_dpu": [  # the observer freeze inside the 3 steps, then the XModel export
        "trainer.limit_train_batches=3",
        "quant.qat_schedule.freeze_observer_step=2",
        "deploy=true",
        "export.verify_batches=1",
    ],
    "mobilenetv2_ptq_imagenette_per_tensor": [],
    "mobilenetv2_ptq_imagenette_accuracy_control": [  # 8 tuning images: one flip is 12.5 points
        "quant.accuracy_control.tuning_size=8",
        "quant.accuracy_control.max_accuracy_drop=50",
    ],
    "resnet20_ptq_cifar10_w4a8": [],
    "mobilenetv2_ptq_imagenette_mse_bc": [],
    "mobilenetv2_ptq_imagenette_w4a8": [],
    "resnet50_ptq_imagenette_w4a8": [],
}
SLOW = {  # per-layer tuning of 53 layers at 224 px, even on 4 images
    "mobilenetv2_ptq_imagenette_w4a8",  # AdaRound: ~10 min
    "mobilenetv2_ptq_imagenette_dpu_ff",  # fast finetune: ~4 min
    "resnet50_ptq_imagenette_w4a8",  # range search + AdaRound over 54 layers
}


@pytest.mark.parametrize(
    "recipe", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in sorted(OFFLINE)]
)
def test_offline_recipe_runs(recipe, tmp_path):
    small = "imagenette" in recipe
    cfg = tiny_config(recipe, tmp_path, *OFFLINE[recipe], batch_size=4 if small else 16, val_batches=1 if small else 2)
    metrics = train(cfg)
    assert metrics["name"] == recipe and metrics["target"] == cfg.quant.target
    assert 0.0 <= metrics["int8_top1"] <= 100.0 and 0.0 <= metrics["float_top1"] <= 100.0
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["int8_top1"] == metrics["int8_top1"]
    assert (run / "quant_state.ckpt").is_file()
    if cfg.quant.options.range_search:
        assert set(metrics["range_search"]) <= {"signed", "residual_sum", "non_negative"}
    if cfg.deploy:
        assert sorted(metrics["artefacts"]) == sorted(cfg.export.formats)
        assert (run / "model_int8.pt").is_file()
        if "xmodel" in cfg.export.formats:
            assert (run / "model_int8.quant_info.json").is_file()  # the pair of model_int8.xmodel
            assert metrics["artefacts"]["xmodel"]["quant_info"] == str(run / "model_int8.quant_info.json")
            assert metrics["artefacts"]["xmodel"]["top1_agreement"] >= 0.99  # our XIR interpreter vs fake-quant


def test_ptq_deploy_exports_verified_artefacts(tmp_path):
    metrics = train(tiny_config("resnet20_ptq_cifar10", tmp_path, "deploy=true"))
    assert metrics["float_top1"] > 50.0 and metrics["int8_top1"] > 40.0
    for fmt, name in (("onnx", "model_int8.onnx"), ("torchscript", "model_int8.pt")):
        art = metrics["artefacts"][fmt]
        assert art["path"].endswith(name) and art["bytes"] > 0 and art["verify_images"] == 128  # 8 x 16
        agree = round(art["top1_agreement"] * art["verify_images"]) + art["near_tie_flips"]
        assert agree / art["verify_images"] >= 0.99  # the gate's criterion: near-tie flips excused
    assert not list((tmp_path / "run").glob("*verified_*")) and not list((tmp_path / "run").glob("rejected_*"))
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["float_top5"] >= report["float_top1"] and report["int8_top5"] >= report["int8_top1"]
    assert len(report["layers"]) == 20 and all(row["sqnr_db"] > 10 for row in report["layers"])  # 19 convs + fc
    assert report["calibration_seconds"] > 0 and report["wall_seconds"] > 0
    sizes = report["sizes"]
    assert 0.2 < sizes["quantized_bytes"] / sizes["float_bytes"] < 0.3  # 7-bit weights, float biases and scales
    markdown = (run / "report.md").read_text()
    assert "| float |" in markdown and "| int8 |" in markdown and "![per-layer SQNR](sqnr.png)" in markdown
    assert "| layer1.0.conv1 |" in markdown and "Artefact onnx: `model_int8.onnx`" in markdown
    assert (run / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calib_then_test_gives_identical_metrics(tmp_path):
    calib = train(tiny_config("resnet20_ptq_cifar10", tmp_path, "mode=calib"))
    state = tmp_path / "state" / "resnet20_ptq_cifar10.ckpt"
    assert calib["state_file"] == str(state) and state.is_file()
    test = train(tiny_config("resnet20_ptq_cifar10", tmp_path, "mode=test"))
    assert test["int8_top1"] == calib["int8_top1"] and test["int8_top5"] == calib["int8_top5"]
    assert "float_top1" not in test
    calib_layers = {
        r["name"]: r["sqnr_db"] for r in json.loads((tmp_path / "run" / "report.json").read_text())["layers"]
    }
    assert calib_layers and calib["reports"]["markdown"].endswith("report.md")


def test_dpu_range_search_shifts_survive_the_state_file(tmp_path):
    """quant=dpu + range search: fix position shifts per group, kept by mode=test and named in report.md."""
    extra = ("quant.options.range_search=true", "quant.options.bias_correction=false")
    calib = train(tiny_config("resnet20_ptq_cifar10_dpu", tmp_path, "mode=calib", *extra))
    assert calib["range_search_parameter"] == "fix_pos_offset"
    assert set(calib["range_search"]) <= {"signed", "residual_sum", "non_negative"}
    assert all(isinstance(v, int) for v in calib["range_search"].values())
    assert "fix position shift" in (tmp_path / "run" / "report.md").read_text()
    test = train(tiny_config("resnet20_ptq_cifar10_dpu", tmp_path, "mode=test", *extra))
    assert test["int8_top1"] == calib["int8_top1"] and test["int8_top5"] == calib["int8_top5"]


def test_float_mode_evaluates_only(tmp_path):
    metrics = train(tiny_config("resnet20_ptq_cifar10", tmp_path, "mode=float"))
    assert "int8_top1" not in metrics and metrics["float_top1"] > 50.0
    assert not (tmp_path / "run" / "quant_state.ckpt").exists()


def test_calibration_folder_override(tmp_path):
    from PIL import Image

    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 100, 200 - 30 * i)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 image"):
        metrics = train(
            tiny_config("resnet20_ptq_cifar10", tmp_path, f"data.calibration_dir={folder}", "data.calibration_size=7")
        )
    assert metrics["int8_top1"] >= 0.0


def test_cli_sweep_from_another_directory(tmp_path):
    """`python /repo/train.py -m ...` from a foreign cwd finds the recipes; each job writes its metrics."""
    train_py = RECIPES_DIR.parent / "train.py"
    args = [
        sys.executable,
        str(train_py),
        "-m",
        "recipe=resnet20_ptq_cifar10",
        "mode=float",
        "quant.calibration_batches=1,2",
    ]
    args += [*FAST, "data.batch_size=8", "data.calibration_size=16", "trainer.limit_val_batches=1"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("multirun/resnet20_ptq_cifar10/*/*/metrics.json"))
    assert [json.loads(p.read_text())["calibration_batches"] for p in results] == [1, 2]


@pytest.mark.parametrize("style", ["rich", "tqdm"])
def test_progress_bars_render(style, tmp_path):
    from lightning.pytorch.callbacks import RichProgressBar

    from lightning_quant.app.main import _progress_bar

    cfg = tiny_config(
        "resnet20_ptq_cifar10", tmp_path, "trainer.enable_progress_bar=true", f"progress_bar={style}", val_batches=1
    )
    bars = _progress_bar(cfg)
    assert [type(b) for b in bars] == ([RichProgressBar] if style == "rich" else [])
    assert train(cfg)["int8_top1"] >= 0.0  # the bar renders through a whole run without error


def test_scheme_overrides_and_cle_from_the_config(tmp_path):
    cfg = tiny_config(
        "resnet20_ptq_cifar10",
        tmp_path,
        "quant.scheme.activation_observer=percentile",
        "quant.scheme.activation_percentile=99.9",
        "quant.scheme.weight_bits=6",
        "quant.options.cross_layer_equalization=true",
        "quant.options.replace_relu6=true",
    )
    metrics = train(cfg)
    state = torch.load(tmp_path / "run" / "quant_state.ckpt", map_location="cpu", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("QuantCallback"))
    assert saved["scheme"]["activation"]["observer"] == "percentile"
    assert saved["scheme"]["activation"]["percentile"] == 99.9 and saved["scheme"]["weight"]["bits"] == 6
    assert saved["options"]["cross_layer_equalization"] is True and saved["options"]["replace_relu6"] is True
    assert metrics["int8_top1"] > 40.0


def test_vitis_fast_finetune_and_bias_correction_flags(tmp_path):
    flags = ("quant.options.fast_finetune=true", "quant.options.bias_correction=true")
    cfg = tiny_config("resnet20_ptq_cifar10", tmp_path, *flags, batch_size=8)
    metrics = train(cfg)
    state = torch.load(tmp_path / "run" / "quant_state.ckpt", map_location="cpu", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("QuantCallback"))
    assert saved["options"]["fast_finetune"] is True and saved["options"]["bias_correction"] is True
    assert metrics["int8_top1"] > 30.0


@pytest.mark.parametrize("fallback", [None, 8], ids=["float", "8-bit"])
def test_accuracy_control_keeps_layers_float_and_mode_test_reads_them_back(tmp_path, fallback):
    common = (
        "quant.scheme.weight_bits=3",  # 3-bit weights lose points on any data: some layers must go back to float
        "quant.accuracy_control.max_accuracy_drop=6",
        "quant.accuracy_control.tuning_size=64",
        f"quant.accuracy_control.fallback_weight_bits={'null' if fallback is None else fallback}",
        "quant.progress=false",
    )
    metrics = train(tiny_config("resnet20_ptq_cifar10", tmp_path, *common))
    control = metrics["accuracy_control"]
    chosen = control["kept_float"] if fallback is None else control["higher_bits"]
    assert chosen and control["met"] and control["quantized_layers"] == 20
    assert control["metric_float"] - control["metric_final"] <= 6
    state = torch.load(tmp_path / "run" / "quant_state.ckpt", map_location="cpu", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("QuantCallback"))
    # the state file carries the choice
    assert (saved["exclude"], saved["layer_weight_bits"]) == (
        (chosen, {}) if fallback is None else ([], dict.fromkeys(chosen, 8))
    )
    where = "kept in float" if fallback is None else "given 8-bit weights"
    assert f"layers {where}" in (tmp_path / "run" / "report.md").read_text()
    again = train(
        tiny_config(
            "resnet20_ptq_cifar10",
            tmp_path,
            *common,
            "mode=test",
            f"state_file={tmp_path / 'run' / 'quant_state.ckpt'}",
        )
    )
    assert again["int8_top1"] == metrics["int8_top1"]


def test_accuracy_control_tuning_set_must_fit_beside_the_calibration_images(tmp_path):
    cfg = tiny_config(
        "resnet20_ptq_cifar10",
        tmp_path,
        "quant.accuracy_control.max_accuracy_drop=1",
        "quant.accuracy_control.tuning_size=60000",
    )
    with pytest.raises(ValueError, match=r"tuning_size=60000 \+ calibration_size=16 exceed the training split"):
        train(cfg)


def test_artefacts_are_verified_on_images_spread_over_the_evaluation_set():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_quant.app.export_step import verification_batches

    labels = torch.arange(10).repeat_interleave(20)  # an image folder: class by class
    loader = DataLoader(TensorDataset(torch.randn(200, 3), labels), batch_size=8)
    batches = verification_batches(loader, 2)
    assert [len(b[1]) for b in batches] == [8, 8]
    assert torch.cat([b[1] for b in batches]).unique().tolist() == list(range(10))
    small = DataLoader(TensorDataset(torch.randn(5, 3), torch.zeros(5)), batch_size=8)
    assert [len(b[0]) for b in verification_batches(small, 2)] == [5]


def _tiny_calibrated_export_inputs(tmp_path):
    from omegaconf import OmegaConf
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_quant import quantize, scheme_for_target

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    images = torch.randn(32, 3, 8, 8)
    qnet = quantize(net, [images[:16], images[16:]], scheme=scheme_for_target("x86"), progress=False)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 5, (32,))), batch_size=8)
    dm = type("DataModule", (), {"val_dataloader": lambda self: loader})()
    export = {"formats": ["onnx"], "verify": True, "min_top1_agreement": 0.99, "verify_batches": 2, "opset": 18}
    return OmegaConf.create({"export": export}), qnet, dm


def test_an_artefact_gets_its_deployable_name_only_after_the_validation_check(tmp_path):
    from lightning_quant.app.export_step import export_artefacts

    cfg, qnet, dm = _tiny_calibrated_export_inputs(tmp_path)
    artefacts = export_artefacts(cfg, qnet, dm, tmp_path)
    assert artefacts["onnx"]["path"] == str(tmp_path / "model_int8.onnx") and artefacts["onnx"]["verify_images"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_int8.onnx"]


def test_an_artefact_that_fails_the_validation_check_is_kept_as_rejected(tmp_path, monkeypatch):
    import lightning_quant.export as export
    from lightning_quant.app.export_step import export_artefacts

    cfg, qnet, dm = _tiny_calibrated_export_inputs(tmp_path)

    def disagree(*args, **kwargs):
        raise export.ExportVerificationError("top-1 agreement with the fake-quant model is 93.75% (< 99.00%)")

    monkeypatch.setattr(export, "verify_export", disagree)
    with pytest.raises(export.ExportVerificationError, match=r"Nothing was written as model_int8\.onnx.*of 16"):
        export_artefacts(cfg, qnet, dm, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rejected_model_int8.onnx"]
