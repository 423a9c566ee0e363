"""Layer-by-layer helpers shared by bias correction and fast finetuning: find the weight layers of a calibrated
fake-quant model, feed a bounded set of batches, and stop each forward pass as soon as a hooked layer has run.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> qmodel = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval(),
    ...                   [torch.randn(2, 3, 8, 8)], progress=False)
    >>> inputs = bounded_inputs([torch.randn(2, 3, 8, 8)] * 3, None, 2, qmodel, "demo")
    >>> execution_order(qmodel, weight_layers(qmodel, "demo"), inputs[0])
    ['0', '2']
    >>> tuple(capture_layer(qmodel, qmodel.get_submodule("2"), inputs, max_samples=3, what="input").shape)
    (3, 4, 6, 6)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.algorithms.float_reference import restore_float_parameters
from lightning_quant.calibration import call_model, default_transform, is_input_error, move_to_device
from lightning_quant.errors import NotCalibratedError
from lightning_quant.quantizers.modules import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvBn, QuantLinear
from lightning_quant.quantizers.prepare import iter_quantizers, set_fake_quant, set_observers

__all__ = [
    "WEIGHT_LAYERS",
    "LayerTuning",
    "StopForward",
    "bounded_inputs",
    "capture_layer",
    "check_positive",
    "check_tuning_options",
    "execution_order",
    "feed",
    "held_mse",
    "pairs_mse",
    "layer_forward",
    "layer_targets",
    "quantized_bias",
    "require_any_calibrated",
    "stream_inputs",
    "weight_layers",
]

WEIGHT_LAYERS = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)


@dataclass
class LayerTuning:
    """One layer's result on its held samples: MSE to the float target before and after, and whether it was kept.

    ``mse_after`` is the best iterate's error; it equals ``mse_before`` for a reverted layer.
    """

    name: str
    mse_before: float
    mse_after: float
    kept: bool
    samples: int


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has run; :func:`feed` swallows it."""


def check_positive(name: str, value: Any, *, integer: bool = True) -> None:
    """Reject non-positive (or non-finite, or non-integer where ``integer``) options with a message naming the fix.

    Example:
        >>> check_positive("steps", 10)
        >>> check_positive("lr", 0.0, integer=False)
        Traceback (most recent call last):
        ...
        ValueError: lr=0.0 must be a finite number > 0.

    Raises:
        ValueError: ``value`` is not a positive int (``integer``) or not a finite positive number.
    """
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0.")


def check_tuning_options(steps: int, lr: float, num_batches: int, batch_size: int, max_samples: int, seed: int) -> None:
    """The options fast finetune and AdaRound share: positive integers, a positive finite ``lr``, an integer seed.

    Raises:
        ValueError: naming the option and what it must be.
    """
    for opt, value in (("steps", steps), ("num_batches", num_batches), ("batch_size", batch_size)):
        check_positive(opt, value)
    check_positive("max_samples", max_samples)
    check_positive("lr", lr, integer=False)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer.")


def weight_layers(model: nn.Module, action: str) -> dict[str, nn.Module]:
    """The fake-quant conv/linear layers of a prepared PTQ model, by qualified name.

    Example:
        >>> weight_layers(nn.Linear(2, 2), "fast_finetune")
        Traceback (most recent call last):
        ...
        ValueError: fast_finetune needs a model prepared by lightning_quant ...

    Raises:
        ValueError: the model holds a QAT conv+BN (``QuantConvBn``) or no fake-quant conv/linear layer.
    """
    qat = [name for name, m in model.named_modules() if isinstance(m, QuantConvBn)]
    if qat:
        raise ValueError(
            f"{action} works on PTQ models, but {qat[0]!r} is a QAT conv+BatchNorm (QuantConvBn). Call "
            f"lightning_quant.quantizers.convert(model) first, which folds BatchNorm into plain fake-quant convs."
        )
    layers = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    if not layers:
        raise ValueError(
            f"{action} needs a model prepared by lightning_quant (no fake-quant Conv/Linear layer found in "
            f"{type(model).__name__}). Use lightning_quant.quantize(model, data) or prepare() + calibrate() first."
        )
    return layers


def require_any_calibrated(model: nn.Module, action: str) -> None:
    """Raise when no quantizer of ``model`` has seen data (the model was prepared but never calibrated).

    Raises:
        NotCalibratedError: no quantizer is calibrated.
    """
    if not any(fq.calibrated.item() for _, fq in iter_quantizers(model)):
        raise NotCalibratedError(
            f"cannot {action}: the model has not been calibrated (no quantizer has seen data). Run "
            "lightning_quant.calibration.calibrate(model, data) first, or use lightning_quant.quantize()."
        )


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def stream_inputs(
    data: Iterable[Any], transform_fn: Callable[[Any], Any] | None, num_batches: int, model: nn.Module, action: str
) -> Iterator[Any]:
    """The first ``num_batches`` model inputs of ``data``, transformed and on the model's device, one at a time.

    Raises:
        ValueError: ``data`` yielded no batch (raised when the iteration ends).
    """
    transform = transform_fn or default_transform
    device = _model_device(model)
    produced = 0
    for item in data:
        if produced >= num_batches:
            break
        produced += 1
        yield move_to_device(transform(item), device)
    if not produced:
        raise ValueError(
            f"{action}: calibration data is empty (no batch was produced). Pass a non-empty DataLoader or list, "
            "e.g. the data used for quantize()."
        )


