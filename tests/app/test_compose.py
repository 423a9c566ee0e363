"""Every recipe composes with Hydra's compose API, with the fields its header promises."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lightning_quant.app import CONFIG_DIR, MODES, RECIPES_DIR, compose_config
from lightning_quant.app.main import quant_options
from lightning_quant.config import QuantOptions
from lightning_quant.models import IMAGENETTE_EVAL_SIZES

RECIPES = sorted(p.stem for p in (RECIPES_DIR / "recipe").glob("*.yaml"))
EXPECTED = {  # recipe: (mode, target, model builder, datamodule)
    "resnet50_ptq": ("ptq", "x86", "torchvision_model", "ImageFolderDataModule"),
    "resnet50_qat": ("qat", "x86", "torchvision_model", "ImageFolderDataModule"),
    "mobilenetv2_ptq": ("ptq", "x86", "torchvision_model", "ImageFolderDataModule"),
    "mobilenetv2_qat": ("qat", "x86", "torchvision_model", "ImageFolderDataModule"),
    "mobilenetv2_ptq_imagenette": ("ptq", "x86", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "mobilenetv2_ptq_imagenette_tensorrt": ("ptq", "tensorrt", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "mobilenetv2_qat_imagenette": ("qat", "x86", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "resnet50_ptq_imagenette": ("ptq", "x86", "resnet50_imagenette", "ImagenetteDataModule"),
    "resnet20_ptq_cifar10": ("ptq", "x86", "cifar_resnet", "CIFAR10DataModule"),
    "resnet20_ptq_cifar10_dpu": ("ptq", "dpu", "cifar_resnet", "CIFAR10DataModule"),
    "resnet20_ptq_cifar10_tensorrt": ("ptq", "tensorrt", "cifar_resnet", "CIFAR10DataModule"),
    "resnet20_qat_cifar10": ("qat", "x86", "cifar_resnet", "CIFAR10DataModule"),
    "mobilenetv2_ptq_imagenette_dpu": ("ptq", "dpu", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "mobilenetv2_ptq_imagenette_dpu_ff": ("ptq", "dpu", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "mobilenetv2_qat_imagenette_dpu": ("qat", "dpu", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "resnet50_ptq_imagenette_dpu": ("ptq", "dpu", "resnet50_imagenette", "ImagenetteDataModule"),
    "mobilenetv2_ptq_imagenette_per_tensor": ("ptq", "x86_vnni", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "mobilenetv2_ptq_imagenette_accuracy_control": ("ptq", "x86", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "resnet20_ptq_cifar10_w4a8": ("ptq", "x86_vnni", "cifar_resnet", "CIFAR10DataModule"),
    "mobilenetv2_ptq_imagenette_mse_bc": ("ptq", "x86_vnni", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "mobilenetv2_ptq_imagenette_w4a8": ("ptq", "x86_vnni", "mobilenet_v2_imagenette", "ImagenetteDataModule"),
    "resnet50_ptq_imagenette_w4a8": ("ptq", "x86_vnni", "resnet50_imagenette", "ImagenetteDataModule"),
}


def test_every_recipe_is_listed():
    assert RECIPES == sorted(EXPECTED)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"recipe={recipe}"])
    mode, target, builder, datamodule = EXPECTED[recipe]
    assert cfg.name == recipe
    assert cfg.mode == mode and cfg.mode in MODES
    assert cfg.quant.target == target
    assert cfg.model.model._target_.endswith(builder)
    assert cfg.data._target_.endswith(datamodule)
    assert cfg.state_file.endswith(f"{recipe}.ckpt")
    if target == "dpu":
        assert list(cfg.export.formats) == ["torchscript", "xmodel"]
        assert cfg.quant.options.cross_layer_equalization  # Vitis AI's default
        # and bias correction, which QAT does not run (the training corrects the biases)
        assert cfg.quant.options.bias_correction is (None if mode == "qat" else True)
    if mode == "qat":
        assert cfg.trainer.max_epochs >= 1
    offline_model = next((m for m in IMAGENETTE_EVAL_SIZES if builder == f"{m}_imagenette"), None)
    if offline_model is not None:  # evaluated at the size the offline weights were trained for
        sizes = IMAGENETTE_EVAL_SIZES[offline_model]
        assert (cfg.data.image_size, cfg.data.resize) == (sizes["image_size"], sizes["resize"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header(recipe):
    text = (RECIPES_DIR / "recipe" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert "# Expected" in text and "measured" in text
    assert "defaults:\n  - override /model:" in text


def test_online_recipes_name_their_offline_alternative():
    assert compose_config(["recipe=resnet50_ptq"]).model.model.offline_hint == "recipe=resnet50_ptq_imagenette"
    assert compose_config(["recipe=mobilenetv2_qat"]).model.model.offline_hint == "recipe=mobilenetv2_qat_imagenette"


def test_vitis_style_overrides():
    cfg = compose_config(
        [
            "recipe=mobilenetv2_ptq_imagenette",
            "mode=calib",
            "data.calibration_size=100",
            "data.batch_size=8",
            "deploy=true",
        ]
    )
    assert (cfg.mode, cfg.data.calibration_size, cfg.data.batch_size, cfg.deploy) == ("calib", 100, 8, True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_options_build_valid_quant_options(recipe):
    cfg = compose_config([f"recipe={recipe}"])
    options = quant_options(cfg)
    assert isinstance(options, QuantOptions)
    assert options.to_dict() == dict(cfg.quant.options)  # every key of the recipe, nothing dropped or renamed
    assert quant_options(cfg, "qat").refinements == ()  # QAT keeps only the network transforms


@pytest.mark.parametrize("override", ["quant.options.bias_corection=true", "quant.bias_correction=true"])
def test_misspelled_or_old_option_key_fails_at_composition(override):
    # a misspelled key, or the pre-QuantOptions place of a switch: composition refuses it, naming the key
    key = override.split("=")[0]
    with pytest.raises((ConfigCompositionException, ValueError), match=re.escape(key)):
        compose_config(["recipe=resnet20_ptq_cifar10", override])


def test_forced_unknown_option_key_is_refused_before_anything_runs():
    # '+' gets past Hydra's own check: the app's config check (or, at the latest, quant_options) names the key
    with pytest.raises(ValueError, match="bias_corection"):
        quant_options(compose_config(["recipe=resnet20_ptq_cifar10", "+quant.options.bias_corection=true"]))
    cfg = OmegaConf.create({"quant": {"options": {"bias_correction": True, "bias_corection": True}}})
    with pytest.raises(ValueError, match=r"unknown QuantOptions key\(s\) bias_corection; known: adaround"):
        quant_options(cfg)


def test_unknown_recipe_lists_search_path():
    with pytest.raises(ConfigCompositionException, match="recipe"):
        compose_config(["recipe=no_such_recipe"])
