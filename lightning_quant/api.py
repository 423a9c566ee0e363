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

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from lightning_quant.calibration import calibrate
from lightning_quant.config import QuantMode, QuantScheme, Target, scheme_for_target
from lightning_quant.quantizers.prepare import prepare

__all__ = ["quantize"]


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
) -> nn.Module:
    """Post-training quantization: prepare a copy of ``model``, calibrate it, return the fake-quant model.

    The input model is left untouched. The result evaluates like the original (``qmodel(x)`` gives the
    fake-quant output) and is what the exporters take.

    Args:
        model: float model (put it in eval mode with trained weights).
        calibration_data: iterable of batches; 256-1024 images drawn from the training split are typical.
        transform_fn: maps one item of ``calibration_data`` to the model input (default: first element of
            ``(input, label)`` pairs, else the item).
        target: ``x86``, ``tensorrt`` or ``dpu``; picks the default scheme.
        scheme: explicit scheme; overrides ``target``'s defaults.
        num_batches: calibrate on at most this many batches.
        exclude: glob patterns of layer names to keep in float.
        progress: show a progress bar.

    Raises:
        ValueError: unknown target, empty calibration data, or batches the model cannot take.
        NothingToQuantizeError: no Conv/Linear layer found.
    """
    scheme = scheme or scheme_for_target(target, QuantMode.PTQ)
    qmodel = prepare(model, scheme, mode=QuantMode.PTQ, exclude=exclude)
    calibrate(qmodel, calibration_data, transform_fn=transform_fn, num_batches=num_batches, progress=progress)
    return qmodel
