"""Empirical bias correction (Nagel et al. 2019, sec. 4.2; Vitis AI's ``bias_corr``) of a calibrated PTQ model.

Weight quantization shifts each output channel's mean: ``E[W_q x] != E[W x]``. For every conv/linear layer, in
execution order, the per-output-channel mean of ``y_q - y_f`` is measured on calibration data, where ``x`` is the
layer's actual input in the quantized model (earlier layers already corrected), ``y_q`` the layer's fake-quant
output and ``y_f = W x + b`` the same input through the float weight; the mean is then subtracted from the bias
the layer ran with (its quantized value on targets that quantize biases; a zero bias is created where the layer had
none). Only the bias changes: weight scales stay as calibrated.
The original float biases are remembered on the model, so a later :func:`~lightning_quant.algorithms.fast_finetune`
still tunes towards the float model.
``num_batches=1`` is the fast variant.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> from lightning_quant.config import scheme_for_target
    >>> torch.manual_seed(0); model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    <torch._C.Generator object at ...>
    >>> data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    >>> qmodel = quantize(model, data, scheme=scheme_for_target("x86", weight_bits=4), progress=False)
    >>> report = correct_bias(qmodel, data, progress=False)
    >>> report.layers, report.created_bias, report.batches
    (['0', '2'], [], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_quant.algorithms.float_reference import float_bias, record_float_parameters
from lightning_quant.algorithms.layerwise import (
    StopForward,
    bounded_inputs,
    check_positive,
    execution_order,
    feed,
    layer_forward,
    quantized_bias,
    require_any_calibrated,
    weight_layers,
)
from lightning_quant.quantizers.modules import QuantLinear, add_zero_bias
from lightning_quant.quantizers.prepare import prepare_info, set_observers

__all__ = ["BiasCorrectionReport", "channel_error_mean", "correct_bias"]


@dataclass
class BiasCorrectionReport:
    """What :func:`correct_bias` did.

    ``corrections`` maps each corrected layer to the L2 norm of the vector subtracted from its bias;
    ``created_bias`` lists layers that had no bias; ``skipped`` maps layers left alone to the reason.
    """

    corrections: dict[str, float] = field(default_factory=dict)
    created_bias: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0

    @property
    def layers(self) -> list[str]:
        """Corrected layers, in execution order."""
        return list(self.corrections)


def _channel_dim(layer: nn.Module, y: torch.Tensor) -> int:
    return y.dim() - 1 if isinstance(layer, QuantLinear) else 1


@torch.no_grad()
def channel_error_mean(
    layer: nn.Module, x: torch.Tensor, y_q: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Per-output-channel sum of ``y_q - (W x + bias)`` over all other dims, and how many values each sum holds.

    ``bias`` is the float model's bias (the layer's own may already be corrected).

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> from lightning_quant.quantizers.modules import quantized_layer_from_float
        >>> q = quantized_layer_from_float(nn.Linear(3, 2), scheme_for_target("x86"), "fc")
        >>> x = torch.randn(5, 3)
        >>> total, count = channel_error_mean(q, x, (q.weight @ x.T + q.bias[:, None]).T + 1.0, q.bias)
        >>> count, [round(v, 4) for v in (total / count).tolist()]
        (5, [1.0, 1.0])
    """
    y_f = layer_forward(layer, x, layer.weight, bias)
    diff = (y_q - y_f).double().movedim(_channel_dim(layer, y_q), -1)
    diff = diff.reshape(-1, diff.shape[-1])
    return diff.sum(0), diff.shape[0]


def _measure(model: nn.Module, name: str, layer: nn.Module, inputs: list[Any]) -> torch.Tensor:
    """Mean per-channel error of ``layer`` over ``inputs``; each forward pass stops right after the layer."""
    totals: list[tuple[torch.Tensor, int]] = []
    bias = float_bias(model, name, layer)

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        totals.append(channel_error_mean(layer, args[0], out, bias))
        raise StopForward

    handle = layer.register_forward_hook(hook)
    try:
        for index, batch in enumerate(inputs):
            feed(model, batch, index)
    finally:
        handle.remove()
    return sum(t for t, _ in totals) / sum(n for _, n in totals)


def _apply(model: nn.Module, name: str, layer: nn.Module, delta: torch.Tensor, report: BiasCorrectionReport) -> None:
    """Set the bias to the one the layer ran with minus the measured mean error ``delta``, and re-quantize it.

    The measured error holds the bias's own rounding (``y_q`` ran with the deployed bias, the reference with the
    float one), so the correction starts from the deployed bias: starting from the float bias would subtract that
    rounding once and then round again, moving a quantized (DPU, 8-bit) bias further off instead of closer.
    """
    delta = delta.to(layer.weight.dtype)
    record_float_parameters(model, name, layer, ("bias",))
    deployed = torch.zeros_like(delta) if layer.bias is None else quantized_bias(layer).detach().clone()
    if layer.bias is None:
        try:
            scheme = prepare_info(model).scheme
        except ValueError:  # prepared info lost (e.g. a deep copy of a GraphModule): the bias stays float
            scheme = None
        add_zero_bias(layer, name, None if scheme is None else scheme.bias)  # quantized where the target says so
        report.created_bias.append(name)
    layer.bias.data.copy_(deployed - delta)
    fq = layer.bias_fake_quant
    if fq is not None:  # the bias moved: its range must be observed again (the weight scale is not touched)
        fq.observer.reset()
        fq.enable_observer(True)
        fq(layer.bias.detach())
        fq.enable_observer(False)
    report.corrections[name] = delta.norm().item()


