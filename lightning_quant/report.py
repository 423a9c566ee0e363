"""Quantization report: per-layer SQNR, scales and ranges, and which parts stay in float and why.

SQNR compares each quantized layer's output with fake-quant on against the same model with fake-quant off
(the float reference), on the same batch, so it measures the error accumulated up to that layer. Where bias
correction, AdaRound or fast finetune changed float weights, the reference pass runs with the values they replaced
(:mod:`~lightning_quant.algorithms.float_reference`), so the reference stays the float model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> qmodel = quantize(model, [torch.randn(8, 3, 12, 12) for _ in range(4)], progress=False)
    >>> report = quantization_report(qmodel, torch.randn(2, 3, 12, 12))
    >>> [row.name for row in report.rows], report.output_sqnr_db > 20
    (['0', '2'], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_quant.algorithms.float_reference import float_parameters_swapped_in
from lightning_quant.calibration import call_model, move_to_device
from lightning_quant.quantizers.functional import per_sample_noise_ratio, sqnr_db
from lightning_quant.quantizers.modules import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvBn, QuantLinear
from lightning_quant.quantizers.prepare import iter_quantizers, prepare_info

__all__ = ["LayerReport", "QuantReport", "quantization_report"]

# refinements that change float weights or biases (the report then restores their earlier values as the reference)
_WEIGHT_CHANGING = ("bias_correction", "adaround", "fast_finetune")

_WEIGHT_LAYERS = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantConvBn)


@dataclass
class LayerReport:
    name: str
    kind: str
    sqnr_db: float
    weight_scale_min: float
    weight_scale_max: float


@dataclass
class QuantReport:
    """Rows for quantized layers, activation quantizer ranges, float parts with reasons, output SQNR."""

    rows: list[LayerReport]
    activations: dict[str, dict[str, Any]]
    float_layers: dict[str, str]
    untraced: dict[str, str]
    output_sqnr_db: float
    notes: list[str] = field(default_factory=list)
    # the median over samples of each sample's output SQNR: a few outlier samples can pull the pooled value far down
    output_sqnr_median_db: float = float("nan")

    def metrics(self, prefix: str = "quant") -> dict[str, float]:
        """Flat metrics for a Lightning logger (finite values only)."""
        out = {f"{prefix}/output_sqnr_db": self.output_sqnr_db, f"{prefix}/min_layer_sqnr_db": self.min_sqnr()}
        out[f"{prefix}/output_sqnr_median_db"] = self.output_sqnr_median_db
        out.update({f"{prefix}/sqnr_db/{r.name}": r.sqnr_db for r in self.rows})
        out[f"{prefix}/float_layers"] = float(len(self.float_layers))
        return {k: float(v) for k, v in out.items() if v == v and abs(v) != float("inf")}

    def median_note(self) -> str:
        """``median over samples ... dB``: read beside the pooled output SQNR."""
        return f"median over samples {self.output_sqnr_median_db:.2f} dB"

    def min_sqnr(self) -> float:
        return min((r.sqnr_db for r in self.rows), default=float("nan"))

    def to_table(self) -> str:
        """Plain-text table for the console."""
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'type':<12} {'SQNR dB':>8}  {'weight scale min..max':>24}"]
        lines.append("-" * len(lines[0]))
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {r.kind:<12} {r.sqnr_db:>8.2f}  "
                f"{r.weight_scale_min:>11.3e}..{r.weight_scale_max:.3e}"
            )
        lines.append(
            f"model output SQNR: {self.output_sqnr_db:.2f} dB ({self.median_note()}); {len(self.rows)} layers "
            f"quantized, {len(self.activations)} activation quantizers"
        )
        if self.untraced:
            lines.append("not captured as a graph (their own ops stay float; conv/linear inside are quantized):")
            lines.extend(f"  {name}: {why}" for name, why in self.untraced.items())
        if self.float_layers:
            lines.append("kept in float:")
            lines.extend(f"  {name}: {why}" for name, why in self.float_layers.items())
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def _capture_outputs(model: nn.Module, inputs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS):

            def hook(_m, _i, out, name=name):
                if isinstance(out, torch.Tensor):
                    outputs[name] = out.detach().float().cpu()

            handles.append(module.register_forward_hook(hook))
    try:
        result = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return result, outputs


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else []
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


@torch.no_grad()
def quantization_report(model: nn.Module, inputs: Any) -> QuantReport:
    """Build a :class:`QuantReport` for a calibrated/QAT model on one batch of model inputs.

    Args:
        model: a prepared and calibrated model.
        inputs: one model input (after ``transform_fn``): a tensor, a tuple of args or a dict of kwargs.
    """
    quantizers = list(iter_quantizers(model))
    flags = [(fq, fq.fake_quant_enabled.clone(), fq.observer_enabled.clone()) for _, fq in quantizers]
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    inputs = move_to_device(inputs, param.device if param is not None else torch.device("cpu"))
    try:
        for fq, _, _ in flags:
            fq.disable_observer()
            fq.disable_fake_quant()
        with float_parameters_swapped_in(model) as restored_layers:  # the float model, not the refined float weights
            ref_out, ref = _capture_outputs(model, inputs)
        for fq, fq_on, _ in flags:
            fq.enable_fake_quant(bool(fq_on.item()))
        q_out, quant = _capture_outputs(model, inputs)
    finally:
        for fq, fq_on, obs_on in flags:
            fq.enable_fake_quant(bool(fq_on.item()))
            fq.enable_observer(bool(obs_on.item()))
        model.train(was_training)
    modules = dict(model.named_modules())
    rows = []
    for name, out in ref.items():
        module = modules[name]
        scale = module.weight_fake_quant.scale.detach()
        kind = type(module.conv).__name__ + "+BN" if isinstance(module, QuantConvBn) else type(module).__name__[5:]
        rows.append(LayerReport(name, kind, sqnr_db(out, quant[name]), scale.min().item(), scale.max().item()))
    activations = {name: fq.describe() for name, fq in quantizers if not name.endswith("weight_fake_quant")}
    ref_t, q_t = _first_tensor(ref_out), _first_tensor(q_out)
    out_sqnr = sqnr_db(ref_t.float(), q_t.float()) if ref_t is not None and q_t is not None else float("nan")
    median = _median_sample_sqnr(ref_t, q_t) if ref_t is not None and q_t is not None else float("nan")
    try:
        info = prepare_info(model)
        float_layers, untraced = dict(info.float_layers), dict(info.untraced)
        notes = (
            [f"quantized on their own (graph capture failed around them): {', '.join(info.module_level)}"]
            if info.module_level
            else []
        )
        notes += _reference_note(info.refinements, restored_layers)
    except ValueError:
        float_layers, untraced, notes = {}, {}, []
    return QuantReport(rows, activations, float_layers, untraced, out_sqnr, notes, median)


def _reference_note(refinements: list[str], restored_layers: int) -> list[str]:
    """What the SQNR reference is when refinements changed the float weights (none otherwise)."""
    changed = [s.replace("_", " ") for s in refinements if s in _WEIGHT_CHANGING]
    if not changed:
        return []
    if restored_layers:
        before = ", ".join(changed)
        return [f"SQNR reference: the float weights as before {before} (recorded for {restored_layers} layers)"]
    return [
        f"SQNR reference: the float weights as {', '.join(changed)} left them (their earlier values are not on "
        "this model, e.g. it was restored from a state file): the SQNR measures the error against those, not "
        "against the float model"
    ]


def _median_sample_sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Median over the rows (samples) of ``10 log10(||ref||^2 / ||ref - approx||^2)``; inf where a row is exact."""
    if reference.dim() < 2:
        return sqnr_db(reference.float(), approx.float())
    return float((-10.0 * torch.log10(per_sample_noise_ratio(reference, approx))).median())
