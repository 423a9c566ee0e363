"""Structural sweep of model zoos: prepare -> calibrate -> ONNX -> onnxruntime parity, plus TorchScript.

torchvision's classification models by name, and (``timm:<name>``) one model per architecture family of timm, the
model zoo vision users fine-tune most (hybrid conv/attention nets, re-parameterized nets, positional encodings,
multi-branch mobile nets); timm is an optional test dependency.

Each model is built with random weights (no download), made numerically lively (BatchNorm statistics
re-estimated on the random data, zero-initialized heads re-drawn, so outputs are not constant and the parity
check means something), quantized for ``target``, exported to INT8 QDQ ONNX and run with onnxruntime against
the fake-quant model on held-out random batches. Every model ends in a :class:`ZooResult` with a status:

* ``quantized``: every conv/linear layer is quantized and the ONNX file agrees with the model;
* ``partial``: the file agrees, some layers or ops stay float (``float_summary`` says which kinds and why);
* ``failed: <stage>``: a stage raised or the check failed; ``error`` says why (the sweep goes on).

"Agrees" means top-1 agreement >= ``min_top1_agreement`` (near-tie flips excused, as in ``verify_export``), or,
when it is lower, that the ONNX output stays closer to the fake-quant output than the fake-quant output is to
the float model (SQNR). Random-weight networks have logit margins far below one rounding step's effect: a 1e-6
relative change of the input alone moves a random ResNet50's INT8 logits by ~23 dB SQNR and flips top-1
(measured), so float summation order in onnxruntime flips classes without anything being wrong. A structural
error (a missing requantization, a wrong op or layout) pushes the SQNR towards 0 dB and fails.

Example:
    >>> result = check_zoo_model("mobilenet_v3_small", image_size=64, batch_size=2, batches=1)  # doctest: +SKIP
    >>> result.status, result.quantized_layers == result.weight_layers  # doctest: +SKIP
    ('quantized', True)
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.api import quantize
from lightning_quant.export.onnx import export_onnx
from lightning_quant.export.torchscript import export_torchscript
from lightning_quant.export.verify import load_runner, runs_on_cpu_int8_kernels, verify_export
from lightning_quant.models.torchvision_zoo import torchvision_model
from lightning_quant.quantizers.functional import sqnr_db
from lightning_quant.quantizers.prepare import iter_quantizers, prepare_info

__all__ = [
    "TIMM_SWEEP_MODELS",
    "ZOO_SWEEP_MODELS",
    "ZooResult",
    "build_zoo_model",
    "check_zoo_model",
    "liven_random_model",
    "zoo_table",
]

#: The models of the torchvision sweep table in docs/model-coverage.md (one or two per torchvision family).
ZOO_SWEEP_MODELS = (
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "mnasnet1_0",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "densenet121",
    "googlenet",
    "inception_v3",
    "alexnet",
    "vgg11_bn",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "maxvit_t",
)

#: One small model per timm family (``timm:<name>``; random weights, nothing downloaded).
TIMM_SWEEP_MODELS = (
    "timm:convnext_atto",  # ConvNeXt: depthwise 7x7, LayerNorm, GELU
    "timm:edgenext_xx_small",  # hybrid conv/attention with a Fourier positional encoding from a coordinate grid
    "timm:mobilevit_xxs",  # MobileViT: conv stem, transformer blocks on unfolded patches
    "timm:fastvit_t8",  # FastViT: re-parameterizable MobileOne-style blocks, RepCPE positional encoding
    "timm:repvgg_a0",  # RepVGG: three-branch training-time blocks
    "timm:ghostnet_050",  # GhostNet: cheap-operation concat branches
    "timm:efficientformerv2_s0",  # EfficientFormerV2: attention with conv projections
    "timm:levit_128s",  # LeViT: attention with BatchNorm'd linear layers
    "timm:vit_tiny_patch16_224",  # ViT: patch embedding, class token, MHA from nn.Linear
    "timm:resnet18d",  # ResNet-D: deep stem, average-pool shortcut
)

#: Input sizes the architectures require (others take any size; the sweep's default is 224).
_FIXED_SIZES = {
    "vit_b_16": 224,
    "maxvit_t": 224,
    "inception_v3": 299,
    "timm:vit_tiny_patch16_224": 224,
    "timm:levit_128s": 224,
    "timm:efficientformerv2_s0": 224,
    "timm:mobilevit_xxs": 256,
}
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class ZooResult:
    """Outcome of one model's trip through the pipeline."""

    model: str
    status: str
    weight_layers: int = 0
    quantized_layers: int = 0
    activation_quantizers: int = 0
    float_summary: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    top1_agreement: float | None = None
    near_tie_flips: int | None = None
    max_diff_steps: float | None = None
    quant_sqnr_db: float | None = None
    artefact_sqnr_db: float | None = None
    torchscript_sqnr_db: float | None = None
    onnx_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def liven_random_model(model: nn.Module, batches: list[torch.Tensor], seed: int = 0) -> nn.Module:
    """Make a randomly initialized model's outputs depend on its input (in place; returns it in eval mode).

    torchvision zero-initializes some heads (ViT, Swin, ...) and random conv stacks drift so far from the
    BatchNorm running statistics (mean 0, variance 1) that activations vanish or explode. Zero-filled
    conv/linear weights are redrawn (std 0.02) and every BatchNorm's running statistics are re-estimated on
    ``batches`` with a cumulative average, which is what a trained network's statistics look like to the
    quantizer.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _WEIGHT_LAYERS) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        if norms:
            model.train()
            for batch in batches:
                model(batch)
    return model.eval()


def _float_summary(float_layers: dict[str, str], untraced: dict[str, str]) -> dict[str, str]:
    """``{reason: count x}`` over layers kept float, so 12 attention blocks read as one line."""
    counts = Counter(float_layers.values())
    counts.update(f"not traced as a graph: {why}" for why in untraced.values())
    return {reason: f"{count}x" for reason, count in counts.most_common()}


def build_zoo_model(name: str) -> nn.Module:
    """A random-weight model: ``timm:<name>`` from timm (an optional dependency), else torchvision's ``name``.

    Raises:
        ModuleNotFoundError: ``timm:`` without timm installed (the message names the install).
    """
    if not name.startswith("timm:"):
        return torchvision_model(name, weights=None)
    try:
        import timm  # optional backend: only the wider sweep needs it
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{name} needs timm: pip install timm (the [dev] extra installs it).") from err
    return timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()


def check_zoo_model(
    name: str,
    *,
    image_size: int = 224,
    batch_size: int = 4,
    batches: int = 2,
    target: str = "x86",
    seed: int = 0,
    workdir: str | Path | None = None,
    min_top1_agreement: float = 0.99,
) -> ZooResult:
    """Run torchvision model ``name`` (random weights) through quantize -> export_onnx -> verify_export.

    Args:
        name: a torchvision classification model name (``torchvision.models.list_models``), or ``timm:<name>``.
        image_size: input height/width; models with a fixed input size (ViT, MaxViT, Inception v3) use theirs.
        batch_size: samples per batch.
        batches: calibration batches; the same number of different batches checks the ONNX file.
        target: quantization target (``x86`` or ``tensorrt``; ONNX QDQ cannot express ``dpu``'s rounding).
        seed: seeds the weights and the random inputs.
        workdir: where the ONNX file is written (a temporary folder by default, removed afterwards).
        min_top1_agreement: top-1 agreement that passes outright (otherwise the SQNR comparison decides).

    Returns:
        A :class:`ZooResult`; failures are recorded in it, never raised.
    """
    start = time.perf_counter()
    result = ZooResult(model=name, status="failed: build")
    size = _FIXED_SIZES.get(name, image_size)
    stage = "build"
    try:
        torch.manual_seed(seed)
        model = build_zoo_model(name)
        generator = torch.Generator().manual_seed(seed + 1)
        data = [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(2 * batches)]
        calibration, held_out = data[:batches], data[batches:]
        liven_random_model(model, calibration, seed)
        result.weight_layers = sum(isinstance(m, _WEIGHT_LAYERS) for m in model.modules())
        stage = "quantize"
        qmodel = quantize(model, calibration, target=target, progress=False)
        info = prepare_info(qmodel)
        result.quantized_layers = len(info.quantized_layers)
        result.activation_quantizers = sum(1 for n, _ in iter_quantizers(qmodel) if not n.endswith("weight_fake_quant"))
        result.float_summary = _float_summary(info.float_layers, info.untraced)
        modules = dict(model.named_modules())
        listed = sum(isinstance(modules.get(n), _WEIGHT_LAYERS) for n in info.float_layers)
        unused = result.weight_layers - result.quantized_layers - listed
        if unused > 0:  # GoogLeNet's / Inception's auxiliary heads (training only), Swin's attention (F.linear)
            reason = "conv/linear modules never called as layers (training-only aux heads, or weights read by F.linear)"
            result.float_summary[reason] = f"{unused}x"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(workdir or tmp) / f"{name}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            stage = "export"
            export_onnx(qmodel, path, calibration[0], verify=False)
            result.onnx_bytes = path.stat().st_size
            stage = "liveness"
            with torch.no_grad():
                expected = torch.cat([qmodel(b) for b in held_out]).float()
                reference = torch.cat([model(b) for b in held_out]).float()
            if expected.std(dim=0).max() == 0:
                result.status = f"failed: {stage}"
                result.error = "outputs do not depend on the input (random weights collapsed); the check would be void"
                return result
            stage = "parity"
            report = verify_export(qmodel, path, held_out, latency_runs=0, min_top1_agreement=0.0)
            run = load_runner(path, int8_kernels=runs_on_cpu_int8_kernels(qmodel))
            got = torch.cat([torch.as_tensor(run(b)) for b in held_out]).float()
            stage = "torchscript"
            export_torchscript(qmodel, path.with_suffix(".pt"), calibration[0], verify=False)
            scripted = torch.jit.load(str(path.with_suffix(".pt")))
            with torch.no_grad():
                traced = torch.cat([scripted(b) for b in held_out]).float()
            result.torchscript_sqnr_db = round(sqnr_db(expected, traced), 1)
        result.samples = report.num_samples
        result.top1_agreement = report.top1_agreement
        result.near_tie_flips = report.near_tie_flips
        result.max_diff_steps = report.max_diff_steps
        result.quant_sqnr_db = round(sqnr_db(reference, expected), 1)
        result.artefact_sqnr_db = round(sqnr_db(expected, got), 1)
        if result.torchscript_sqnr_db < result.quant_sqnr_db:
            result.status = "failed: torchscript"
            result.error = (
                f"the TorchScript file's output SQNR against the fake-quant model ({result.torchscript_sqnr_db} dB) is "
                f"below the quantization's own SQNR ({result.quant_sqnr_db} dB)"
            )
            return result
        if report.tolerant_agreement < min_top1_agreement and result.artefact_sqnr_db < result.quant_sqnr_db:
            result.status = f"failed: {stage}"
            result.error = (
                f"ONNX top-1 agreement {report.top1_agreement:.0%} and its output SQNR against the fake-quant model "
                f"({result.artefact_sqnr_db} dB) is below the quantization's own SQNR ({result.quant_sqnr_db} dB)"
            )
            return result
        complete = result.quantized_layers == result.weight_layers and not result.float_summary
        result.status = "quantized" if complete else "partial"
    except Exception as err:  # noqa: BLE001 - the sweep records every failure and goes on
        result.status = f"failed: {stage}"
        result.error = f"{type(err).__name__}: {err}".strip()[:600] + "\n" + traceback.format_exc(limit=-3)
    finally:
        result.seconds = round(time.perf_counter() - start, 1)
    return result


def zoo_table(results: list[ZooResult]) -> str:
    """Markdown table: model, quantized layers / total, ONNX top-1 agreement, status, what stays float."""
    lines = [
        "| model | quantized conv/linear | activation quantizers | ORT top-1 agreement | SQNR ORT vs model / model "
        "vs float (dB) | SQNR TorchScript vs model (dB) | status | kept float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        agreement = "-" if r.top1_agreement is None else f"{r.top1_agreement:.0%} of {r.samples}"
        if r.near_tie_flips:
            agreement += f" ({r.near_tie_flips} near-tie)"
        sqnr = "-" if r.artefact_sqnr_db is None else f"{r.artefact_sqnr_db:.1f} / {r.quant_sqnr_db:.1f}"
        kept = "; ".join(f"{count} {reason}" for reason, count in r.float_summary.items()) or "-"
        script = "-" if r.torchscript_sqnr_db is None else f"{r.torchscript_sqnr_db:.1f}"
        status = r.status if not r.error or r.status in ("quantized", "partial") else f"{r.status} ({r.error[:80]})"
        lines.append(
            f"| {r.model} | {r.quantized_layers}/{r.weight_layers} | {r.activation_quantizers} | {agreement} "
            f"| {sqnr} | {script} | {status} | {kept} |"
        )
    return "\n".join(lines)
