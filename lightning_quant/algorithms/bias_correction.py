"""Empirical bias correction (Nagel et al. 2019, sec. 4.2; Vitis AI's ``bias_corr``) of a calibrated PTQ model.

Weight quantization shifts each output channel's mean: ``E[W_q x] != E[W x]``. For every conv/linear layer, in
execution order, the per-output-channel mean of ``(W_q - W) x`` is measured on calibration data, where ``x`` is the
layer's actual input in the quantized model (earlier layers already corrected), and the layer's bias becomes its
float bias minus that mean (quantized where the target quantizes biases; a zero bias is created where the layer had
none). Only the bias changes: weight scales stay as calibrated. The correction streams one batch at a time
(:func:`correct_bias`): the memory of one batch, about the cost of one fake-quant forward pass per batch, which is
what lets ``quantize()`` run it by default.
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

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lightning_quant.algorithms.float_reference import float_bias, record_float_parameters
from lightning_quant.algorithms.layerwise import (
    check_positive,
    feed,
    quantized_bias,
    require_any_calibrated,
    stream_inputs,
    weight_layers,
)
from lightning_quant.quantizers.modules import QuantLinear, add_zero_bias
from lightning_quant.quantizers.prepare import prepare_info, set_observers

__all__ = ["BiasCorrectionReport", "correct_bias", "weight_error_sum"]


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


def _channel_shape(layer: nn.Module, out: torch.Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-output-channel vector over ``out``."""
    if isinstance(layer, QuantLinear):
        return (out.shape[-1],)
    channel = 0 if out.dim() == layer.weight.dim() - 1 else 1  # an unbatched conv output is (C, H, W)
    return (out.shape[channel],) + (1,) * (out.dim() - channel - 1)


