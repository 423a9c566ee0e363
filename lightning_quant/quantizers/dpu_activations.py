"""Hard-Sigmoid and Hard-Swish as the Vitis AI DPU computes them: ``relu6(x + 3) * 2731 / 2**14`` instead of ``/ 6``.

The DPU has no divider: it multiplies by ``2731 / 16384`` (``1/6 + 1.2e-5``). vai_q_pytorch 3.5 models this in its DPU
modules (``src/vai_quantizer/vai_q_pytorch/pytorch_binding/pytorch_nndct/nn/modules/hardsigmoid.py`` and
``hardswish.py`` in the Vitis-AI repository, ``deephi_Hardsigmoid`` / ``deephi_Hardswish``):

* Hard-Sigmoid: ``relu6(x + 3) * 2731 / 16384``, then the output's own fix position;
* Hard-Swish: ``x * fix(relu6(x + 3) * 2731 / 16384, fix_point=7)``, the Hard-Sigmoid rounded to 8 bits at position 7
  with the DPU's rounding (half up), times the (quantized) input, then the output's fix position.

Its XModel writer (``nndct_shared/compile/xop_creator.py``: ``hsigmoid``, ``hswish``) stores the same as XIR
``hard-sigmoid`` (``relu6(x + 3) / 6``) followed by a ``mul`` with the constant ``6 * 2731 / 16384``, and, for
Hard-Swish, a ``fix`` at position 7 and a ``mul`` with the input. :class:`DPUHardsigmoid` and :class:`DPUHardswish`
compute these values exactly: the product ``relu6(x + 3) * 2731`` of a value on a ``2**-fix_point`` grid can need more
bits than float32 holds, so it is formed in float64 and rounded toward minus infinity to float32, which keeps every
later DPU rounding (``floor(v * 2**fp + 0.5)``, thresholds representable in float32) where the exact value puts it.
``prepare()`` swaps ``nn.Hardsigmoid``/``nn.Hardswish`` and ``F.hardsigmoid``/``F.hardswish`` for them when the
scheme's target is ``dpu``.

Example:
    >>> import torch
    >>> x = torch.tensor([-4.0, -1.0, 0.0, 1.0, 3.0])
    >>> DPUHardsigmoid()(x).tolist()  # relu6(x + 3) * 2731 / 16384
    [0.0, 0.3333740234375, 0.50006103515625, 0.666748046875, 1.0001220703125]
    >>> DPUHardswish()(x).tolist()  # x * round_half_up(hard_sigmoid * 128) / 128
    [-0.0, -0.3359375, 0.0, 0.6640625, 2.9765625]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "HSIGMOID_FACTOR",
    "HSIGMOID_SHIFT",
    "HSWISH_FIX_POINT",
    "DPUHardsigmoid",
    "DPUHardswish",
    "dpu_hardsigmoid",
    "dpu_hardswish",
    "dpu_hardswish_factor",
    "use_dpu_activations",
]

HSIGMOID_FACTOR = 2731  # the DPU's 1/6: 2731 / 2**14
HSIGMOID_SHIFT = 14
HSWISH_FIX_POINT = 7  # Hard-Swish rounds its Hard-Sigmoid factor to 8 bits at this position before the multiply
_SCALE = HSIGMOID_FACTOR / 2**HSIGMOID_SHIFT


def _round_down_to(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exact`` (float64, >= 0) in ``dtype``, rounded toward zero: ``v >= t`` keeps its truth for every threshold
    ``t`` representable in ``dtype``, so a later ``floor(v * 2**fp + 0.5)`` rounds as the exact value would."""
    if dtype == torch.float64:
        return exact
    near = exact.to(dtype)
    # a positive float32 that rounded up: times (1 - 2**-24) it rounds to the next float32 below it
    down = near.detach() * (1.0 - torch.finfo(dtype).eps / 2)
    fixed = torch.where(near.detach().double() > exact.detach(), down, near.detach())
    return near + (fixed - near.detach())  # the straight-through gradient of the float64 computation


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _hardsigmoid_exact(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x.double() + 3.0) * _SCALE  # exact: a 2**-fp grid value times a 12-bit integer over 2**14


