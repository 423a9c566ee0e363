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
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from lightning_quant.algorithms.post_calibration import apply_network_transforms, refine_calibrated
from lightning_quant.calibration import calibrate
from lightning_quant.config import (
    QuantMode,
    QuantOptions,
    QuantScheme,
    Target,
    options_from_keywords,
    resolve_scheme,
)
from lightning_quant.quantizers.config_record import record_options
from lightning_quant.quantizers.prepare import prepare

__all__ = ["float_model_for_quantization", "quantize"]


def float_model_for_quantization(model: nn.Module, options: QuantOptions | None = None) -> nn.Module:
    """The float network :func:`quantize` inserts quantizers into: ``model`` itself, or (when ``options`` switch on
    a network transform: ``replace_relu6``, ``cross_layer_equalization``) a transformed copy; the input model is
    never modified.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6())
        >>> swapped = float_model_for_quantization(net, QuantOptions(replace_relu6=True))
        >>> float_model_for_quantization(net) is net, swapped[1], net[1]
        (True, ReLU(), ReLU6())

    Raises:
        ValueError: (with ``cross_layer_equalization``) a BatchNorm in training mode or a model torch.fx cannot trace.
    """
    if options is None or not options.network_transforms:
        return model
    model = copy.deepcopy(model)
    apply_network_transforms(model, options)
    return model


def quantize(
    model: nn.Module,
    calibration_data: Iterable[Any],
    transform_fn: Callable[[Any], Any] | None = None,
    target: Target | str | None = None,
    *,
    scheme: QuantScheme | None = None,
    options: QuantOptions | None = None,
    num_batches: int | None = None,
    exclude: Iterable[str | type[nn.Module]] = (),
    progress: bool = True,
    layer_weight_bits: Mapping[str, int] | None = None,
    **deprecated_options: Any,
) -> nn.Module:
    """Post-training quantization: prepare a copy of ``model``, calibrate it, refine it, return the fake-quant model.

    The input model is left untouched. The result evaluates like the original (``qmodel(x)`` gives the
    fake-quant output) and is what the exporters take. Its ``state_dict()`` carries the scheme and options, so a
    copy quantized another way refuses to load it.

    Example:
        >>> import torch
        >>> from lightning_quant import QuantOptions
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 3)).eval()
        >>> data = [torch.randn(4, 3, 16, 16) for _ in range(4)]
        >>> opts = QuantOptions(replace_relu6=True, cross_layer_equalization=True, bias_correction=True)
        >>> qmodel = quantize(net, data, target="tensorrt", options=opts, progress=False)

    Args:
        model: float model (put it in eval mode with trained weights).
        calibration_data: iterable of batches; 256-1024 images drawn from the training split are typical.
        transform_fn: maps one item of ``calibration_data`` to the model input (default: first element of
            ``(input, label)`` pairs, else the item).
        target: ``x86`` (the default), ``x86_vnni``, ``tensorrt`` or ``dpu``; picks the default scheme. For ``dpu``
            the calibrated fix positions are then adjusted to the DPU's shift constraints
            (:func:`~lightning_quant.quantizers.dpu_shifts.enforce_dpu_shifts`; a warning lists any change).
        scheme: explicit scheme; its ``target`` is the target (a contradicting ``target=`` is an error).
        options: what runs around calibration (:class:`~lightning_quant.config.QuantOptions`: ReLU6 to ReLU,
            cross-layer equalization, range search, bias correction, AdaRound, fast finetune); default none.
        num_batches: calibrate on at most this many batches.
        exclude: layers to keep in float: glob patterns of layer names (``"classifier.*"``) and/or ``nn.Module``
            types (``nn.Linear``).
        progress: show a progress bar.
        layer_weight_bits: ``{glob pattern: bits}``: other weight widths for matching layers, e.g.
            ``{"conv1": 8}`` in a W4A8 model (see :func:`~lightning_quant.quantizers.prepare`).
        **deprecated_options: the option switches as keyword arguments (``bias_correction=True``, ...), as older
            releases took them; they still work for one release, with a ``DeprecationWarning`` showing the
            ``options=QuantOptions(...)`` call.

    Warns:
        UserWarning: ``model`` is in training mode (it is calibrated as in eval mode; the result is in eval mode).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``options`` or ``scheme`` of the wrong type, an unknown
            keyword, or ``options=`` together with option keywords; an ``exclude`` entry that is neither a string
            nor an ``nn.Module`` type.
        ValueError: a model with tensors on the ``meta`` device, unknown target, a ``target`` that contradicts
            ``scheme.target``, empty calibration data, batches the model cannot take, (with
            ``cross_layer_equalization``) a BatchNorm in training mode or a model torch.fx cannot trace, or
            ``range_search`` with activations that use neither the ``percentile`` estimator nor power-of-two scales.
        NothingToQuantizeError: no Conv/Linear layer found.
        NotCalibratedError: (with a refinement) calibration reached no quantizer.
    """
    options = options_from_keywords(options, deprecated_options, "quantize")
    scheme = resolve_scheme(target, scheme, QuantMode.PTQ)
    options = options.resolved(QuantMode.PTQ, scheme.target)
    options.check_scheme(scheme)
    _check_model(model)
    model = float_model_for_quantization(model, options)
    qmodel = prepare(model, scheme, mode=QuantMode.PTQ, exclude=exclude, layer_weight_bits=layer_weight_bits)
    record_options(qmodel, options)
    calibrate(qmodel, calibration_data, transform_fn=transform_fn, num_batches=num_batches, progress=progress)
    refine_calibrated(
        qmodel,
        calibration_data,
        options,
        target=scheme.target,
        transform_fn=transform_fn,
        num_batches=num_batches,
        progress=progress,
    )
    return qmodel.eval()


def _check_model(model: nn.Module) -> None:
    """Fail on a model calibration cannot run (meta tensors); warn about a model in training mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() takes an nn.Module, got {type(model).__name__}.")
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise ValueError(
            "the model holds tensors on the 'meta' device (built under torch.device('meta') or with lazy init): "
            "they have no values to calibrate. Load its weights first, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(torch.load(path, weights_only=True)), and pass that model."
        )
    if model.training:
        warnings.warn(
            "quantize() got a model in training mode: BatchNorm statistics and dropout would change calibration. "
            "It calibrates the model as in model.eval() and returns the quantized model in eval mode; call "
            "model.eval() before quantize() to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
