"""Output-aware activation range search: the clipping percentile, per group of activation quantizers, that keeps
the network's output closest to the float model's on calibration batches.

One percentile for every activation rarely suits them all. In ResNets the tensors that feed a residual add
(signed: no ReLU before them) carry rare outliers hundreds of times the typical value, and need far more clipping
than the ReLU outputs; clip the ReLU outputs as hard and accuracy falls instead. Local criteria cannot tell: the
MSE-optimal range of such a tensor keeps the outliers, as their squared error outweighs the rounding error of
everything else. So the search judges a range by what it does to the model output:

- groups, by their place in the graph: ``signed`` (some value below 0 was seen: residual-branch and
  linear-bottleneck outputs), ``residual_sum`` (the output of a residual add, or of the ReLU right after it: the
  running sum of a residual stage) and ``non_negative`` (every other activation, after a ReLU). The model's inputs
  and outputs keep their calibrated ranges.
- objective: the mean over samples of ``||y_q - y||^2 / ||y||^2`` (``y`` the float output, ``y_q`` the
  fake-quant one). Each sample weighs the same, so the few images with huge activations, which dominate a pooled
  error or SQNR, do not decide for the rest.
- search: one pass of coordinate descent: each group in turn tries every candidate percentile with the other
  groups fixed, then the two percentiles halfway (in the share of values clipped) between the best one and its
  neighbours, and keeps the best (the calibrated one unless a trial lowers the error). Histograms recorded at
  calibration give every candidate's range at once: a trial is one forward pass over the held samples.
- samples: the first ``max_samples`` (128) rows of the calibration batches. The ranges themselves come from the
  histograms of every calibration image; the samples only rank the candidates, and ranking needs fewer: on the
  ResNet50 of ``scripts/bench_accuracy.py`` 128 images chose the same percentiles as all 512, for a quarter of
  the cost (19 forward passes of 128 images instead of 512).

It needs the ``percentile`` activation estimator (the histograms and the percentile are what it tunes), or
power-of-two activation scales (the Vitis AI DPU scheme, ``target="dpu"``): there the knob is a shift of each
quantizer's calibrated fix position, the same shift for a whole group (``fix_pos_offsets``; +1 halves the scale and
clips twice as much, -1 doubles it), and when the best shift is the largest (smallest) one tried, one more step in
that direction is tried. The DPU's per-batch squared-error choice keeps rare outliers like the MSE estimator does;
the shift is how a deployable power-of-two model clips them, one group at a time. Where single tensors are off (the
ResNet50 of ``scripts/bench_accuracy.py`` in batches of 128: -27.4 points, -25.9 with the shift), calibrate the DPU
scheme with the ``percentile`` estimator instead (power-of-two scales rounded up from the clipped range) and the
search tunes percentiles: -0.6. It runs before bias correction, the DPU's shift constraints, AdaRound and fast
finetune, which then see the final activation ranges.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> from lightning_quant.config import scheme_for_target
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(128, 4))
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    >>> scheme = scheme_for_target("x86", activation_observer="percentile")
    >>> qmodel = quantize(model.eval(), data, scheme=scheme, progress=False)
    >>> report = search_activation_ranges(qmodel, data, progress=False)
    >>> list(report.groups), report.final_error <= report.start_error  # no residual add here: two groups
    (['signed', 'non_negative'], True)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from lightning_quant.algorithms.float_reference import float_parameters_swapped_in
from lightning_quant.algorithms.layerwise import bounded_inputs, require_any_calibrated
from lightning_quant.algorithms.sensitivity import model_outputs, restored_switches
from lightning_quant.capture.patterns import is_fused_activation
from lightning_quant.config import ScaleType
from lightning_quant.quantizers.dpu import MAX_FIX_POS, MIN_FIX_POS, fix_pos_from_scale
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.functional import per_sample_noise_ratio
from lightning_quant.quantizers.percentile import PercentileObserver
from lightning_quant.quantizers.prepare import iter_quantizers, prepare_info, set_fake_quant

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_FIX_POS_OFFSETS",
    "GROUPS",
    "RangeSearchReport",
    "activation_groups",
    "first_rows",
    "search_activation_ranges",
]

DEFAULT_CANDIDATES = (99.0, 99.5, 99.9, 99.99, 100.0)
DEFAULT_FIX_POS_OFFSETS = (-1, 1, 2)  # power-of-two scales: shifts of the calibrated fix positions
GROUPS = ("signed", "residual_sum", "non_negative")  # searched in this order
_NOT_ACTIVATIONS = ("weight_fake_quant", "bias_fake_quant")


@dataclass
class RangeSearchReport:
    """What :func:`search_activation_ranges` chose.

    Attributes:
        chosen: group -> the value of ``parameter`` kept.
        parameter: ``"percentile"`` (the clipping percentile) or ``"fix_pos_offset"`` (power-of-two scales: the
            shift of the calibrated fix positions, +1 = half the scale).
        groups: group -> names of its activation quantizers.
        trials: ``(group, value, error)`` of every forward pass, in order.
        start_error / final_error: the objective before and after (mean per-sample relative output error).
        batches / samples: calibration batches and rows (along dim 0) the objective was measured on.
    """

    chosen: dict[str, float] = field(default_factory=dict)
    parameter: str = "percentile"
    groups: dict[str, list[str]] = field(default_factory=dict)
    trials: list[tuple[str, float, float]] = field(default_factory=list)
    start_error: float = float("nan")
    final_error: float = float("nan")
    batches: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        shifts = self.parameter == "fix_pos_offset"
        fmt, what = ("+g", "fix position shifts") if shifts else ("g", "percentiles")
        chosen = ", ".join(f"{g} ({len(self.groups[g])} quantizers) {p:{fmt}}" for g, p in self.chosen.items())
        return (
            f"range search: {what} {chosen}; relative output error {self.start_error:.4g} -> "
            f"{self.final_error:.4g} on {self.samples} samples"
        )


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _graph_roles(model: nn.Module) -> dict[str, str]:
    """Qualified name -> role of the activation quantizers of every traced graph: ``end`` (reads a graph input or
    feeds a graph output) or ``residual_sum`` (quantizes a residual add's output, or the ReLU right after it)."""
    roles: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_module" or not isinstance(module.get_submodule(node.target), FakeQuantize):
                continue
            name = f"{path}.{node.target}" if path else str(node.target)
            source = node.args[0] if node.args else None
            if any(isinstance(a, fx.Node) and a.op == "placeholder" for a in node.args) or any(
                user.op == "output" for user in node.users
            ):
                roles[name] = "end"
            elif _is_add(source) or (
                isinstance(source, fx.Node)
                and is_fused_activation(module, source)
                and bool(source.args)
                and _is_add(source.args[0])
            ):
                roles[name] = "residual_sum"
    return roles


def activation_groups(qmodel: nn.Module) -> dict[str, list[tuple[str, FakeQuantize]]]:
    """The calibrated activation quantizers the search tunes, by group (see :data:`GROUPS`; model inputs and
    outputs left out, empty groups dropped).

    Raises:
        ValueError: an activation quantizer has neither the ``percentile`` estimator nor a power-of-two per-tensor
            scale, the groups mix the two, or none is left to tune.
    """
    roles = _graph_roles(qmodel)
    groups: dict[str, list[tuple[str, FakeQuantize]]] = {group: [] for group in GROUPS}
    for name, fq in iter_quantizers(qmodel):
        if name.rsplit(".", 1)[-1] in _NOT_ACTIVATIONS or roles.get(name) == "end" or not fq.calibrated.item():
            continue
        if _parameter_of(fq) is None:
            raise ValueError(
                f"range search tunes the clipping percentile of the 'percentile' activation estimator, or the fix "
                f"position of power-of-two scales, but quantizer {name!r} uses {fq.spec.observer!r} with "
                f"{fq.spec.scale_type.value} scales; calibrate with activation_observer='percentile' (Python: "
                "scheme_for_target(target, activation_observer='percentile'); recipes: "
                "quant.scheme.activation_observer=percentile) or use the power-of-two target='dpu'."
            )
        group = roles.get(name) or ("signed" if fq.observer.min_val.item() < 0 else "non_negative")
        groups[group].append((name, fq))
    if not any(groups.values()):
        raise ValueError(
            "range search found no calibrated activation quantizer between the model's inputs and outputs; "
            "calibrate first (quantize() or QuantCallback) on a model with at least two quantized layers."
        )
    kinds = {_parameter_of(fq) for members in groups.values() for _, fq in members}
    if len(kinds) > 1:
        raise ValueError(
            "range search found both percentile-estimated and power-of-two activation quantizers; give every "
            "activation one scheme (scheme_for_target('dpu') or activation_observer='percentile')."
        )
    return {g: members for g, members in groups.items() if members}


def _parameter_of(fq: FakeQuantize) -> str | None:
    """What the search tunes in this quantizer: ``percentile``, ``fix_pos_offset`` or nothing (None)."""
    if fq.spec.per_channel:
        return None
    if isinstance(fq.observer, PercentileObserver):
        return "percentile"
    return "fix_pos_offset" if fq.spec.scale_type is ScaleType.POWER_OF_TWO and fq.spec.symmetric else None


def _leading_rows(batch: Any) -> int | None:
    leaves = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0]
    return leaves[0].shape[0] if leaves else None


