"""Bad overrides fail before any work, with messages that name the fix; online recipes fail fast offline."""

from __future__ import annotations

import pytest
import torch

from lightning_quant.app import compose_config, train
from lightning_quant.models import WeightsUnavailableError
from tests.app.conftest import needs_shared


def test_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match=r"mode='quantize' is not allowed.*use one of ptq, qat, float, calib, test"):
        train(compose_config(["mode=quantize", f"paths.output_dir={tmp_path}"]))


def test_test_mode_without_state_file_names_calib(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run mode=calib first"):
        train(compose_config(["recipe=resnet20_ptq_cifar10", "mode=test", f"paths.state_dir={tmp_path}"]))


@needs_shared
def test_test_mode_with_truncated_state_file_says_so(tmp_path):
    state = tmp_path / "quant_state.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}, "callbacks": {}}, state)
    state.write_bytes(state.read_bytes()[:100])  # a copy cut short
    from lightning_quant.errors import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="truncated or corrupted"):
        train(compose_config(["recipe=resnet20_ptq_cifar10", "mode=test", f"state_file={state}",
                              f"paths.output_dir={tmp_path / 'run'}", "data.num_workers=0"]))  # fmt: skip


def test_unknown_export_format():
    with pytest.raises(ValueError, match="export.formats has"):
        train(compose_config(["export.formats=[tflite]"]))


def test_output_dir_needed_outside_hydra_run():
    with pytest.raises(ValueError, match="paths.output_dir=/some/folder"):
        train(compose_config(["recipe=resnet20_ptq_cifar10"]))


def test_imagenet_roots_required(tmp_path):
    cfg = compose_config(["recipe=resnet50_ptq", "model.model.weights=null", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="data.train_root=/path/to/train"):
        train(cfg)


@pytest.mark.parametrize(
    ("recipe", "hint"),
    [
        ("resnet50_ptq", "recipe=resnet50_ptq_imagenette"),
        ("resnet50_qat", "recipe=resnet50_ptq_imagenette mode=qat"),
        ("mobilenetv2_ptq", "recipe=mobilenetv2_ptq_imagenette"),
        ("mobilenetv2_qat", "recipe=mobilenetv2_qat_imagenette"),
    ],
)
def test_online_recipes_fail_fast_offline(recipe, hint, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    cfg = compose_config([f"recipe={recipe}", f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(WeightsUnavailableError, match=f"not in the torch hub cache.*Use '?{hint}"):
        train(cfg)


def test_unknown_target_lists_the_targets():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(
        ConfigCompositionException, match=r"(?s)Could not find 'quant/tpu'.*Available options.*x86_vnni"
    ):
        compose_config(["recipe=resnet20_ptq_cifar10", "quant=tpu"])


def test_weights_file_of_another_architecture(tmp_path):
    from lightning_quant.models import WeightsMismatchError, cifar_resnet

    torch.save(cifar_resnet(56, pretrained=False).state_dict(), tmp_path / "r56.pth")
    cfg = compose_config(
        ["recipe=resnet20_ptq_cifar10", f"model.weights_file={tmp_path / 'r56.pth'}", f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(WeightsMismatchError, match=r"does not fit CifarResNet: .*unexpected .*model=resnet56_cifar"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_missing_weights_file(tmp_path):
    cfg = compose_config(
        ["recipe=resnet20_ptq_cifar10", f"model.weights_file={tmp_path / 'none.pth'}", f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        train(cfg)


def test_unknown_progress_bar():
    with pytest.raises(ValueError, match="progress_bar='fancy' is not allowed; use one of rich, tqdm"):
        train(compose_config(["progress_bar=fancy"]))


def test_unknown_observer_in_scheme_overrides(tmp_path):
    """Fails while the config is composed, before any model is built or evaluated."""
    with pytest.raises(ValueError, match=r"observer='magic' is not registered; use one of .*'mse'"):
        compose_config(
            ["recipe=resnet20_ptq_cifar10", "quant.scheme.activation_observer=magic", f"paths.output_dir={tmp_path}"]
        )
