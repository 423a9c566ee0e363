"""Fast finetuning (AdaQuant, Hubara et al. 2021; Vitis AI's ``--fast_finetune``) of a calibrated PTQ model.

Each conv/linear layer is tuned on its own, in execution order. Its inputs come from the quantized model (fake-quant
on, earlier layers already tuned) and its targets from a frozen float copy of the model taken before tuning
(every fake-quant off). Adam then moves the layer's float weight and bias to minimize the mean squared error
between the layer's fake-quant output and the float target, with the weight (and bias) fake-quant in the loop at
its calibrated, frozen scale and a straight-through gradient through the rounding; the learning rate decays to 0
(cosine) and the best iterate on all held samples is tracked (with ``window``: on a fixed probe of blocks), since
straight-through iterates oscillate across rounding boundaries. As in Vitis AI, the update is kept only if the
layer's error on the held samples (whole maps) went down; otherwise the layer is restored exactly.

The weight scale is deliberately not recomputed after tuning: the weights were fitted to that grid, and a new
min/max range would move every quantization level (re-running ``calibrate`` on the tuned model would do so).

Memory: every forward pass stops as soon as the tuned layer has produced what is needed (a hook raises
:class:`~lightning_quant.algorithms.layerwise.StopForward`), and at most ``max_samples`` rows of one layer's input
and target are held at a time, plus one float copy of the model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> from lightning_quant.config import scheme_for_target
    >>> torch.manual_seed(0); model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    <torch._C.Generator object at ...>
    >>> data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    >>> qmodel = quantize(model, data, scheme=scheme_for_target("x86", weight_bits=4), progress=False)
    >>> report = fast_finetune(qmodel, data, steps=20, progress=False)
    >>> [t.name for t in report.layers], all(t.mse_after <= t.mse_before for t in report.layers)
    (['0', '2'], True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lightning_quant.algorithms.float_reference import record_float_parameters
from lightning_quant.algorithms.layerwise import (
    LayerTuning,
    bounded_inputs,
    check_tuning_options,
    layer_forward,
    layer_targets,
    quantized_bias,
    require_any_calibrated,
    weight_layers,
)
from lightning_quant.algorithms.windows import HeldSamples, check_window

__all__ = ["FastFinetuneReport", "LayerTuning", "fast_finetune", "quant_layer_output"]


@dataclass
class FastFinetuneReport:
    """What :func:`fast_finetune` did, layer by layer in execution order."""

    layers: list[LayerTuning] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    lr: float = 0.0
    seed: int = 0

    @property
    def kept(self) -> list[str]:
        """Layers whose tuned weights were kept."""
        return [t.name for t in self.layers if t.kept]

    @property
    def reverted(self) -> list[str]:
        """Layers restored to their weights before tuning (the error did not go down)."""
        return [t.name for t in self.layers if not t.kept]


def quant_layer_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's fake-quant output for ``x``, differentiable w.r.t. its float weight and bias (STE rounding).

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> from lightning_quant.quantizers.modules import quantized_layer_from_float
        >>> q = quantized_layer_from_float(nn.Linear(3, 2), scheme_for_target("x86"), "fc")
        >>> x = torch.randn(4, 3); _ = q(x); q.weight_fake_quant.disable_observer()
        >>> torch.equal(quant_layer_output(q, x), q(x))
        True
    """
    return layer_forward(layer, x, *_quantized_parameters(layer))


