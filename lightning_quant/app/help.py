"""``lightning-quant --help``: the app's own page (what it does, the recipes, modes, targets, examples).

Example:
    >>> from lightning_quant.app import RECIPES_DIR
    >>> page = help_page(RECIPES_DIR)
    >>> "resnet20_ptq_cifar10" in page and "mode=<name>" in page and "quant=<name>" in page
    True
"""

from __future__ import annotations

from pathlib import Path

from lightning_quant.app.schema import MODES

__all__ = ["help_page", "recipe_summaries"]

_MODES = {
    "ptq": "float evaluation, calibration, INT8 evaluation, state file + report (+ artefacts with deploy=true)",
    "qat": "fine-tune with fake-quant in the loop (trainer.max_epochs), test, save, export with deploy=true",
    "float": "evaluate the float model only",
    "calib": "calibrate and write the state file (state_file=...)",
    "test": "load state_file, evaluate (+ export with deploy=true)",
    "inspect": "list which ops the Vitis AI DPU runs and which fall back to the CPU (no calibration)",
}
_TARGETS = {
    "x86": "onnxruntime on any x86-64 CPU: uint8 activations, 7-bit per-channel weights (the default)",
    "x86_vnni": "x86-64 with VNNI/AMX: the same with 8-bit weights",
    "tensorrt": "int8 symmetric activations, per-channel int8 weights",
    "dpu": "Vitis AI DPU: int8 per-tensor power-of-two scales; exports the XModel",
}


def recipe_summaries(recipes_dir: Path) -> dict[str, str]:
    """Recipe name -> the first line of its leading comment (after ``# @package _global_``)."""
    out = {}
    for path in sorted((recipes_dir / "recipe").glob("*.yaml")):
        lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        text = next((ln for ln in lines if ln and not ln.startswith("@package")), "")
        out[path.stem] = text
    return out


def help_page(recipes_dir: Path) -> str:
    """The text ``lightning-quant --help`` prints, listing the recipes in ``recipes_dir/recipe``."""
    recipes = recipe_summaries(recipes_dir)
    width = max((len(n) for n in recipes), default=10) + 2
    lines = [
        "lightning-quant: INT8 post-training quantization (PTQ) and quantization-aware training (QAT) of vision models",
        "in the Lightning Trainer, from a Hydra recipe, with verified ONNX / TorchScript / Vitis AI XModel artefacts.",
        "",
        "Usage: lightning-quant recipe=<name> [key=value ...]      (python -m lightning_quant, python train.py: same)",
        "",
        "Recipes (recipe=<name>):",
        *[f"  {name:<{width}}{text[:100]}" for name, text in recipes.items()],
        "",
        "Modes (mode=<name>, default: the recipe's):",
        *[f"  {name:<8}{_MODES[name]}" for name in MODES],
        "",
        "Targets (quant=<name>, default x86):",
        *[f"  {name:<10}{text}" for name, text in _TARGETS.items()],
        "",
        "Examples:",
        "  lightning-quant recipe=resnet20_ptq_cifar10                       # first run: PTQ of ResNet-20 on CIFAR-10",
        "  lightning-quant recipe=mobilenetv2_ptq_imagenette deploy=true     # + ONNX/TorchScript, verified",
        "  lightning-quant recipe=resnet20_ptq_cifar10_dpu deploy=true deploy_check=true  # + XModel vs fake-quant,"
        " layer by layer",
        "  lightning-quant recipe=resnet20_qat_cifar10 trainer.max_epochs=3 logger=tensorboard",
        "  lightning-quant recipe=resnet20_qat_cifar10 ckpt_path=last        # resume an interrupted QAT run",
        "",
        "Settings: quant.options.<switch>=true (replace_relu6, cross_layer_equalization, range_search,",
        "bias_correction, adaround, fast_finetune), quant.scheme.<weight|activation>_<field>=..., data.root=...,",
        "model.model.weights_path=..., logger=csv|tensorboard|wandb|mlflow|none.",
        "`lightning-quant recipe=<name> --cfg job` prints every key of a run; `--hydra-help` shows Hydra's own flags",
        "(multirun -m, sweeps). Documentation: docs/app.md.",
        f"Your own recipes: LIGHTNING_QUANT_RECIPES=<folder holding recipe/*.yaml> (built-in: {recipes_dir}).",
    ]
    return "\n".join(lines)
