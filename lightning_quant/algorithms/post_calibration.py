"""What :class:`~lightning_quant.config.QuantOptions` switch on, in one place for ``quantize()``,
``QuantCallback`` and checkpoint loading: the float-network transforms before quantizers are inserted (ReLU6 to
ReLU, cross-layer equalization), then after calibration the activation range search, bias correction, the DPU's
shift constraints, AdaRound (learned weight rounding) and fast finetune (AdaQuant, Vitis AI's ``--fast_finetune``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import QuantOptions, quantize
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    >>> qmodel = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), data, progress=False)
    >>> refine_calibrated(qmodel, data, QuantOptions(bias_correction=True), progress=False)
    ['bias_correction']
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_quant.algorithms.adaquant import fast_finetune
from lightning_quant.algorithms.adaround import adaround
from lightning_quant.algorithms.bias_correction import correct_bias
from lightning_quant.algorithms.cle import equalize, relu6_to_relu
from lightning_quant.algorithms.range_search import search_activation_ranges
from lightning_quant.config import REFINEMENT_STEPS, QuantMode, QuantOptions, Target
from lightning_quant.quantizers.config_record import record_refinement_steps
from lightning_quant.quantizers.dpu_concat import align_concat_positions
from lightning_quant.quantizers.dpu_shifts import enforce_dpu_shifts
from lightning_quant.quantizers.prepare import prepare_info

__all__ = ["REFINEMENT_STEPS", "apply_network_transforms", "record_refinements", "refine_calibrated"]


def apply_network_transforms(network: nn.Module, options: QuantOptions) -> list[str]:
    """Apply the options' float-network transforms to ``network`` in place (ReLU6 to ReLU, then cross-layer
    equalization); returns one line per transform that ran, for the log.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
        >>> apply_network_transforms(net, QuantOptions(replace_relu6=True, cross_layer_equalization=True))
        ['1 ReLU6 modules replaced by ReLU', 'cross-layer equalization of 1 layer pairs']

    The network runs the transforms in eval mode (BatchNorm statistics are folded) and comes back in its own mode.

    Raises:
        ValueError: (``cross_layer_equalization``) a network torch.fx cannot trace.
    """
    done = []
    was_training = network.training
    network.eval()  # equalization folds BatchNorm statistics: a QAT network arrives in training mode
    try:
        if options.replace_relu6:
            done.append(f"{len(relu6_to_relu(network))} ReLU6 modules replaced by ReLU")
        if options.cross_layer_equalization:
            done.append(f"cross-layer equalization of {len(equalize(network).pairs)} layer pairs")
    finally:
        network.train(was_training)
    return done


def refine_calibrated(
    qmodel: nn.Module,
    calibration_data: Iterable[Any],
    options: QuantOptions | None = None,
    *,
    target: Target | str | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Refine a calibrated PTQ model in place with the refinements ``options`` switch on; returns the steps that
    ran, in order.

    Order: the activation range search (:func:`~lightning_quant.algorithms.search_activation_ranges`), bias
    correction, then (``target="dpu"``) the DPU's shift constraints, then AdaRound, then fast
    finetune, so that rounding and tuning see the final, frozen scales. They use the first
    ``min(num_batches, options.refinement_batches)`` batches.

    Raises:
        NotCalibratedError: (range search / bias correction / AdaRound / fast finetune) the model was not calibrated.
        ValueError: a QAT model or a model ``prepare()`` did not produce (named by the algorithm); range search
            with another activation estimator than ``percentile``.
    """
    options = (options or QuantOptions()).resolved(QuantMode.PTQ, target)
    limit = options.refinement_batches if num_batches is None else min(num_batches, options.refinement_batches)
    tune = dict(transform_fn=transform_fn, num_batches=limit, progress=progress)
    # Lightning calls the callback inside ``torch.inference_mode()`` (validate/test); fast finetune needs autograd and
    # tensors it can save for backward, so leave inference mode for the refinement.
    with torch.inference_mode(False):
        steps = _refine(qmodel, calibration_data, options, target, tune)
    record_refinements(qmodel, steps)
    return steps


def record_refinements(qmodel: nn.Module, steps: Iterable[str]) -> None:
    """Note ``steps`` in the model's :class:`~lightning_quant.quantizers.prepare.PrepareInfo` (exporters read it,
    e.g. ``quant_info.json``'s ``bias_corrected``) and in its saved config record; a model ``prepare()`` did not
    produce is left as it is."""
    steps = list(steps)
    try:
        info = prepare_info(qmodel)
    except ValueError:
        return
    info.refinements.extend(s for s in steps if s not in info.refinements)
    record_refinement_steps(qmodel, steps)


def _refine(
    qmodel: nn.Module, calibration_data: Iterable[Any], options: QuantOptions, target: Target | str | None,
    tune: dict[str, Any],
) -> list[str]:  # fmt: skip
    steps = []
    if options.range_search:
        search_activation_ranges(qmodel, calibration_data, **tune)
        steps.append("range_search")
    if options.bias_correction:
        correct_bias(qmodel, calibration_data, **tune)
        steps.append("bias_correction")
    if target is not None and Target(target) is Target.DPU:
        _enforce_dpu_shifts(qmodel)
        steps.append("dpu_shifts")
    if options.adaround:
        adaround(qmodel, calibration_data, per_sample=options.adaround_per_sample, **tune)
        steps.append("adaround")
    if options.fast_finetune:
        fast_finetune(qmodel, calibration_data, **tune)
        steps.append("fast_finetune")
    return steps


def _enforce_dpu_shifts(qmodel: nn.Module) -> None:
    """Make the calibrated positions satisfy the DPU's shift constraints, warning about every change."""
    align_concat_positions(qmodel)  # Vitis AI's concat rule first; the shift moves below keep concats aligned
    moved = enforce_dpu_shifts(qmodel)
    if moved:
        lines = ", ".join(f"{a.quantizer} {a.old_fix_pos}->{a.new_fix_pos} ({a.reason})" for a in moved)
        warnings.warn(f"DPU shift constraints moved {len(moved)} fix position(s): {lines}.", stacklevel=3)