def _rows(inputs: list[Any]) -> int:
    return sum(_leading_rows(batch) or 1 for batch in inputs)


def first_rows(inputs: list[Any], max_samples: int | None) -> list[Any]:
    """The batches holding the first ``max_samples`` rows, the last one cut (in every tensor whose dim 0 is the
    batch's: the first tensor's); None keeps everything.

    Example:
        >>> batches = [torch.zeros(4, 3), (torch.zeros(4, 2), torch.ones(2))]
        >>> [tree_map(lambda t: tuple(t.shape), b) for b in first_rows(batches, 6)]
        [(4, 3), ((2, 2), (2,))]
    """
    if max_samples is None:
        return inputs
    kept, held = [], 0
    for batch in inputs:
        if held >= max_samples:
            break
        rows = _leading_rows(batch)
        if rows is not None and held + rows > max_samples:
            keep = max_samples - held
            batch = tree_map(
                lambda t, k=keep, r=rows: t[:k] if isinstance(t, torch.Tensor) and t.dim() and len(t) == r else t, batch
            )
            rows = keep
        kept.append(batch)
        held += rows or 1
    return kept


def relative_output_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Mean over samples of ``||y_q - y||^2 / ||y||^2`` (rows of each output batch are samples).

    Example:
        >>> relative_output_error([torch.tensor([[1.0, 0.0], [0.0, 10.0]])], [torch.tensor([[1.0, 0.5], [0.0, 9.0]])])
        0.13
    """
    pairs = zip(reference, outputs, strict=True)
    errors = torch.cat([per_sample_noise_ratio(ref, out, min_signal=1e-12) for ref, out in pairs])
    return round(errors.mean().item(), 12)


# --- the two knobs ------------------------------------------------------------------------------------------------
# The clipping percentile of ``percentile`` estimators, and (power-of-two scales) the shift of calibrated fix
# positions. Each sets one group's quantizers to a value, says where the search starts and what to try after the grid.


class _PercentileKnob:
    """The clipping percentile of a group's ``percentile`` estimators (their histograms give each range)."""

    def __init__(self, members: Sequence[tuple[str, FakeQuantize]]) -> None:
        self.members = members

    def start(self) -> tuple[float, bool]:
        """The calibrated percentile, and whether the group had to be set to it (it differed within the group)."""
        kept = self.members[0][1].spec.percentile
        if any(fq.spec.percentile != kept for _, fq in self.members):  # set by hand: one percentile per group
            self.set(kept)
            return kept, True
        return kept, False

    def set(self, percentile: float) -> None:
        for _, fq in self.members:
            spec = dataclasses.replace(fq.spec, percentile=percentile)
            fq.spec = spec
            fq.observer.spec = spec
            fq.refresh_qparams()

    @staticmethod
    def more(tried: list[float], best: float) -> list[float]:
        return _between(tried, best)


