"""AdaRound (Nagel et al. 2020): learn, layer by layer, whether each weight rounds up or down.

Nearest rounding minimizes each weight's own error, not the layer's output error. AdaRound keeps the calibrated
weight scale and learns a rounding offset ``h(V)`` in [0, 1] per weight:
``w_soft = s * (clamp(floor(w / s) + h(V) + zp, qmin, qmax) - zp)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1)``, initialised so that ``h`` equals the fractional part of ``w / s``
(nearest rounding). Adam minimizes the layer's relative output error against the float model (inputs from the
quantized model, earlier layers already rounded, as in the paper's asymmetric reconstruction) plus
``reg_weight * mean(1 - |2 h - 1| ** beta)`` after a warm-up, ``beta`` annealed from 20 to 2, which drives every
``h`` to 0 or 1. The weight is then replaced by its hard-rounded value (already on the quantization grid, so the
frozen weight fake-quant reproduces it exactly and every exporter writes those integers).

As for fast finetune, a layer's result is kept only if its held-sample output error went down against nearest
rounding; otherwise the layer is restored exactly. Scales never move. Most useful at 4-6 bit weights.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> from lightning_quant.config import scheme_for_target
    >>> torch.manual_seed(0); model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    <torch._C.Generator object at ...>
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    >>> qmodel = quantize(model, data, scheme=scheme_for_target("x86", weight_bits=4), progress=False)
    >>> report = adaround(qmodel, data, steps=200, progress=False)
    >>> [t.name for t in report.layers], all(t.mse_after <= t.mse_before for t in report.layers)
    (['0', '2'], True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_quant.algorithms.float_reference import record_float_parameters
from lightning_quant.algorithms.layerwise import (
    LayerTuning,
    bounded_inputs,
    check_tuning_options,
    layer_targets,
    quantized_bias,
    require_any_calibrated,
    weight_layers,
)
from lightning_quant.algorithms.windows import HeldSamples, check_window
from lightning_quant.quantizers.functional import _broadcast

__all__ = ["AdaRoundReport", "adaround"]

_ZETA, _GAMMA = 1.1, -0.1  # rectified sigmoid stretch (the paper's values)


@dataclass
class AdaRoundReport:
    """What :func:`adaround` did, layer by layer in execution order (MSE to the float output, nearest vs learned)."""

    layers: list[LayerTuning] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    flipped: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seed: int = 0

    @property
    def kept(self) -> list[str]:
        return [t.name for t in self.layers if t.kept]


def _soft_offset(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


class _LearnedRounding(nn.Module):
    """The rounding variables of one layer's weight, with its frozen scale/zero point and integer range."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        fq = layer.weight_fake_quant
        weight = layer.weight.detach()
        self.qmin, self.qmax = fq.spec.quant_range()
        self.scale = _broadcast(fq.scale.detach(), weight, fq.spec.ch_axis)
        self.zero_point = _broadcast(fq.zero_point.detach().to(weight.dtype), weight, fq.spec.ch_axis)
        scaled = weight / self.scale
        self.floor = torch.floor(scaled)
        rest = (scaled - self.floor).clamp(0.01, 0.99)  # sigmoid^-1 is finite inside (gamma, zeta)
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0))

    def weight(self, hard: bool = False) -> torch.Tensor:
        offset = (self.v >= 0).to(self.floor.dtype) if hard else _soft_offset(self.v)
        codes = torch.clamp(self.floor + offset + self.zero_point, self.qmin, self.qmax)
        return (codes - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * _soft_offset(self.v) - 1.0).abs().pow(beta)).mean()


def _frozen_bias(layer: nn.Module) -> torch.Tensor | None:
    """The quantized bias, detached: AdaRound learns only the rounding, and the bias must collect no gradient."""
    bias = quantized_bias(layer)
    return None if bias is None else bias.detach()


def _row_power(held: HeldSamples) -> torch.Tensor:
    """Each held sample's float output power (mean of ``y^2`` over its whole map), for per-sample weighting."""
    return held.y.double().pow(2).flatten(1).mean(1).clamp_min(1e-12)


def _held_error(
    layer: nn.Module, weight: torch.Tensor, held: HeldSamples, batch_size: int, row_power: torch.Tensor | None
) -> float:
    """The held samples' whole-map output MSE, or (``row_power`` given) the mean over samples of each sample's MSE
    divided by its float output power."""
    bias = _frozen_bias(layer)
    if row_power is None:
        return held.mse(layer, weight, bias, batch_size)
    total = 0.0
    with torch.no_grad():
        for i in range(0, held.rows, batch_size):
            out = held.forward(layer, held.x[i : i + batch_size], weight, bias)
            err = (out - held.y[i : i + batch_size]).double().pow(2).flatten(1).mean(1)
            total += (err / row_power[i : i + batch_size]).sum().item()
    return total / held.rows


