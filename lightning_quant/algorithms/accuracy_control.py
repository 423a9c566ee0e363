"""Accuracy-controlled PTQ: keep the most sensitive layers in float until the metric drop is at most a bound.

Like NNCF's ``quantize_with_accuracy_control``: quantize everything, and when the metric (e.g. top-1 on a held-out
set; higher is better) drops by more than ``max_accuracy_drop`` points, give layers back to float, most sensitive
first, until it does not.

How layers are chosen:

1. every quantized conv/linear layer is a candidate; its *group* is every quantizer that disappears when the layer
   is excluded (its weight and bias quantizers, and activation quantizers that only it needed); when several
   layers go back to float together, so do the activation quantizers only they needed;
2. candidates are ranked by the model-output SQNR (on ``ranking_batches`` batches) with their group switched off:
   the more a layer recovers, the earlier it goes back to float;
3. the smallest prefix of the ranking that meets the bound is found by bisection on the metric (about
   ``log2(layers)`` evaluations; bisection assumes that more float layers never hurt the metric); at least one
   layer stays quantized;
4. the result is quantized again with those layers in ``exclude``, so every consumer (``convert()``, the ONNX,
   TorchScript and XModel exporters, state files) keeps them in float, and its metric is measured once more.

With ``fallback_weight_bits`` (e.g. 8 in a W4A8 model) the chosen layers keep quantized weights at that width
instead of going to float: a layer's group is then its weight quantizer alone (recomputed at the higher width,
activations untouched), any number of layers may move up, and the result is quantized again with
``layer_weight_bits`` (mixed precision that every exporter writes). With ``adaround`` / ``fast_finetune`` the search
sees weights already tuned for the lower width (so it may move up more layers than needed); the returned model is
tuned afresh at the chosen widths and ``report.metric_final`` measures it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    >>> def metric(m):  # higher is better: negative output error against the float model
    ...     with torch.no_grad():
    ...         return -100 * float((m(data[0]) - model(data[0])).abs().mean())
    >>> qmodel, report = quantize_with_accuracy_control(model, data, metric, max_accuracy_drop=50.0, progress=False)
    >>> report.kept_float, report.met  # within the bound already: nothing goes back to float
    ([], True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lightning_quant.algorithms.float_reference import float_parameters_swapped_in
from lightning_quant.algorithms.layerwise import bounded_inputs, check_positive
from lightning_quant.algorithms.sensitivity import model_outputs, outputs_sqnr, restored_switches
from lightning_quant.config import QuantMode, QuantOptions, QuantScheme, Target, options_from_keywords, resolve_scheme
from lightning_quant.quantizers.modules import _weight_quantizer
from lightning_quant.quantizers.prepare import iter_quantizers, prepare, prepare_info

__all__ = ["AccuracyControlReport", "quantize_with_accuracy_control"]


@dataclass
class AccuracyControlReport:
    """What accuracy control measured and chose; ``kept_float`` are the layers left in float, most sensitive first.

    ``ranking`` lists every candidate layer with the output SQNR (dB) when only it is in float; ``evaluations``
    every metric evaluation of the search as ``(layers in float, metric)``; ``requantized`` the model quantized
    again with the chosen layers, as ``(layers chosen, metric)``: more than one entry when re-calibrating moved the
    metric below the bound and the next ranked layers were added (at most :data:`EXTRA_LAYERS`).
    """

    max_accuracy_drop: float
    metric_float: float
    metric_quantized: float
    metric_final: float
    kept_float: list[str] = field(default_factory=list)
    fallback_weight_bits: int | None = None
    higher_bits: list[str] = field(default_factory=list)  # with fallback_weight_bits: the layers moved up
    ranking: list[tuple[str, float]] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    requantized: list[tuple[int, float]] = field(default_factory=list)
    quantized_layers: int = 0
    seconds: float = 0.0

    @property
    def drop(self) -> float:
        """Metric drop of the returned model (float minus final)."""
        return self.metric_float - self.metric_final

    @property
    def met(self) -> bool:
        return self.drop <= self.max_accuracy_drop + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop": self.drop, "met": self.met}

    def __str__(self) -> str:
        status = "met" if self.met else "NOT met"
        chosen, where = (
            (self.kept_float, "kept in float")
            if self.fallback_weight_bits is None
            else (self.higher_bits, f"given {self.fallback_weight_bits}-bit weights")
        )
        lines = [
            f"accuracy control: metric float {self.metric_float:.4g}, all quantized {self.metric_quantized:.4g}, "
            f"returned {self.metric_final:.4g} (drop {self.drop:.4g} <= {self.max_accuracy_drop:.4g}: {status})",
            f"{len(chosen)} of {self.quantized_layers} layers {where}: " + (", ".join(chosen) if chosen else "none"),
            f"{len(self.evaluations)} metric evaluations in the search; {self.seconds:.1f} s in all",
        ]
        if len(self.requantized) > 1:
            tries = ", ".join(f"{count} layers: {value:.4g}" for count, value in self.requantized)
            lines.append(f"quantized again until the bound held ({tries})")
        return "\n".join(lines)


def _check_drop(max_accuracy_drop: Any) -> float:
    if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, (int, float)):
        raise ValueError(f"max_accuracy_drop={max_accuracy_drop!r} must be a number >= 0 (in the metric's units).")
    if not math.isfinite(max_accuracy_drop) or max_accuracy_drop < 0:
        raise ValueError(
            f"max_accuracy_drop={max_accuracy_drop!r} must be a finite number >= 0, e.g. 0.5 for half a point of top-1 "
            "when the metric is in percent."
        )
    return float(max_accuracy_drop)


def _metric(metric_fn: Callable[[nn.Module], float], model: nn.Module) -> float:
    was_training = model.training
    model.eval()
    try:
        value = metric_fn(model)
    finally:
        model.train(was_training)
    try:
        number = float(value)  # plain numbers, 0-d tensors, numpy scalars
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"metric_fn must return a finite number (higher is better), got {value!r}.")
    return number


def _quantizers_removed(base: nn.Module, qmodel: nn.Module, scheme: QuantScheme, exclude: Iterable[str]) -> set[str]:
    """Names of the quantizers of ``qmodel`` that a preparation of ``base`` with ``exclude`` does not have."""
    kept = prepare(base, scheme, mode=QuantMode.PTQ, exclude=tuple(exclude))
    return {name for name, _ in iter_quantizers(qmodel)} - {name for name, _ in iter_quantizers(kept)}


@contextlib.contextmanager
def _switched_off(qmodel: nn.Module, off: set[str], float_layers: Iterable[str] = ()) -> Iterator[None]:
    """Inside the block, fake-quant is on for every quantizer but those named in ``off`` (observers off), and the
    layers ``float_layers`` run with their float weights and biases: a layer kept in float is re-quantized without
    the bias correction (or AdaRound, fast finetune) that compensated its own quantization error. Every switch
    and parameter is restored on exit."""
    quantizers = dict(iter_quantizers(qmodel))
    with restored_switches(list(quantizers.values())), float_parameters_swapped_in(qmodel, float_layers):
        for name, fq in quantizers.items():
            fq.enable_fake_quant(name not in off)
        yield


def _rank(
    qmodel: nn.Module,
    layers: Iterable[str],
    variant: Callable[[str], contextlib.AbstractContextManager],
    inputs: list[Any],
    progress: bool,
) -> list[tuple[str, float]]:
    """``layers`` by the model-output SQNR (against the float outputs) inside ``variant(layer)``, best first."""
    all_quantizers = {name for name, _ in iter_quantizers(qmodel)}
    with _switched_off(qmodel, all_quantizers), float_parameters_swapped_in(qmodel):
        reference = model_outputs(qmodel, inputs)
    scores = []
    for layer in tqdm(list(layers), desc="Ranking layers", disable=not progress, leave=False):
        with variant(layer):
            scores.append((layer, outputs_sqnr(reference, model_outputs(qmodel, inputs))))
    scores.sort(key=lambda item: -item[1])
    return scores


@contextlib.contextmanager
def _weights_at(qmodel: nn.Module, names: Iterable[str], bits: int) -> Iterator[None]:
    """Inside the block, layers ``names`` quantize their float weights with ``bits`` and run their float biases
    (a refinement compensated the narrower weights' error, not these); quantizers and parameters restored on exit."""
    names = list(names)
    saved = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(float_parameters_swapped_in(qmodel, names))
        stack.callback(_put_weight_quantizers_back, qmodel, saved)
        for name in names:
            layer = qmodel.get_submodule(name)
            old = saved[name] = layer.weight_fake_quant
            fresh = _weight_quantizer(dataclasses.replace(old.spec, bits=bits), layer.weight, name)
            fresh.to(old.scale.device)(layer.weight.detach())  # weight ranges depend on the weight alone
            fresh.disable_observer()
            layer.weight_fake_quant = fresh
        yield


def _put_weight_quantizers_back(qmodel: nn.Module, saved: dict[str, nn.Module]) -> None:
    for name, old in saved.items():
        qmodel.get_submodule(name).weight_fake_quant = old


def _check_fallback_bits(bits: Any, scheme: QuantScheme) -> None:
    if bits is None:
        return
    if scheme.target is Target.DPU:
        raise ValueError("fallback_weight_bits: the DPU runs 8-bit weights only; leave it None (float fallback).")
    if isinstance(bits, bool) or not isinstance(bits, int) or not scheme.weight.bits < bits <= 8:
        raise ValueError(
            f"fallback_weight_bits={bits!r} must be an integer above the scheme's {scheme.weight.bits}-bit weights "
            "and at most 8 (e.g. 8 in a W4A8 model), or None to keep sensitive layers in float."
        )


def _metric_without(
    qmodel: nn.Module, off: set[str], metric_fn: Callable[[nn.Module], float], float_layers: Iterable[str] = ()
) -> float:
    """The metric with the quantizers named in ``off`` switched off and ``float_layers`` back to their float
    parameters (both restored afterwards)."""
    with _switched_off(qmodel, off, float_layers):
        return _metric(metric_fn, qmodel)


# layers added, one at a time, when the model quantized again with the chosen ones misses the bound
EXTRA_LAYERS = 3


def _requantize_until_met(
    requantize: Callable[[int], nn.Module],
    metric_fn: Callable[[nn.Module], float],
    count: int,
    largest: int,
    report: AccuracyControlReport,
) -> tuple[nn.Module, int]:
    """Quantize again with the first ``count`` ranked layers changed and measure it; while that misses the bound, with
    the next one too (up to :data:`EXTRA_LAYERS` more, never past ``largest``).

    The search switches quantizers off in the calibrated model; quantizing again also re-calibrates the ranges and
    bias corrections around the changed layers, which moves the metric a little either way: on a small tuning set one
    image is enough to miss a bound the search met."""
    while True:
        qmodel = requantize(count)
        report.metric_final = _metric(metric_fn, qmodel)
        report.requantized.append((count, report.metric_final))
        if report.met or count >= largest or len(report.requantized) > EXTRA_LAYERS:
            return qmodel, count
        count += 1


def _smallest_prefix(largest: int, metric_of: Callable[[int], float], floor: float, report, bar) -> int | None:
    """Fewest leading ranked layers in float (1..``largest``) whose metric is >= ``floor``; None if none is."""

    def evaluate(k: int) -> float:
        value = metric_of(k)
        report.evaluations.append((k, value))
        bar.update()
        return value

    if largest < 1 or evaluate(largest) < floor:
        return None
    lo, hi = 1, largest
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(mid) >= floor:
            hi = mid
        else:
            lo = mid + 1
    return hi


def quantize_with_accuracy_control(
    model: nn.Module,
    calibration_data: Iterable[Any],
    metric_fn: Callable[[nn.Module], float],
    *,
    max_accuracy_drop: float,
    transform_fn: Callable[[Any], Any] | None = None,
    target: Target | str | None = None,
    scheme: QuantScheme | None = None,
    options: QuantOptions | None = None,
    num_batches: int | None = None,
    exclude: Iterable[str] = (),
    layer_weight_bits: Mapping[str, int] | None = None,
    ranking_batches: int = 2,
    fallback_weight_bits: int | None = None,
    progress: bool = True,
    **deprecated_options: Any,
) -> tuple[nn.Module, AccuracyControlReport]:
    """PTQ with a bound on the metric drop: the most sensitive layers stay in float (see the module docstring).

    Args:
        model: float model in eval mode.
        calibration_data: batches for calibration (and for the SQNR ranking), as for :func:`~lightning_quant.quantize`.
        metric_fn: ``metric_fn(model) -> float``, higher is better (e.g. top-1 in percent on a held-out subset of
            the *training* data; selecting layers on the evaluation split makes its numbers optimistic). Called on
            the float model, the quantized model and about ``log2(layers) + 2`` times more.
        max_accuracy_drop: largest allowed ``metric(float) - metric(quantized)``, in the metric's units.
        transform_fn: maps one item of ``calibration_data`` to the model input.
        target: ``x86``, ``tensorrt`` or ``dpu`` (picks the default scheme).
        scheme: explicit scheme; its ``target`` is the target (a contradicting ``target=`` is an error).
        options: what runs around each calibration (:class:`~lightning_quant.config.QuantOptions`), as for
            :func:`~lightning_quant.quantize`.
        num_batches: calibrate on at most this many batches.
        exclude: layers the user keeps in float anyway (glob patterns); the chosen layers are added to them.
        layer_weight_bits: ``{glob pattern: bits}`` weight widths the user sets anyway (mixed precision).
        ranking_batches: calibration batches used to rank layers by output SQNR.
        fallback_weight_bits: give sensitive layers weights of this width (above the scheme's, at most 8)
            instead of keeping them in float; the choice is in ``report.higher_bits`` and the returned model's
            ``prepare_info(qmodel).weight_bits``.
        progress: progress bars for calibration, ranking and the search.
        **deprecated_options: option switches as keyword arguments (deprecated, as for
            :func:`~lightning_quant.quantize`).

    Returns:
        ``(qmodel, report)``: the quantized model with ``report.kept_float`` in float, and an
        :class:`AccuracyControlReport` (``report.met`` is False in the rare case where the re-quantized model
        misses the bound the search met, e.g. because bias correction then corrects other layers).

    Raises:
        TypeError: an unknown keyword, or ``options`` of the wrong type.
        ValueError: ``max_accuracy_drop`` negative or not a number, ``ranking_batches`` < 1, ``metric_fn`` returning
            something other than a
            finite number, or a bound only met with every layer in float; plus what :func:`~lightning_quant.quantize`
            raises.
    """
    from lightning_quant.api import float_model_for_quantization, quantize

    max_accuracy_drop = _check_drop(max_accuracy_drop)
    check_positive("ranking_batches", ranking_batches)
    options = options_from_keywords(options, deprecated_options, "quantize_with_accuracy_control")
    start = time.perf_counter()
    scheme = resolve_scheme(target, scheme, QuantMode.PTQ)
    _check_fallback_bits(fallback_weight_bits, scheme)
    exclude = tuple(exclude)
    common = dict(
        transform_fn=transform_fn, scheme=scheme, options=options, num_batches=num_batches, progress=progress,
        layer_weight_bits=dict(layer_weight_bits or {}),
    )  # fmt: skip
    qmodel = quantize(model, calibration_data, exclude=exclude, **common)
    metric_float = _metric(metric_fn, model)
    metric_q = _metric(metric_fn, qmodel)
    report = AccuracyControlReport(max_accuracy_drop, metric_float, metric_q, metric_q)
    report.quantized_layers = len(prepare_info(qmodel).quantized_layers)
    report.fallback_weight_bits = fallback_weight_bits
    if metric_float - metric_q <= max_accuracy_drop:
        report.seconds = time.perf_counter() - start
        return qmodel, report
    inputs = bounded_inputs(calibration_data, transform_fn, ranking_batches, qmodel, "quantize_with_accuracy_control")
    if fallback_weight_bits is not None:
        qmodel = _higher_bits_search(model, calibration_data, metric_fn, qmodel, report, common, exclude, inputs)
        report.seconds = time.perf_counter() - start
        return qmodel, report
    base = float_model_for_quantization(model, options)
    layers = prepare_info(qmodel).quantized_layers
    groups = {layer: _quantizers_removed(base, qmodel, scheme, (*exclude, layer)) for layer in layers}
    report.ranking = _rank(
        qmodel, groups, lambda layer: _switched_off(qmodel, groups[layer], (layer,)), inputs, progress
    )
    order = [layer for layer, _ in report.ranking]

    def metric_of(k: int) -> float:  # exactly what re-quantizing with the first k layers excluded removes
        off = _quantizers_removed(base, qmodel, scheme, (*exclude, *order[:k]))
        return _metric_without(qmodel, off, metric_fn, order[:k])

    largest = len(order) - 1  # at least one layer stays quantized
    with tqdm(total=1 + math.ceil(math.log2(max(largest, 1))), desc="Accuracy control", disable=not progress,
              leave=False) as bar:  # fmt: skip
        count = _smallest_prefix(largest, metric_of, metric_float - max_accuracy_drop, report, bar)
    if count is None:
        raise ValueError(
            f"max_accuracy_drop={max_accuracy_drop:g} is not met even with {largest} of the {len(order)} quantized "
            f"layers in float (float {metric_float:.4g}, all quantized {metric_q:.4g}, search (layers in float, "
            f"metric) {report.evaluations}). Allow a larger drop, use a more accurate scheme (per-channel weights, "
            "bias_correction, adaround), or check that metric_fn measures the model it is given."
        )
    qmodel, count = _requantize_until_met(
        lambda k: quantize(model, calibration_data, exclude=(*exclude, *order[:k]), **common),
        metric_fn, count, largest, report,
    )  # fmt: skip
    report.kept_float = order[:count]
    report.seconds = time.perf_counter() - start
    return qmodel, report


def _higher_bits_search(
    model: nn.Module,
    calibration_data: Iterable[Any],
    metric_fn: Callable[[nn.Module], float],
    qmodel: nn.Module,
    report: AccuracyControlReport,
    common: dict[str, Any],
    exclude: tuple[str, ...],
    inputs: list[Any],
) -> nn.Module:
    """The ``fallback_weight_bits`` search: rank, bisect, and return the model re-quantized with
    ``layer_weight_bits`` (``report`` filled in)."""
    from lightning_quant.api import quantize

    bits, progress = report.fallback_weight_bits, common["progress"]
    info = prepare_info(qmodel)
    layers = [name for name in info.quantized_layers if name not in info.weight_bits]

    @contextlib.contextmanager
    def at_bits(layer: str) -> Iterator[None]:  # only this layer's weights wider, every quantizer on
        with _switched_off(qmodel, set()), _weights_at(qmodel, [layer], bits):
            yield

    report.ranking = _rank(qmodel, layers, at_bits, inputs, progress)
    order = [layer for layer, _ in report.ranking]

    def metric_of(k: int) -> float:
        with _weights_at(qmodel, order[:k], bits):
            return _metric(metric_fn, qmodel)

    with tqdm(total=1 + math.ceil(math.log2(max(len(order), 1))), desc="Accuracy control", disable=not progress,
              leave=False) as bar:  # fmt: skip
        count = _smallest_prefix(len(order), metric_of, report.metric_float - report.max_accuracy_drop, report, bar)
    if count is None:
        raise ValueError(
            f"max_accuracy_drop={report.max_accuracy_drop:g} is not met even with all {len(order)} layers at "
            f"{bits}-bit weights (float {report.metric_float:.4g}, search (layers moved up, metric) "
            f"{report.evaluations}). Leave fallback_weight_bits=None to keep sensitive layers in float instead, or "
            "allow a larger drop."
        )

    def requantize(k: int) -> nn.Module:
        layer_bits = {**common["layer_weight_bits"], **dict.fromkeys(order[:k], bits)}
        return quantize(model, calibration_data, exclude=exclude, **{**common, "layer_weight_bits": layer_bits})

    qmodel, count = _requantize_until_met(requantize, metric_fn, count, len(order), report)
    report.higher_bits = order[:count]
    return qmodel
