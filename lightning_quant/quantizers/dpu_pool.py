"""Average pooling as the Vitis AI DPU computes it: a window sum times a dyadic reciprocal of the window size.

The DPU has no divider: an ``n``-element average is ``sum * factor / 2**shift`` with ``factor / 2**shift``
close to ``1 / n`` (global 7x7 pooling: ``21 / 1024`` instead of ``1 / 49``), so its output is the float
average times ``n * factor / 2**shift`` (49 * 21 / 1024 = 1.0049 for 7x7). vai_q_pytorch models this as an
average pool followed by a multiply; :class:`DPUAvgPool2d` does the same, computing ``sum * (factor /
2**shift)``, which is exact in float32 for any window of codes, so deployment and reference interpreters agree
bit for bit. ``prepare()`` swaps average pools for it when the scheme's target is ``dpu``.

Example:
    >>> import torch
    >>> avgpool_multiplier(7, 7), round(avgpool_scale(7, 7), 4), avgpool_multiplier(2, 2)
    ((21, 10), 1.0049, (1, 2))
    >>> pool = DPUAvgPool2d(global_pool=True)
    >>> pool(torch.ones(1, 2, 7, 7)).flatten().tolist()
    [1.0048828125, 1.0048828125]
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["DPUAvgPool2d", "avgpool_multiplier", "avgpool_scale", "use_dpu_avgpool"]

# kernel (h, w) -> (factor, shift) the DPU uses for these window sizes
_KNOWN_RECIPROCALS = {(3, 3): (7, 6), (5, 5): (10, 8), (6, 6): (7, 8), (7, 7): (21, 10), (14, 14): (21, 12)}


def avgpool_multiplier(kernel_h: int, kernel_w: int) -> tuple[int, int]:
    """``(factor, shift)`` such that the DPU computes a ``kernel_h x kernel_w`` average as ``sum * factor >> shift``.

    Known DPU window sizes (3x3, 5x5, 6x6, 7x7, 14x14) use their fixed reciprocals; other sizes the closest
    ``round(2**s / n) / 2**s`` over ``s < ceil(log2(128 n))`` (exact for powers of two).

    Example:
        >>> avgpool_multiplier(3, 3), avgpool_multiplier(4, 4), avgpool_multiplier(1, 3)
        ((7, 6), (1, 4), (85, 8))

    Raises:
        ValueError: a kernel side below 1.
    """
    if kernel_h < 1 or kernel_w < 1:
        raise ValueError(f"average-pool kernel {kernel_h}x{kernel_w} is empty; kernel sides must be >= 1.")
    if (kernel_h, kernel_w) in _KNOWN_RECIPROCALS:
        return _KNOWN_RECIPROCALS[(kernel_h, kernel_w)]
    n = kernel_h * kernel_w
    best, best_diff = (1, 0), abs(1.0 - 1.0 / n)
    for shift in range(math.ceil(math.log2(n * 128))):
        factor = round(2**shift / n)
        diff = abs(factor / 2**shift - 1.0 / n)
        if diff < best_diff:
            best, best_diff = (factor, shift), diff
    return best


def avgpool_scale(kernel_h: int, kernel_w: int) -> float:
    """The DPU's average divided by the true average: ``n * factor / 2**shift`` (1.0 for power-of-two windows).

    Example:
        >>> avgpool_scale(3, 3), avgpool_scale(2, 2)
        (0.984375, 1.0)
    """
    factor, shift = avgpool_multiplier(kernel_h, kernel_w)
    return kernel_h * kernel_w * factor / 2**shift


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class DPUAvgPool2d(nn.Module):
    """2D average pooling with the DPU's reciprocal: ``window_sum * factor / 2**shift``.

    Args:
        kernel_size: window (ignored when ``global_pool`` or ``output_size`` is set).
        stride: step; defaults to the kernel.
        padding: zero padding (counted in the window, like PyTorch's default ``count_include_pad=True``).
        global_pool: one output per channel over the whole feature map.
        output_size: adaptive pooling to this size; the input size must be a multiple of it.

    Raises:
        ValueError: (in forward) an adaptive output size that does not divide the input size.
    """

    def __init__(
        self,
        kernel_size: Any = 1,
        stride: Any = None,
        padding: Any = 0,
        global_pool: bool = False,
        output_size: Any = None,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)
        self.global_pool = global_pool
        self.output_size = None if output_size is None else _pair(output_size)

    def window(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``(kernel, stride, padding)`` as (h, w) pairs for an input of ``height x width``."""
        if self.global_pool:
            return (height, width), (height, width), (0, 0)
        if self.output_size is not None:
            oh, ow = self.output_size
            if height % oh or width % ow:
                raise ValueError(
                    f"adaptive average pooling from {height}x{width} to {oh}x{ow}: the DPU pools fixed windows, so the "
                    "input size must be a multiple of the output size; resize the input or use nn.AvgPool2d."
                )
            return (height // oh, width // ow), (height // oh, width // ow), (0, 0)
        return self.kernel_size, self.stride, self.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int(): under torch.jit.trace sizes are tensors; the DPU's window (and its reciprocal) is fixed per input size
        kernel, stride, padding = self.window(int(x.shape[-2]), int(x.shape[-1]))
        factor, shift = avgpool_multiplier(*kernel)
        if kernel == (int(x.shape[-2]), int(x.shape[-1])) and padding == (0, 0):
            total = x.sum(dim=(-2, -1), keepdim=True)  # ReduceSum in ONNX
        else:  # torch.onnx drops divisor_override (AveragePool has no such attribute): scale the mean back up
            total = F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True) * float(kernel[0] * kernel[1])
        return total * (factor / 2**shift)

    def extra_repr(self) -> str:
        if self.global_pool:
            return "global"
        if self.output_size is not None:
            return f"output_size={self.output_size}"
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def _from_module(module: nn.Module, name: str) -> DPUAvgPool2d:
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = _pair(module.output_size) if module.output_size is not None else None
        if size is None or None in size:
            raise ValueError(f"{name}: AdaptiveAvgPool2d({module.output_size}) keeps a free size; give both sides.")
        return DPUAvgPool2d(global_pool=size == (1, 1), output_size=None if size == (1, 1) else size)
    if module.ceil_mode or (not module.count_include_pad and _pair(module.padding) != (0, 0)):
        raise ValueError(
            f"{name}: AvgPool2d with ceil_mode=True or count_include_pad=False and padding has no DPU equivalent "
            "here; use ceil_mode=False and count_include_pad=True."
        )
    if module.divisor_override is not None:
        raise ValueError(f"{name}: AvgPool2d(divisor_override=...) has no DPU equivalent; remove divisor_override.")
    return DPUAvgPool2d(module.kernel_size, module.stride, module.padding)


def _from_call(node: fx.Node) -> DPUAvgPool2d | None:
    args = list(node.args[1:])
    if node.target is F.adaptive_avg_pool2d:
        size = _pair(args[0] if args else node.kwargs["output_size"])
        return DPUAvgPool2d(global_pool=size == (1, 1), output_size=None if size == (1, 1) else size)
    names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
    kw = dict(zip(names, args, strict=False)) | dict(node.kwargs)
    module = nn.AvgPool2d(**kw)
    return _from_module(module, node.name)


def use_dpu_avgpool(gm: fx.GraphModule) -> list[str]:
    """Replace every 2D average pool of ``gm`` (modules and ``F.avg_pool2d``/``F.adaptive_avg_pool2d`` calls) in place.

    Returns:
        The names of the replaced pools.

    Raises:
        ValueError: a pool the DPU cannot compute (ceil mode, count_include_pad=False with padding, a free
            adaptive size); the message names it.
    """
    replaced = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            new = _from_module(gm.get_submodule(node.target), str(node.target))
            parent, _, attr = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, new)
            replaced.append(str(node.target))
        elif node.op == "call_function" and node.target in (F.avg_pool2d, F.adaptive_avg_pool2d):
            target = f"dpu_avgpool_{node.name}"
            gm.add_module(target, _from_call(node))
            with gm.graph.inserting_after(node):
                new_node = gm.graph.call_module(target, (node.args[0],))
            node.replace_all_uses_with(new_node)
            gm.graph.erase_node(node)
            replaced.append(node.name)
    gm.recompile()
    return replaced