def bounded_inputs(
    data: Iterable[Any], transform_fn: Callable[[Any], Any] | None, num_batches: int, model: nn.Module, action: str
) -> list[Any]:
    """The first ``num_batches`` model inputs of ``data``, transformed and on the model's device.

    Kept as a list so one-shot iterables (generators) can be replayed once per layer.

    Raises:
        ValueError: ``data`` yielded no batch.
    """
    return list(stream_inputs(data, transform_fn, num_batches, model, action))


def feed(model: nn.Module, inputs: Any, index: int) -> None:
    """Call ``model`` on one input, treating :class:`StopForward` as a normal end of the pass.

    Raises:
        ValueError: the model cannot take ``inputs`` (the message says how to fix ``transform_fn``).
    """
    try:
        call_model(model, inputs)
    except StopForward:
        pass
    except (RuntimeError, TypeError) as err:
        if not is_input_error(err):  # out of memory, a bug in the model...: not something transform_fn fixes
            raise
        raise ValueError(
            f"batch {index} could not be fed to the model: {str(err).splitlines()[0]}. Make transform_fn return "
            "exactly the model input (a tuple is passed as positional arguments, a dict as keyword arguments)."
        ) from err


@torch.no_grad()
def execution_order(model: nn.Module, layers: dict[str, nn.Module], inputs: Any) -> list[str]:
    """Names of ``layers`` in the order one forward pass on ``inputs`` first calls them (unreached ones left out)."""
    order: list[str] = []
    handles = [
        layer.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n) if n not in order else None)
        for name, layer in layers.items()
    ]
    try:
        feed(model, inputs, 0)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def capture_layer(
    model: nn.Module, layer: nn.Module, inputs: list[Any], *, max_samples: int, what: str
) -> torch.Tensor:
    """Run ``inputs`` through ``model`` until ``layer`` has run, keeping its first ``max_samples`` input/output rows.

    Each forward pass ends right after the layer (``what="output"``) or right before it (``what="input"``), and
    feeding stops once ``max_samples`` rows (along dim 0) are held, so later layers never run.

    Raises:
        ValueError: a batch cannot be fed to the model, or the layer was never reached.
    """
    rows: list[torch.Tensor] = []
    held = 0

    def keep(tensor: torch.Tensor) -> None:
        nonlocal held
        part = tensor.detach()[: max_samples - held].clone()
        rows.append(part)
        held += part.shape[0]
        raise StopForward

    if what == "input":
        handle = layer.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    else:
        handle = layer.register_forward_hook(lambda _m, _a, out: keep(out))
    try:
        for index, batch in enumerate(inputs):
            if held >= max_samples:
                break
            feed(model, batch, index)
    finally:
        handle.remove()
    if not rows:
        raise ValueError("the layer was never reached by the calibration data; exclude it or check the inputs.")
    return torch.cat(rows)


def layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer``'s computation on ``x`` (its own input fake-quant applied, if any) with the given weight and bias.

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> from lightning_quant.quantizers.modules import quantized_layer_from_float
        >>> q = quantized_layer_from_float(nn.Linear(3, 2), scheme_for_target("x86"), "fc")
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer_forward(q, x, q.weight, q.bias), F.linear(x, q.weight, q.bias))
        True
    """
    x = layer._maybe_quantize_input(x)
    if isinstance(layer, QuantLinear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def quantized_bias(layer: nn.Module) -> torch.Tensor | None:
    """``layer``'s bias as the deployed layer sees it (through its bias fake-quant when it has one), or None."""
    return layer._quant_bias()  # the fake-quant layers' own rule, so tuning and inference cannot disagree


@torch.no_grad()
def pairs_mse(
    forward: Callable[[torch.Tensor], torch.Tensor], pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Mean squared error of ``forward(x)`` against ``y`` over every element of the ``(x, y)`` pairs (summed in
    float64)."""
    total, count = 0.0, 0
    for x, y in pairs:
        total += (forward(x) - y).double().pow(2).sum().item()
        count += y.numel()
    return total / count


def held_mse(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> float:
    """Mean squared error of ``forward(x)`` against ``y`` over all held rows, in chunks of ``batch_size``
    (summed in float64)."""
    return pairs_mse(
        forward, ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size))
    )


def layer_targets(
    qmodel: nn.Module,
    inputs: list[Any],
    layers: dict[str, nn.Module],
    *,
    max_samples: int,
    skipped: dict[str, str],
) -> Iterator[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """For each layer in execution order: ``(name, layer, x, y)``, ``x`` its input in the quantized model (fake-quant
    on, earlier layers as already refined), ``y`` its output in the float model (a frozen copy taken first, every
    fake-quant off, weights and biases as before any refinement). At most ``max_samples`` rows of each are held.

    Used by fast finetune and AdaRound, which change one layer at a time before the next one's inputs are captured.
    Layers the data never reaches, or whose weight quantizer is not calibrated, are recorded in ``skipped``.
    Observers are switched off on ``qmodel`` (as ``calibrate`` leaves them) and it is put in eval mode.
    """
    qmodel.eval()
    set_observers(qmodel, False)
    reference = copy.deepcopy(qmodel)  # the float reference: refinement changes the float weights of qmodel itself
    set_fake_quant(reference, False)
    restore_float_parameters(reference, qmodel)  # undo earlier refinements: the target is the float model
    order = execution_order(qmodel, layers, inputs[0])
    skipped.update({n: "not reached by the calibration data" for n in layers if n not in order})
    for name in order:
        layer = layers[name]
        if not layer.weight_fake_quant.calibrated.item():
            skipped[name] = "weight quantizer not calibrated"
            continue
        x = capture_layer(qmodel, layer, inputs, max_samples=max_samples, what="input")
        y = capture_layer(reference, reference.get_submodule(name), inputs, max_samples=max_samples, what="output")
        yield name, layer, x, y