def _concatenated(inputs: list[Any]) -> Any | None:
    """The batches joined along dim 0 (tensors, and tuples/lists/dicts of them), or None when they cannot be."""
    first = inputs[0]
    if isinstance(first, torch.Tensor):
        ok = all(isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[1:] == first.shape[1:] for x in inputs)
        return torch.cat(inputs) if ok and first.dim() > 0 else None
    if isinstance(first, (tuple, list)) and all(type(x) is type(first) and len(x) == len(first) for x in inputs):
        parts = [_concatenated([x[i] for x in inputs]) for i in range(len(first))]
        return None if any(p is None for p in parts) else type(first)(parts)
    if isinstance(first, dict) and all(isinstance(x, dict) and x.keys() == first.keys() for x in inputs):
        parts = {k: _concatenated([x[k] for x in inputs]) for k in first}
        return None if any(p is None for p in parts.values()) else parts
    return None


def _correct_in_one_pass(qmodel: nn.Module, layers: dict, batch: Any, report: BiasCorrectionReport, bar) -> None:
    """One forward pass over all batches at once: each layer's hook measures its error on what it receives (earlier
    layers already corrected), corrects its bias, and passes on the output recomputed with the new bias. The same
    result as one pass per layer (the model treats images independently in eval mode), in ``1 / layers`` the time."""
    done: set[str] = set()

    def hook(name: str):
        def correct(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if name in done:  # a layer called twice: corrected at its first call, like the per-layer passes
                return None
            done.add(name)
            total, count = channel_error_mean(layer, args[0], out, float_bias(qmodel, name, layer))
            _apply(qmodel, name, layer, total / count, report)
            bar.update()
            return layer.forward(*args)  # forward() itself: no hooks, the corrected (and re-quantized) bias

        return correct

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        feed(qmodel, batch, 0)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def correct_bias(
    qmodel: nn.Module,
    calibration_data: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 4,
    progress: bool = True,
    one_pass: bool = True,
) -> BiasCorrectionReport:
    """Empirical bias correction of a calibrated fake-quant PTQ model, in place (see the module docstring).

    Observers are switched off (as :func:`~lightning_quant.calibration.calibrate` leaves them) so no weight or
    activation scale moves; a quantized bias (``target="dpu"``) is re-observed, so run
    :func:`~lightning_quant.quantizers.dpu_shifts.enforce_dpu_shifts` afterwards (``quantize()`` does).

    Args:
        qmodel: a model returned by :func:`lightning_quant.quantize` (or ``prepare`` + ``calibrate``).
        calibration_data: iterable of batches, as for ``quantize``; only the first ``num_batches`` are used.
        transform_fn: maps one item of ``calibration_data`` to the model input.
        num_batches: batches to average over (1 = the fast variant).
        progress: show a progress bar over layers.
        one_pass: join the batches and correct every layer in one forward pass (memory: activations of all
            ``num_batches`` batches at once); ``False`` runs one pass per layer (batch by batch, stopped right after
            the layer), which needs the memory of one batch but takes about ``layers / 2`` times longer. Inputs that
            cannot be joined along dim 0 always take the per-layer path.

    Returns:
        A :class:`BiasCorrectionReport`.

    Raises:
        ValueError: ``num_batches`` < 1, empty data, a batch the model cannot take, a model that holds no
            lightning_quant fake-quant Conv/Linear layer, or a QAT conv+BN (convert it first).
        NotCalibratedError: the model was never calibrated.
    """
    check_positive("num_batches", num_batches)
    layers = weight_layers(qmodel, "correct_bias")
    require_any_calibrated(qmodel, "correct_bias")
    inputs = bounded_inputs(calibration_data, transform_fn, num_batches, qmodel, "correct_bias")
    was_training = qmodel.training
    qmodel.eval()
    set_observers(qmodel, False)
    report = BiasCorrectionReport(batches=len(inputs))
    try:
        order = execution_order(qmodel, layers, inputs[0])
        report.skipped.update({n: "not reached by the calibration data" for n in layers if n not in order})
        todo = {}
        for name in order:
            if layers[name].weight_fake_quant.calibrated.item():
                todo[name] = layers[name]
            else:
                report.skipped[name] = "weight quantizer not calibrated"
        batch = _concatenated(inputs) if one_pass else None
        with tqdm(total=len(todo), desc="Bias correction", disable=not progress, leave=False, unit="layer") as bar:
            if batch is not None:
                _correct_in_one_pass(qmodel, todo, batch, report, bar)
            else:  # inputs that cannot be joined (or one_pass=False): one pass per layer, stopped right after it
                for name, layer in todo.items():
                    _apply(qmodel, name, layer, _measure(qmodel, name, layer, inputs), report)
                    bar.update()
    finally:
        qmodel.train(was_training)
    return report
