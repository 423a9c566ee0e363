"""The float model behind a refined PTQ model: the parameter values that refinements replaced.

Bias correction, AdaRound and fast finetune change the *float* weights and biases of a calibrated fake-quant
model so that its quantized output gets closer to the float model's. Afterwards, the same model with fake-quant
switched off is no longer the float model, so every comparison "fake-quant on vs off" (the later refinements'
float targets, the quantization report's SQNR) would measure the error against a moving reference. Each
refinement therefore calls :func:`record_float_parameters` before it changes a layer; the first value of each
parameter is kept on the model (in its ``__dict__``, not in its ``state_dict``), and
:func:`float_parameters_swapped_in` / :func:`restore_float_parameters` put those values back where the float model
is needed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant.config import scheme_for_target
    >>> from lightning_quant.quantizers.modules import quantized_layer_from_float
    >>> root = nn.Sequential(quantized_layer_from_float(nn.Linear(2, 2), scheme_for_target("x86"), "0"))
    >>> before = root[0].weight.detach().clone()
    >>> record_float_parameters(root, "0", root[0], ("weight",)); _ = root[0].weight.data.add_(1.0)
    >>> with float_parameters_swapped_in(root):
    ...     torch.equal(root[0].weight, before)
    True
    >>> torch.equal(root[0].weight, before + 1.0)  # the refined value is back
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["float_bias", "float_parameters_swapped_in", "recorded_float_parameters", "record_float_parameters"]
__all__ += ["restore_float_parameters"]

_FLOAT_PARAMETERS = "_lightning_quant_float_parameters"


def record_float_parameters(model: nn.Module, name: str, layer: nn.Module, which: Iterable[str] = ("bias",)) -> None:
    """Remember ``layer``'s parameters ``which`` (``"weight"``, ``"bias"``) before their first change.

    A parameter already recorded keeps its first value, so the record stays the float model's however many
    refinements run. A missing bias is recorded as ``None`` (bias correction may create one).
    """
    originals = model.__dict__.setdefault(_FLOAT_PARAMETERS, {}).setdefault(name, {})
    for attr in which:
        if attr not in originals:
            value = getattr(layer, attr)
            originals[attr] = None if value is None else value.detach().clone()


def recorded_float_parameters(model: nn.Module) -> dict[str, dict[str, torch.Tensor | None]]:
    """``{layer name: {parameter name: float value}}`` recorded on ``model`` (empty when nothing was refined).

    A deep copy of an ``fx.GraphModule`` does not carry the record along; pass the original model.
    """
    return model.__dict__.get(_FLOAT_PARAMETERS, {})


def float_bias(model: nn.Module, name: str, layer: nn.Module) -> torch.Tensor | None:
    """``layer``'s float-model bias: the recorded one, else its current bias."""
    originals = recorded_float_parameters(model).get(name, {})
    return originals["bias"] if "bias" in originals else layer.bias


def restore_float_parameters(model: nn.Module, source: nn.Module) -> None:
    """Put into ``model`` (a reference copy of ``source``) the float values recorded on ``source``, for good.

    A bias that did not exist before is removed. ``source`` is passed because a deep copy of an fx.GraphModule
    does not carry the record along.
    """
    with torch.no_grad():
        for name, saved in recorded_float_parameters(source).items():
            layer = model.get_submodule(name)
            for attr, value in saved.items():
                _put(layer, attr, value)


def _put(layer: nn.Module, attr: str, value: torch.Tensor | None) -> None:
    """Write a recorded float value into ``layer`` (``None``: the parameter did not exist, remove it)."""
    if value is None:
        setattr(layer, attr, None)
    else:
        getattr(layer, attr).copy_(value)


@contextlib.contextmanager
def float_parameters_swapped_in(model: nn.Module, layers: Iterable[str] | None = None) -> Iterator[int]:
    """Run ``model`` with its recorded float parameters in place of the refined ones (of every layer, or of the
    layers named in ``layers`` only); yields how many layers were swapped. The refined values (the very same
    Parameter objects) are back on exit, also after an error."""
    undo: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor | None]] = []
    record = recorded_float_parameters(model)
    if layers is not None:
        wanted = set(layers)
        record = {name: saved for name, saved in record.items() if name in wanted}
    try:
        with torch.no_grad():
            for name, saved in record.items():
                layer = model.get_submodule(name)
                for attr, value in saved.items():
                    current = getattr(layer, attr)
                    if current is None:
                        continue
                    undo.append((layer, attr, current, None if value is None else current.detach().clone()))
                    _put(layer, attr, value)
        yield len(record)
    finally:
        with torch.no_grad():
            for layer, attr, parameter, refined in reversed(undo):
                if refined is None:
                    setattr(layer, attr, parameter)
                else:
                    parameter.copy_(refined)