def _quantized_parameters(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's fake-quant weight and deployed bias, differentiable w.r.t. the float ones (STE rounding)."""
    return layer.weight_fake_quant(layer.weight), quantized_bias(layer)


def _quant_forward(layer: nn.Module, held: HeldSamples, x: torch.Tensor) -> torch.Tensor:
    """:func:`quant_layer_output` on held rows or windows of ``held``."""
    return held.forward(layer, x, *_quantized_parameters(layer))


@torch.no_grad()
def _layer_mse(layer: nn.Module, held: HeldSamples, batch_size: int) -> float:
    return held.mse(layer, *_quantized_parameters(layer), batch_size)


@torch.no_grad()
def _probe_mse(layer: nn.Module, held: HeldSamples, probe: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return held.probe_mse(layer, *_quantized_parameters(layer), probe)


@contextlib.contextmanager
def _only_weight_and_bias_trainable(layer: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Make the layer's weight/bias require grad and its quantizers' (learnable) scales not; restore afterwards."""
    tuned = [p for p in (layer.weight, layer.bias) if p is not None]
    saved = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(any(p is t for t in tuned))
    try:
        with torch.enable_grad():
            yield tuned
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def _adam_steps(
    layer: nn.Module, held: HeldSamples, *, steps: int, lr: float, batch_size: int,
    generator: torch.Generator, best: list, error: Callable[[], float],
) -> None:  # fmt: skip
    """Adam with a cosine-decayed learning rate; ``best`` ([error, snapshot]) tracks the iterate with the lowest
    ``error()`` (the held error, see :func:`_tune_layer`).

    The error is measured every ``max(1, steps // 20)`` steps and after the last: with coarse (e.g. 4-bit)
    weights the straight-through iterates oscillate across rounding boundaries, so the last one is rarely the best.
    """
    every = max(1, steps // 20)
    with _only_weight_and_bias_trainable(layer) as params:
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for step in range(1, steps + 1):
            idx = torch.randperm(held.rows, generator=generator)[:batch_size].to(held.x.device)
            x, y = held.draw(idx, generator)
            loss = F.mse_loss(_quant_forward(layer, held, x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % every == 0 or step == steps:
                value = error()
                if value < best[0]:
                    best[:] = [value, [p.detach().clone() for p in params]]


def _tune_layer(
    name: str, layer: nn.Module, held: HeldSamples, *, steps: int, lr: float, batch_size: int,
    generator: torch.Generator,
) -> LayerTuning:  # fmt: skip
    """Tune one layer; keep its best iterate only when the whole-map held MSE went down, else restore it exactly.

    On whole maps the best iterate is picked by that same held MSE. With windows, measuring it every
    ``steps // 20`` steps would cost more than all the windowed steps together, so iterates are compared on a
    fixed probe (every held row, each chunk of ``batch_size`` rows on one fixed random block), and the held MSE
    on whole maps is measured only for the winner, which is then kept or reverted on it.
    """
    before = _layer_mse(layer, held, batch_size)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    originals = [p.detach().clone() for p in params]
    if held.window is None:
        error = lambda: _layer_mse(layer, held, batch_size)  # noqa: E731
        best: list = [before, originals]
    else:
        probe = held.probe(batch_size, generator)
        error = lambda: _probe_mse(layer, held, probe)  # noqa: E731
        best = [error(), originals]
    _adam_steps(layer, held, steps=steps, lr=lr, batch_size=batch_size, generator=generator, best=best, error=error)
    _restore(params, best[1])
    after = best[0] if held.window is None else _layer_mse(layer, held, batch_size)
    if after >= before:
        _restore(params, originals)
        after = before
    return LayerTuning(name, before, after, after < before, held.rows)


def _restore(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)


def fast_finetune(
    qmodel: nn.Module,
    calibration_data: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 4,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 32,
    max_samples: int = 128,
    window: int | None = 16,
    seed: int = 0,
    progress: bool = True,
) -> FastFinetuneReport:
    """Tune each conv/linear layer of a calibrated fake-quant PTQ model towards the float model, in place.

    See the module docstring for the method. Observers are switched off (as ``calibrate`` leaves them), so no
    scale moves; only float weights and biases change. The same seed and data give identical weights.

    Args:
        qmodel: a model returned by :func:`lightning_quant.quantize` (or ``prepare`` + ``calibrate``).
        calibration_data: iterable of batches, as for ``quantize``; only the first ``num_batches`` are used.
        transform_fn: maps one item of ``calibration_data`` to the model input.
        num_batches: batches fed per layer.
        steps: Adam steps per layer.
        lr: initial Adam learning rate, in the weights' own units (cosine-decayed to 0 over ``steps``).
        batch_size: samples per Adam step (drawn from the held samples).
        max_samples: rows (along dim 0) of one layer's input and target held in memory.
        window: output pixels per side of the random spatial block of a 2-D conv's maps that each Adam step
            sees (see :mod:`~lightning_quant.algorithms.windows`); None uses whole maps. With windows (default 16,
            as AdaRound) the best iterate is picked on a fixed probe of blocks and kept only if its whole-map
            error is lower.
        seed: seed of the sample order (and of the windows); the result is deterministic for a given seed.
        progress: show a progress bar over layers.

    Returns:
        A :class:`FastFinetuneReport`: per layer the MSE before/after and whether the update was kept.

    Raises:
        ValueError: ``steps``, ``num_batches``, ``batch_size`` or ``max_samples`` not an integer >= 1, ``lr`` not a
            finite number > 0, ``seed`` not an integer, empty data, a batch the model cannot take, a model that
            holds no lightning_quant fake-quant Conv/Linear layer, or a QAT conv+BN (convert it first).
        NotCalibratedError: the model was never calibrated.
    """
    check_tuning_options(steps, lr, num_batches, batch_size, max_samples, seed)
    check_window(window)
    layers = weight_layers(qmodel, "fast_finetune")
    require_any_calibrated(qmodel, "fast_finetune")
    inputs = bounded_inputs(calibration_data, transform_fn, num_batches, qmodel, "fast_finetune")
    was_training = qmodel.training
    report = FastFinetuneReport(steps=steps, lr=lr, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    try:
        targets = layer_targets(qmodel, inputs, layers, max_samples=max_samples, skipped=report.skipped)
        bar = tqdm(targets, "Fast finetune", len(layers), leave=False, disable=not progress, unit="layer")
        for name, layer, x, y in bar:
            held = HeldSamples.of(layer, x, y, window)
            del x, y  # the padded copy replaces the input
            record_float_parameters(qmodel, name, layer, ("weight", "bias"))  # before Adam moves them
            tuning = _tune_layer(name, layer, held, steps=steps, lr=lr, batch_size=batch_size, generator=generator)
            report.layers.append(tuning)
    finally:
        qmodel.train(was_training)
    return report