class _FixPosKnob:
    """The shift of a group's calibrated power-of-two fix positions (each kept in the DPU's position range)."""

    def __init__(self, members: Sequence[tuple[str, FakeQuantize]]) -> None:
        self.members = members
        self.base = [fix_pos_from_scale(fq.scale) for _, fq in members]

    @staticmethod
    def start() -> tuple[int, bool]:
        return 0, False

    def set(self, offset: int) -> None:
        for (_, fq), base in zip(self.members, self.base, strict=True):
            fq.scale.fill_(2.0 ** -min(max(base + offset, MIN_FIX_POS), MAX_FIX_POS))

    @staticmethod
    def more(tried: list[int], best: int) -> list[int]:
        """One step past the largest (smallest) shift tried, when that one is the best so far.

        Example:
            >>> _FixPosKnob.more([-1, 0, 1, 2], 2), _FixPosKnob.more([-1, 0, 1, 2], -1), _FixPosKnob.more([0, 1], 0)
            ([3], [-2], [])
        """
        if best == max(tried) and best > 0:
            return [best + 1]
        return [best - 1] if best == min(tried) and best < 0 else []


def _between(grid: list[float], best: float) -> list[float]:
    """The percentiles halfway between ``best`` and its neighbours on the sorted ``grid``, halfway in the share of
    values clipped (``100 - p``, geometric mean; arithmetic next to 100, which clips nothing).

    Example:
        >>> _between([99.0, 99.5, 99.9, 99.99, 100.0], 99.9), _between([99.0, 99.99, 100.0], 100.0)
        ([99.7764, 99.9684], [99.995])
    """
    i = grid.index(best)
    halfway = []
    for neighbour in grid[max(i - 1, 0) : i] + grid[i + 1 : i + 2]:
        a, b = 100.0 - neighbour, 100.0 - best
        halfway.append(round(100.0 - math.sqrt(a * b) if a > 0 and b > 0 else (neighbour + best) / 2.0, 4))
    return halfway


