"""Plain-Python PTQ: ``quantize(model, calibration_data)`` without a Trainer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> data = [(torch.randn(4, 3, 16, 16), torch.zeros(4)) for _ in range(4)]
    >>> qmodel = quantize(model, data, target="x86", progress=False)
    >>> x = torch.randn(1, 3, 16, 16)
    >>> bool((qmodel(x) - model(x)).abs().max() < 0.1)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from lightning_quant.algorithms.post_calibration import check_adaround_options, refine_calibrated
from lightning_quant.calibration import calibrate
from lightning_quant.config import QuantMode, QuantScheme, Target, scheme_for_target
from lightning_quant.quantizers.prepare import prepare

__all__ = ["float_model_for_quantization", "quantize"]


def float_model_for_quantization(
    model: nn.Module, *, cross_layer_equalization: bool = False, replace_relu6: bool = False
) -> nn.Module:
    """The float network :func:`quantize` inserts quantizers into: ``model`` itself, or a copy with its ReLU6
    modules swapped for ReLU and/or its layer pairs equalized (the input model is never modified).

    Raises:
        ValueError: (with ``cross_layer_equalization``) a BatchNorm in training mode or a model torch.fx cannot trace.
    """
    if not (cross_layer_equalization or replace_relu6):
        return model
    from lightning_quant.algorithms.cle import equalize, relu6_to_relu

    model = copy.deepcopy(model)
    if replace_relu6:
        relu6_to_relu(model)
    if cross_layer_equalization:
        equalize(model)
    return model


def quantize(
    model: nn.Module,
    calibration_data: Iterable[Any],
    transform_fn: Callable[[Any], Any] | None = None,
    target: Target | str = Target.X86,
    *,
    scheme: QuantScheme | None = None,
    num_batches: int | None = None,
    exclude: Iterable[str] = (),
    progress: bool = True,
    cross_layer_equalization: bool = False,
    range_search: bool = False,
    bias_correction: bool = False,
    fast_finetune: bool = False,
    adaround: bool = False,
    adaround_per_sample: bool = False,
    replace_relu6: bool = False,
    layer_weight_bits: Mapping[str, int] | None = None,
) -> nn.Module:
    """Post-training quantization: prepare a copy of ``model``, calibrate it, return the fake-quant model.

    The input model is left untouched. The result evaluates like the original (``qmodel(x)`` gives the
    fake-quant output) and is what the exporters take.

    Args:
        model: float model (put it in eval mode with trained weights).
        calibration_data: iterable of batches; 256-1024 images drawn from the training split are typical.
        transform_fn: maps one item of ``calibration_data`` to the model input (default: first element of
            ``(input, label)`` pairs, else the item).
        target: ``x86``, ``tensorrt`` or ``dpu``; picks the default scheme. For ``dpu`` the calibrated fix
            positions are then adjusted to the DPU's shift constraints
            (:func:`~lightning_quant.quantizers.dpu_shifts.enforce_dpu_shifts`; a warning lists any change).
        scheme: explicit scheme; overrides ``target``'s defaults.
        num_batches: calibrate on at most this many batches.
        exclude: glob patterns of layer names to keep in float.
        progress: show a progress bar.
        cross_layer_equalization: run :func:`lightning_quant.algorithms.equalize` (with bias absorption) on a copy
            of the float model first; pairs through a ReLU6 are left as they are (see ``docs/algorithms.md``).
        range_search: after calibration, choose the activation clipping percentile of each group (branch outputs,
            residual sums, other ReLU outputs) that keeps the output closest to float on the first
            ``min(num_batches, 4)`` batches (:func:`lightning_quant.algorithms.search_activation_ranges`; needs the
            ``percentile`` activation estimator, or power-of-two scales: with ``target="dpu"`` it shifts each group's
            fix positions instead). ResNets need it: their residual-branch outputs want far more clipping than ReLU
            outputs.
        bias_correction: after calibration, run :func:`lightning_quant.algorithms.correct_bias` (empirical bias
            correction) on the first ``min(num_batches, 4)`` batches; for ``dpu`` before the shift constraints.
        fast_finetune: after calibration (and bias correction), run :func:`lightning_quant.algorithms.fast_finetune`
            (AdaQuant, Vitis AI's ``--fast_finetune``) with its defaults on the same batches. Weight scales stay
            as calibrated: the weights are tuned to that grid (see ``docs/algorithms.md``).
        adaround: after calibration (and bias correction), learn each weight's rounding direction layer by layer
            (:func:`lightning_quant.algorithms.adaround`, Nagel et al. 2020) on the same batches; before
            ``fast_finetune`` when both are on. Worth it at 4-6 bit weights.
        adaround_per_sample: with ``adaround``, weigh every calibration image's layer output error the same (each
            divided by its float output's power) instead of pooling them, so a few images with huge activations
            do not decide the rounding for the rest (ResNet50 on Imagenette; see ``docs/algorithms.md``).
        replace_relu6: swap every ``nn.ReLU6`` for ``nn.ReLU`` on a copy of the model first
            (:func:`lightning_quant.algorithms.relu6_to_relu`): cross-layer equalization can then pair the layers
            around them (MobileNetV2 per-tensor needs it) and the DPU runs ReLU natively. It changes the float
            function where activations exceed 6; measure the float model with the same swap if that matters.
        layer_weight_bits: ``{glob pattern: bits}``: other weight widths for matching layers, e.g.
            ``{"conv1": 8}`` in a W4A8 model (see :func:`~lightning_quant.quantizers.prepare`).

    Raises:
        ValueError: unknown target, empty calibration data, batches the model cannot take, (with
            ``cross_layer_equalization``) a BatchNorm in training mode or a model torch.fx cannot trace, or (with
            ``range_search``) activations with neither the ``percentile`` estimator nor power-of-two scales, or
            ``adaround_per_sample`` without ``adaround``.
        NothingToQuantizeError: no Conv/Linear layer found.
        NotCalibratedError: (with ``bias_correction``/``adaround``/``fast_finetune``) calibration reached no quantizer.
    """
    check_adaround_options(adaround, adaround_per_sample)
    scheme = scheme or scheme_for_target(target, QuantMode.PTQ)
    model = float_model_for_quantization(
        model, cross_layer_equalization=cross_layer_equalization, replace_relu6=replace_relu6
    )
    qmodel = prepare(model, scheme, mode=QuantMode.PTQ, exclude=exclude, layer_weight_bits=layer_weight_bits)
    calibrate(qmodel, calibration_data, transform_fn=transform_fn, num_batches=num_batches, progress=progress)
    refine_calibrated(
        qmodel,
        calibration_data,
        range_search=range_search,
        bias_correction=bias_correction,
        fast_finetune=fast_finetune,
        adaround=adaround,
        adaround_per_sample=adaround_per_sample,
        target=scheme.target,
        transform_fn=transform_fn,
        num_batches=min(num_batches or 4, 4),
        progress=progress,
    )
    return qmodel