def dpu_hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """The DPU's Hard-Sigmoid ``relu6(x + 3) * 2731 / 16384`` (exact, rounded down to ``x``'s dtype).

    Example:
        >>> dpu_hardsigmoid(torch.tensor([0.0, 3.0])).tolist()
        [0.50006103515625, 1.0001220703125]
    """
    if _exporting():  # QDQ ONNX rounds ties to even anyway; keep to plain float ops
        return F.relu6(x + 3.0) * _SCALE
    return _round_down_to(_hardsigmoid_exact(x), x.dtype)


def dpu_hardswish_factor(x: torch.Tensor) -> torch.Tensor:
    """The factor the DPU's Hard-Swish multiplies ``x`` by: its Hard-Sigmoid rounded half up to 8 bits at position 7
    (``clamp(floor(h * 128 + 0.5), -128, 127) / 128``, in ``x``'s dtype: exact).

    Example:
        >>> dpu_hardswish_factor(torch.tensor([-1.0, 3.0])).tolist()  # 43 / 128 and 127 / 128
        [0.3359375, 0.9921875]
    """
    codes = torch.floor(_hardsigmoid_exact(x) * 2**HSWISH_FIX_POINT + 0.5).clamp(-128, 127)  # DPU_ROUND, exact
    return (codes / 2**HSWISH_FIX_POINT).to(x.dtype)


def dpu_hardswish(x: torch.Tensor) -> torch.Tensor:
    """The DPU's Hard-Swish ``x * fix(relu6(x + 3) * 2731 / 16384, 7)`` (the factor on 8 bits, half up).

    The factor is a multiple of ``2**-7`` in ``[0, 127/128]``, so the product with an int8 activation is exact.

    Example:
        >>> dpu_hardswish(torch.tensor([-1.0, 1.0, 3.0])).tolist()
        [-0.3359375, 0.6640625, 2.9765625]
    """
    if _exporting():
        factor = torch.clamp(torch.floor(F.relu6(x + 3.0) * (_SCALE * 2**HSWISH_FIX_POINT) + 0.5), -128, 127)
        return x * (factor / 2**HSWISH_FIX_POINT)
    return x * dpu_hardswish_factor(x)


class DPUHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` as the DPU computes it: ``relu6(x + 3) * 2731 / 16384`` (see :func:`dpu_hardsigmoid`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dpu_hardsigmoid(x)


class DPUHardswish(nn.Module):
    """``nn.Hardswish`` as the DPU computes it: ``x * fix(relu6(x + 3) * 2731 / 16384, 7)`` (see
    :func:`dpu_hardswish`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dpu_hardswish(x)


_MODULES = {nn.Hardsigmoid: DPUHardsigmoid, nn.Hardswish: DPUHardswish}
_CALLS = {F.hardsigmoid: DPUHardsigmoid, F.hardswish: DPUHardswish}


def use_dpu_activations(gm: fx.GraphModule) -> list[str]:
    """Replace every ``nn.Hardsigmoid``/``nn.Hardswish`` module and ``F.hardsigmoid``/``F.hardswish`` call of ``gm``
    (in place) by :class:`DPUHardsigmoid` / :class:`DPUHardswish`.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardswish()))
        >>> use_dpu_activations(gm), type(gm.get_submodule("1")).__name__
        (['1'], 'DPUHardswish')

    Returns:
        The names of the replaced modules and call nodes.
    """
    replaced = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in _MODULES:
            parent, _, attr = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, _MODULES[type(gm.get_submodule(node.target))]())
            replaced.append(str(node.target))
        elif node.op == "call_function" and node.target in _CALLS:
            target = f"dpu_{node.target.__name__}_{node.name}"
            gm.add_module(target, _CALLS[node.target]())
            with gm.graph.inserting_after(node):
                new_node = gm.graph.call_module(target, (node.args[0],))
            node.replace_all_uses_with(new_node)
            gm.graph.erase_node(node)
            replaced.append(node.name)
    gm.recompile()
    return replaced