def _percentiles(candidates: Sequence[float]) -> list[float]:
    values = [float(p) for p in candidates]
    if not values:
        raise ValueError("range search needs at least one candidate percentile; e.g. candidates=(99.0, 99.9, 100.0).")
    for p in values:
        if not 50.0 < p <= 100.0:
            raise ValueError(f"range search candidate percentile {p!r} must be in (50, 100]; e.g. 99.0, 99.9, 100.0.")
    return values


def _fix_pos_offsets(offsets: Sequence[int]) -> list[int]:
    values = list(offsets)
    if not values:
        raise ValueError("range search needs at least one fix position shift; e.g. fix_pos_offsets=(-1, 1, 2).")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not -8 <= v <= 8:
            raise ValueError(f"range search fix position shift {v!r} must be an integer in [-8, 8]; e.g. (-1, 1, 2).")
    return values


def search_activation_ranges(
    qmodel: nn.Module,
    data: Iterable[Any],
    *,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    fix_pos_offsets: Sequence[int] = DEFAULT_FIX_POS_OFFSETS,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 4,
    max_samples: int | None = 128,
    progress: bool = True,
) -> RangeSearchReport:
    """Choose the clipping percentile (power-of-two scales: the fix position shift) of each activation group (see
    the module docstring); the model is updated in place and the report is also kept in
    ``prepare_info(qmodel).range_search``.

    Args:
        qmodel: a PTQ model calibrated with the ``percentile`` activation estimator, or with power-of-two activation
            scales (``target="dpu"``).
        data: calibration batches (never the evaluation data); the first ``num_batches`` are used.
        candidates: percentiles to try, each in (50, 100]; 100 is the observed min/max.
        fix_pos_offsets: (power-of-two scales) fix position shifts to try besides 0, integers in [-8, 8]; +1 halves
            every scale of the group.
        transform_fn: maps one item of ``data`` to the model input (as in ``quantize``).
        num_batches: batches the objective is measured on (at most).
        max_samples: rows (along dim 0) of those batches the objective is measured on; None keeps them all.
        progress: show a progress bar.

    Raises:
        NotCalibratedError: no quantizer has seen data.
        ValueError: activations with neither the ``percentile`` estimator nor power-of-two scales, no candidate, a
            percentile outside (50, 100], a shift that is not an integer in [-8, 8], empty data, ``max_samples`` < 1,
            or a model whose output is not a tensor.
    """
    require_any_calibrated(qmodel, "range search")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"range search max_samples={max_samples!r} must be a positive integer or None (every row).")
    percentiles, offsets = _percentiles(candidates), _fix_pos_offsets(fix_pos_offsets)
    groups = activation_groups(qmodel)
    parameter = _parameter_of(next(iter(groups.values()))[0][1])
    grid = offsets if parameter == "fix_pos_offset" else percentiles
    knobs = {g: (_FixPosKnob if parameter == "fix_pos_offset" else _PercentileKnob)(m) for g, m in groups.items()}
    inputs = first_rows(bounded_inputs(data, transform_fn, num_batches, qmodel, "range search"), max_samples)
    report = RangeSearchReport(
        parameter=parameter,
        groups={g: [n for n, _ in m] for g, m in groups.items()},
        batches=len(inputs),
        samples=_rows(inputs),
    )
    quantizers = [fq for _, fq in iter_quantizers(qmodel)]
    total = 1 + len(groups) * (len(grid) + 2)  # + 2: at most two more trials around the best one
    bar = tqdm(total=total, desc="Range search", disable=not progress, leave=False)
    with restored_switches(quantizers), torch.no_grad():
        set_fake_quant(qmodel, False)
        with float_parameters_swapped_in(qmodel):  # the float model, also after bias correction & co.
            reference = model_outputs(qmodel, inputs, action="range search")
        set_fake_quant(qmodel, True)

        def error() -> float:
            bar.update(1)
            return relative_output_error(reference, model_outputs(qmodel, inputs, action="range search"))

        best = report.start_error = error()
        for group, knob in knobs.items():
            kept, changed = knob.start()
            if changed:
                best = error()
            tried = {kept: best}
            for round_ in (grid, None):  # the grid, then around the best one (halfway trials / one step further)
                for value in [v for v in round_ or knob.more(sorted(tried), kept) if v not in tried]:
                    knob.set(value)
                    tried[value] = trial = error()
                    report.trials.append((group, value, trial))
                    if trial < best:
                        best, kept = trial, value
            knob.set(kept)
            report.chosen[group] = kept
    bar.close()
    report.final_error = best
    prepare_info(qmodel).range_search = report
    return report