def _learn(
    layer: nn.Module, held: HeldSamples, *, steps: int, lr: float, reg_weight: float, warmup: float,
    batch_size: int, generator: torch.Generator, row_power: torch.Tensor | None,
) -> _LearnedRounding:  # fmt: skip
    rounding = _LearnedRounding(layer)
    optimizer = torch.optim.Adam([rounding.v], lr=lr)
    bias = _frozen_bias(layer)
    power = held.y.pow(2).mean().clamp_min(1e-12)
    start = int(warmup * steps)
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randperm(held.rows, generator=generator)[:batch_size].to(held.x.device)
            x, y = held.draw(idx, generator)
            err = (held.forward(layer, x, rounding.weight(), bias) - y).pow(2)
            if row_power is None:
                loss = err.mean() / power
            else:  # every sample weighs the same, whatever its activations' magnitude
                loss = (err.flatten(1).mean(1) / row_power[idx].to(err.dtype)).mean()
            if step >= start:
                progress = (step - start) / max(steps - start, 1)
                loss = loss + reg_weight * rounding.regularizer(20.0 + (2.0 - 20.0) * progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return rounding


def adaround(
    qmodel: nn.Module,
    calibration_data: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 4,
    steps: int = 500,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    batch_size: int = 32,
    max_samples: int = 128,
    window: int | None = 16,
    per_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> AdaRoundReport:
    """Learn the weight rounding of every conv/linear layer of a calibrated fake-quant PTQ model, in place.

    See the module docstring for the method. Only float weights change (to values on their quantization grid);
    scales and biases stay. The same seed and data give identical weights.

    Args:
        qmodel: a model returned by :func:`lightning_quant.quantize` (or ``prepare`` + ``calibrate``).
        calibration_data: iterable of batches; only the first ``num_batches`` are used.
        transform_fn: maps one item of ``calibration_data`` to the model input.
        num_batches: batches fed per layer.
        steps: Adam steps per layer (the paper uses 10k on GPU; 300-1000 are enough for small CNNs on CPU).
        lr: Adam learning rate of the rounding variables.
        reg_weight: weight of the rounding regularizer (the paper's lambda, 0.01).
        warmup: fraction of ``steps`` before the regularizer starts (0.2 in the paper).
        batch_size: samples per Adam step (drawn from the held samples).
        max_samples: rows (along dim 0) of one layer's input and target held in memory.
        window: output pixels per side of the random spatial block of a 2-D conv's maps that each Adam step
            sees (see :mod:`~lightning_quant.algorithms.windows`); None uses whole maps. The default 16 makes
            the large early layers of an ImageNet-size CNN many times cheaper per step (CIFAR ResNets: same
            accuracy within noise).
        per_sample: weigh each held sample's output error by the inverse of its float output's power, in the
            loss and in the keep test (then ``mse_before``/``mse_after`` are that mean relative error), so that a
            few images with huge activations (ResNet50 on Imagenette) do not decide the rounding for the rest.
        seed: seed of the sample order (and of the windows).
        progress: show a progress bar over layers.

    Returns:
        An :class:`AdaRoundReport`: per layer the output MSE with nearest and with learned rounding, whether it
        was kept, and the fraction of weights whose rounding changed (``flipped``).

    Raises:
        ValueError: a non-positive ``steps``/``num_batches``/``batch_size``/``max_samples``/``lr``, a non-integer
            ``seed``, ``reg_weight``
            < 0, ``warmup`` outside [0, 1), empty data, a batch the model cannot take, a model without
            lightning_quant fake-quant Conv/Linear layers, or a QAT conv+BN (convert it first).
        NotCalibratedError: the model was never calibrated.
    """
    check_tuning_options(steps, lr, num_batches, batch_size, max_samples, seed)
    check_window(window)
    if not (isinstance(reg_weight, (int, float)) and reg_weight >= 0):
        raise ValueError(f"reg_weight={reg_weight!r} must be a number >= 0 (0.01 is the paper's value).")
    if not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise ValueError(f"warmup={warmup!r} must be a fraction in [0, 1) of the steps (0.2 is the paper's value).")
    layers = weight_layers(qmodel, "adaround")
    require_any_calibrated(qmodel, "adaround")
    inputs = bounded_inputs(calibration_data, transform_fn, num_batches, qmodel, "adaround")
    was_training = qmodel.training
    report = AdaRoundReport(steps=steps, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    try:
        targets = layer_targets(qmodel, inputs, layers, max_samples=max_samples, skipped=report.skipped)
        for name, layer, x, y in tqdm(
            targets, "AdaRound", len(layers), leave=False, disable=not progress, unit="layer"
        ):
            held = HeldSamples.of(layer, x, y, window)
            del x, y  # the padded copy replaces the input
            nearest = layer.weight_fake_quant(layer.weight).detach()
            row_power = _row_power(held) if per_sample else None
            before = _held_error(layer, nearest, held, batch_size, row_power)
            rounding = _learn(
                layer, held, steps=steps, lr=lr, reg_weight=reg_weight, warmup=warmup, batch_size=batch_size,
                generator=generator, row_power=row_power,
            )  # fmt: skip
            learned = rounding.weight(hard=True).detach()
            after = _held_error(layer, learned, held, batch_size, row_power)
            kept = after < before
            if kept:
                record_float_parameters(qmodel, name, layer, ("weight",))
                with torch.no_grad():
                    layer.weight.copy_(learned)
                report.flipped[name] = (learned != nearest).float().mean().item()
            report.layers.append(LayerTuning(name, before, min(before, after), kept, held.rows))
    finally:
        qmodel.train(was_training)
    return report