@torch.no_grad()
def weight_error_sum(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-output-channel sum, over every output position of the batch, of ``(W_q - W) x_q``: the part of the
    layer's output error its weight quantization causes (``x_q``: the input after the layer's own input fake-quant,
    if any), and the number of positions each sum holds.

    The layer is linear in its input, so the batch is summed first and the weight difference runs once on that one
    summed sample: the cost of one image instead of a batch.

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> from lightning_quant.quantizers.modules import quantized_layer_from_float
        >>> q = quantized_layer_from_float(nn.Linear(3, 2), scheme_for_target("x86", weight_bits=2), "fc")
        >>> _ = q.weight_fake_quant(q.weight)  # calibrate the weight quantizer
        >>> q.weight_fake_quant.disable_observer()
        >>> x = torch.randn(5, 3)
        >>> total, count = weight_error_sum(q, x)
        >>> reference = (x @ (q.weight_fake_quant(q.weight) - q.weight).T).sum(0)
        >>> count, torch.allclose(total.float(), reference, atol=1e-5)
        (5, True)
    """
    x = layer._maybe_quantize_input(x)
    delta = layer.weight_fake_quant(layer.weight) - layer.weight
    if isinstance(layer, QuantLinear):
        rows = x.reshape(-1, x.shape[-1])
        return F.linear(rows.sum(0, keepdim=True), delta).double().reshape(-1), rows.shape[0]
    if x.dim() == delta.dim() - 1:  # an unbatched input (a conv takes (C, H, W) too): one sample
        x = x.unsqueeze(0)
    y = layer._conv_forward(x.sum(0, keepdim=True), delta, None)
    positions = x.shape[0] * y[0, 0].numel()
    return y.double().movedim(1, -1).reshape(-1, y.shape[1]).sum(0), positions


class _Corrector:
    """Running state of one bias correction: per layer, the summed weight error and its count, and the float bias.

    A layer's corrected bias is ``float bias - mean weight error`` over every position seen so far; it is
    quantized the way the layer deploys it (the DPU's 8-bit bias), so a deployed bias the weights do not shift
    stays as it is.
    """

    def __init__(self, qmodel: nn.Module, report: BiasCorrectionReport) -> None:
        self.qmodel, self.report = qmodel, report
        self.sums: dict[str, list] = {}  # name -> [error sum (float64), positions, deployed bias before any change]
        self.seen: set[str] = set()  # layers already corrected in the current pass (a layer may be called twice)

    def hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
        def correct(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if name in self.seen:  # a second call in one pass: corrected at its first call already
                return None
            self.seen.add(name)
            total, count = weight_error_sum(layer, args[0])
            if count == 0:  # an empty batch: no positions to average (0 / 0 made every later bias NaN)
                return None
            before = quantized_bias(layer)
            before = None if before is None else before.detach().clone()  # x86: the very Parameter set below
            state = self.sums.get(name)
            if state is None:
                state = self.sums[name] = [
                    0.0,
                    0,
                    torch.zeros_like(total, dtype=out.dtype) if before is None else before,
                ]
            state[0], state[1] = state[0] + total, state[1] + count
            self._set_bias(name, layer, state[0] / state[1])
            after = quantized_bias(layer)
            moved = after if before is None else after - before
            return out + moved.to(out.dtype).reshape(_channel_shape(layer, out))

        return correct

    def _set_bias(self, name: str, layer: nn.Module, mean_error: torch.Tensor) -> None:
        """Bias := float bias - ``mean_error``; a quantized bias (DPU) is observed again on its new value."""
        record_float_parameters(self.qmodel, name, layer, ("bias",))
        reference = float_bias(self.qmodel, name, layer)
        if layer.bias is None:
            try:
                scheme = prepare_info(self.qmodel).scheme
            except ValueError:  # prepared info lost (e.g. a deep copy of a GraphModule): the bias stays float
                scheme = None
            add_zero_bias(layer, name, None if scheme is None else scheme.bias)  # quantized where the target says so
            self.report.created_bias.append(name)
        target = -mean_error if reference is None else reference.double() - mean_error
        layer.bias.data.copy_(target.to(layer.bias.dtype))
        fq = layer.bias_fake_quant
        if fq is not None:  # the bias moved: its range must be observed again (the weight scale is not touched)
            fq.observer.reset()
            fq.enable_observer(True)
            fq(layer.bias.detach())
            fq.enable_observer(False)

    def finish(self) -> None:
        """Record each corrected layer's total change of its deployed bias, in execution order."""
        for name, (_, _, first) in self.sums.items():
            self.report.corrections[name] = (first - quantized_bias(self.qmodel.get_submodule(name))).norm().item()


@torch.no_grad()
def correct_bias(
    qmodel: nn.Module,
    calibration_data: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 4,
    progress: bool = True,
    one_pass: bool | None = None,
) -> BiasCorrectionReport:
    """Empirical bias correction of a calibrated fake-quant PTQ model, in place (see the module docstring).

    Streams: one forward pass per batch, with one batch in memory. In each pass every layer, in execution order,
    adds the batch's weight error (:func:`weight_error_sum`) to its running sum, takes the bias ``float bias - mean
    error so far`` and hands the next layers its output with that bias; so later layers measure their error on
    inputs that earlier corrections already moved. With one batch this is exactly the sequential, layer-by-layer
    correction; with more, the first batches saw earlier layers corrected on fewer images (a second-order
    difference; the mean error left is checked in the tests).

    Observers are switched off (as :func:`~lightning_quant.calibration.calibrate` leaves them) so no weight or
    activation scale moves; a quantized bias (``target="dpu"``) is re-observed, so run
    :func:`~lightning_quant.quantizers.dpu_shifts.enforce_dpu_shifts` afterwards (``quantize()`` does).

    Args:
        qmodel: a model returned by :func:`lightning_quant.quantize` (or ``prepare`` + ``calibrate``).
        calibration_data: iterable of batches, as for ``quantize``; only the first ``num_batches`` are used.
        transform_fn: maps one item of ``calibration_data`` to the model input.
        num_batches: batches to average over (1 = the fast variant).
        progress: show a progress bar over batches.
        one_pass: deprecated and ignored: every correction now streams one batch at a time (the memory of one
            batch, about the time of one fake-quant forward pass per batch).

    Returns:
        A :class:`BiasCorrectionReport`.

    Raises:
        ValueError: ``num_batches`` < 1, empty data, a batch the model cannot take, a model that holds no
            lightning_quant fake-quant Conv/Linear layer, or a QAT conv+BN (convert it first).
        NotCalibratedError: the model was never calibrated.
    """
    if one_pass is not None:
        warnings.warn(
            "correct_bias(one_pass=...) is deprecated and ignored: bias correction now streams one batch at a time "
            "in every case. Drop the argument.",
            DeprecationWarning,
            stacklevel=3,
        )
    check_positive("num_batches", num_batches)
    layers = weight_layers(qmodel, "correct_bias")
    require_any_calibrated(qmodel, "correct_bias")
    report = BiasCorrectionReport()
    todo = {}
    for name, layer in layers.items():
        if layer.weight_fake_quant.calibrated.item():
            todo[name] = layer
        else:
            report.skipped[name] = "weight quantizer not calibrated"
    was_training = qmodel.training
    qmodel.eval()
    set_observers(qmodel, False)
    corrector = _Corrector(qmodel, report)
    handles = [layer.register_forward_hook(corrector.hook(name)) for name, layer in todo.items()]
    try:
        batches = stream_inputs(calibration_data, transform_fn, num_batches, qmodel, "correct_bias")
        for index, batch in enumerate(tqdm(batches, desc="Bias correction", total=num_batches, disable=not progress,
                                           leave=False, unit="batch")):  # fmt: skip
            corrector.seen.clear()
            feed(qmodel, batch, index)
            report.batches += 1
    finally:
        for handle in handles:
            handle.remove()
        qmodel.train(was_training)
    corrector.finish()
    report.skipped.update({n: "not reached by the calibration data" for n in todo if n not in corrector.sums})
    return report
