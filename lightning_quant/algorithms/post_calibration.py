"""What runs after calibration, in one place for ``quantize()`` and ``QuantCallback``: the activation range search,
bias correction, the DPU's shift constraints, AdaRound (learned weight rounding), then fast finetune (AdaQuant, Vitis
AI's ``--fast_finetune``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    >>> qmodel = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), data, progress=False)
    >>> refine_calibrated(qmodel, data, bias_correction=True, progress=False)
    ['bias_correction']
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_quant.config import Target
from lightning_quant.quantizers.prepare import prepare_info

__all__ = ["REFINEMENT_STEPS", "check_adaround_options", "record_refinements", "refine_calibrated"]

# the flags that name a step, in the order they run (QuantCallback's flags and checkpoint state keys too)
REFINEMENT_STEPS = ("range_search", "bias_correction", "adaround", "fast_finetune")


def check_adaround_options(adaround: bool, adaround_per_sample: bool) -> None:
    """``adaround_per_sample`` only means something with ``adaround``.

    Raises:
        ValueError: ``adaround_per_sample`` without ``adaround``, naming the fix.
    """
    if adaround_per_sample and not adaround:
        raise ValueError(
            "adaround_per_sample=True changes how AdaRound weighs the calibration images, but adaround is off; set "
            "adaround=True too (recipes: quant.adaround=true) or drop adaround_per_sample."
        )


def refine_calibrated(
    qmodel: nn.Module,
    calibration_data: Iterable[Any],
    *,
    range_search: bool = False,
    bias_correction: bool = False,
    fast_finetune: bool = False,
    adaround: bool = False,
    adaround_per_sample: bool = False,
    target: Target | str | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 4,
    progress: bool = True,
) -> list[str]:
    """Refine a calibrated PTQ model in place; returns the steps that ran, in order.

    ``adaround_per_sample`` runs AdaRound with ``per_sample=True`` (every calibration image's output error weighs
    the same; see :func:`~lightning_quant.algorithms.adaround`).

    Order: the activation range search (:func:`~lightning_quant.algorithms.search_activation_ranges`), bias
    correction, then (``target="dpu"``) the DPU's shift constraints, then AdaRound, then fast
    finetune, so that rounding and tuning see the final, frozen scales.

    Raises:
        NotCalibratedError: (range search / bias correction / AdaRound / fast finetune) the model was not calibrated.
        ValueError: a QAT model or a model ``prepare()`` did not produce (named by the algorithm); range search
            with another activation estimator than ``percentile``; ``adaround_per_sample`` without ``adaround``.
    """
    check_adaround_options(adaround, adaround_per_sample)
    tune = dict(transform_fn=transform_fn, num_batches=num_batches, progress=progress)
    # Lightning calls the callback inside ``torch.inference_mode()`` (validate/test); fast finetune needs autograd and
    # tensors it can save for backward, so leave inference mode for the refinement.
    with torch.inference_mode(False):
        flags = dict(
            range_search=range_search, bias_correction=bias_correction, adaround=adaround, fast_finetune=fast_finetune,
            adaround_per_sample=adaround_per_sample,
        )  # fmt: skip
        steps = _refine(qmodel, calibration_data, flags, target, tune)
    record_refinements(qmodel, steps)
    return steps


def record_refinements(qmodel: nn.Module, steps: Iterable[str]) -> None:
    """Note ``steps`` in the model's :class:`~lightning_quant.quantizers.prepare.PrepareInfo` (exporters read it,
    e.g. ``quant_info.json``'s ``bias_corrected``); a model ``prepare()`` did not produce is left as it is."""
    try:
        info = prepare_info(qmodel)
    except ValueError:
        return
    info.refinements.extend(s for s in steps if s not in info.refinements)


def _refine(
    qmodel: nn.Module, calibration_data: Iterable[Any], flags: dict[str, bool], target: Target | str | None,
    tune: dict[str, Any],
) -> list[str]:  # fmt: skip
    steps = []
    if flags["range_search"]:
        from lightning_quant.algorithms.range_search import search_activation_ranges

        search_activation_ranges(qmodel, calibration_data, **tune)
        steps.append("range_search")
    if flags["bias_correction"]:
        from lightning_quant.algorithms.bias_correction import correct_bias

        correct_bias(qmodel, calibration_data, **tune)
        steps.append("bias_correction")
    if target is not None and Target(target) is Target.DPU:
        _enforce_dpu_shifts(qmodel)
        steps.append("dpu_shifts")
    if flags["adaround"]:
        from lightning_quant.algorithms.adaround import adaround as _adaround

        _adaround(qmodel, calibration_data, per_sample=flags["adaround_per_sample"], **tune)
        steps.append("adaround")
    if flags["fast_finetune"]:
        from lightning_quant.algorithms.adaquant import fast_finetune as _fast_finetune

        _fast_finetune(qmodel, calibration_data, **tune)
        steps.append("fast_finetune")
    return steps


def _enforce_dpu_shifts(qmodel: nn.Module) -> None:
    """Make the calibrated positions satisfy the DPU's shift constraints, warning about every change."""
    from lightning_quant.quantizers.dpu_shifts import enforce_dpu_shifts

    moved = enforce_dpu_shifts(qmodel)
    if moved:
        lines = ", ".join(f"{a.quantizer} {a.old_fix_pos}->{a.new_fix_pos} ({a.reason})" for a in moved)
        warnings.warn(f"DPU shift constraints moved {len(moved)} fix position(s): {lines}.", stacklevel=3)
