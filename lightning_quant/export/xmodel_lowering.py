"""Lowering a calibrated, traced DPU model (torch.fx graph) to XIR ops, one fx node at a time.

Layouts follow XIR: 4-D activations are NHWC, conv weights OHWI, depthwise weights ``[1, kh, kw, C]``,
linear weights ``[out, in]`` (``matmul`` with ``transpose_b``). A flatten of an NCHW tensor becomes a ``reshape``
of the NHWC tensor, so the next linear layer's weight columns are permuted from (C, H, W) to (H, W, C) order.
Attribute and argument names are those of Vitis AI's ``LeNet_int.xmodel`` (and of XIR's op definitions stored
in it, for ops LeNet does not use). What each node is, and whether the DPU can run it, is decided by
:func:`~lightning_quant.export.dpu_rules.dpu_verdict` (the rules :func:`~lightning_quant.inspect_dpu` reports);
this module only writes the ops.

Example:
    >>> _nhwc([1, 8, 4, 4]), _nhwc([2, 10])
    ([1, 4, 4, 8], [2, 10])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from lightning_quant.config import RoundingMode
from lightning_quant.export.dpu_rules import (
    SUPPORTED_SUMMARY,
    dpu_verdict,
    is_depthwise,
    maxpool_of,
    pad_arguments,
    resize_arguments,
)
from lightning_quant.export.xir_builder import XIRBuilder
from lightning_quant.quantizers.dpu import fix_pos_from_scale
from lightning_quant.quantizers.dpu_activations import HSIGMOID_FACTOR, HSIGMOID_SHIFT, HSWISH_FIX_POINT
from lightning_quant.quantizers.dpu_pool import avgpool_scale
from lightning_quant.quantizers.functional import fake_quantize
from lightning_quant.quantizers.modules import QuantConv2d, QuantLinear

__all__ = ["UnsupportedOpError", "Value", "lower_graph"]


class UnsupportedOpError(ValueError):
    """A node of the model has no XIR lowering here; the message names it."""


@dataclass
class Value:
    """What an fx node produced: the XIR op holding it, its PyTorch shape, its (C, H, W) if flattened, and for a
    concat of flattened tensors each part's ``(features, (C, H, W) or None)``: the XModel flattens NHWC tensors, so
    the columns of such a row are in (H, W, C) order part by part, and a following matmul must permute its weight the
    same way."""

    op: str
    shape: list[int]
    chw: tuple[int, int, int] | None = None
    segments: tuple[tuple[int, tuple[int, int, int] | None], ...] | None = None

    def moved_to(self, op: str) -> Value:
        """The same tensor (shape and column layout) held by another op."""
        return Value(op, self.shape, self.chw, self.segments)

    def nhwc_columns(self) -> np.ndarray | None:
        """For a 2-D value: the PyTorch column each XModel column holds (``xmodel[:, i] == torch[:, cols[i]]``), or
        None when the order is the same.

        Example:
            >>> Value("x", [1, 8], chw=(2, 2, 2)).nhwc_columns().tolist()
            [0, 4, 1, 5, 2, 6, 3, 7]
            >>> Value("x", [1, 5], segments=((4, (2, 2, 1)), (1, None))).nhwc_columns().tolist()
            [0, 2, 1, 3, 4]
        """
        parts = self.segments or (((int(np.prod(self.chw)), self.chw),) if self.chw is not None else ())
        if not any(chw is not None and chw[1] * chw[2] > 1 for _, chw in parts):
            return None
        columns, start = [], 0
        for width, chw in parts:
            block = np.arange(start, start + width)
            if chw is not None:
                block = block.reshape(chw).transpose(1, 2, 0).reshape(-1)
            columns.append(block)
            start += width
        return np.concatenate(columns)


def _nhwc(shape: list[int]) -> list[int]:
    return [shape[0], shape[2], shape[3], shape[1]] if len(shape) == 4 else list(shape)


def _shape(node: fx.Node) -> list[int]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise UnsupportedOpError(f"node {node.name!r} ({node.format_node()}) does not produce one tensor.")
    return list(meta.shape)


def _unsupported(node: fx.Node, what: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"export_xmodel cannot lower {what} (node {node.name!r}: {node.format_node()}). Supported: "
        f"{SUPPORTED_SUMMARY}. Keep this part outside the model you export, or replace it with a supported op; "
        "lightning_quant.inspect_dpu(model, example_input) lists every op the DPU cannot run, before calibration."
    )


class Lowering:
    """State of one lowering pass: the builder, the values of visited nodes, and the graph outputs."""

    def __init__(self, gm: fx.GraphModule, builder: XIRBuilder) -> None:
        self.gm = gm
        self.b = builder
        self.env: dict[fx.Node, Value] = {}
        self.inner: dict[str, Value] = {}  # quantized values inside one node's ops, as "<node>.<part>"
        self.outputs: list[str] = []

    def arg(self, node: fx.Node, i: int = 0) -> Value:
        return self.env[node.args[i]]

    def run(self) -> list[str]:
        for node in self.gm.graph.nodes:
            value = self.visit(node)
            if value is not None:
                self.env[node] = value
        return self.outputs

    def visit(self, node: fx.Node) -> Value | None:
        """Lower one node as :func:`~lightning_quant.export.dpu_rules.dpu_verdict` classifies it (the rules that
        :func:`~lightning_quant.inspect_dpu` reports), or raise with its reason."""
        verdict = dpu_verdict(self.gm, node)
        if verdict.reason is not None:
            raise _unsupported(node, verdict.reason)
        if verdict.op == "shape":
            return None  # a Python int for a later view/reshape; that node's own shape is used there
        if verdict.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            self.outputs = [self.env[o].op for o in outs]
            return None
        return getattr(self, _HANDLERS[verdict.op])(node)

    def data(self, node: fx.Node) -> Value:
        shape = _shape(node)
        attrs = {"shape": _nhwc(shape), "data_type": "FLOAT32"}
        return Value(self.b.add(node.name, "data", _nhwc(shape), attrs), shape)

    def fix(self, node: fx.Node) -> Value:
        module = self.gm.get_submodule(node.target)
        src = self.arg(node)
        fix = self.b.fix(src.op, fix_pos_from_scale(module.scale), module.spec.rounding, module.spec.bits)
        return src.moved_to(fix)

    def identity(self, node: fx.Node) -> Value:
        return self.arg(node)

    def relu(self, node: fx.Node) -> Value:
        return self.unary(node, "relu")

    def relu6(self, node: fx.Node) -> Value:
        return self.unary(node, "relu6")

    # -- element-wise and shape ops -----------------------------------------------------------------------
    def unary(self, node: fx.Node, op_type: str) -> Value:
        src = self.arg(node)
        return src.moved_to(self.b.add(node.name, op_type, _nhwc(src.shape), {}, [("input", [src.op])]))

    def add(self, node: fx.Node) -> Value:
        a, b = self.env[node.args[0]], self.env[node.args[1]]
        return Value(self.b.add(node.name, "add", _nhwc(a.shape), {}, [("input", [a.op, b.op])]), a.shape)

    def mul(self, node: fx.Node) -> Value:
        """``a * b`` as XIR ``mul`` (broadcasting: a per-channel ``[N, C, 1, 1]`` operand is ``[N, 1, 1, C]``)."""
        a, b, shape = self.env[node.args[0]], self.env[node.args[1]], _shape(node)
        return Value(self.b.add(node.name, "mul", _nhwc(shape), {}, [("input", [a.op, b.op])]), shape)

    def hard_sigmoid_ops(self, name: str, src: Value) -> str:
        """XIR ``hard-sigmoid`` (``relu6(x + 3) / 6``) times the constant ``6 * 2731 / 2**14``: the DPU's
        ``relu6(x + 3) * 2731 / 2**14``, written as vai_q_pytorch's ``xop_creator.hsigmoid`` does."""
        shape = _nhwc(src.shape)
        op = self.b.add(name, "hard-sigmoid", shape, {}, [("input", [src.op])])
        const = self.b.const(f"{name}_dpu_scale", np.array([6 * HSIGMOID_FACTOR / 2**HSIGMOID_SHIFT], np.float32))
        return self.b.add(f"{name}_mul", "mul", shape, {}, [("input", [op, const])])

    def hard_sigmoid(self, node: fx.Node) -> Value:
        src = self.arg(node)
        return src.moved_to(self.hard_sigmoid_ops(node.name, src))

    def hard_swish(self, node: fx.Node) -> Value:
        """``x * fix(hard_sigmoid(x), 7)`` as vai_q_pytorch's ``xop_creator.hswish`` writes it: the DPU's Hard-Sigmoid,
        a ``fix`` at position 7 (DPU rounding), and a ``mul`` with the input."""
        src = self.arg(node)
        factor = self.hard_sigmoid_ops(f"{node.name}_hsigmoid", src)
        factor = self.b.fix(factor, HSWISH_FIX_POINT, RoundingMode.HALF_UP, 8)
        self.inner[f"{node.name}.hsigmoid"] = src.moved_to(factor)
        op = self.b.add(node.name, "mul", _nhwc(src.shape), {}, [("input", [factor, src.op])])
        return src.moved_to(op)

    def resize(self, node: fx.Node) -> Value:
        """Nearest or bilinear upsampling as XIR ``resize`` with a ``scale`` (out / in, ``[w, h]``): PyTorch's
        ``align_corners=False`` is ``half_pixel_centers`` for bilinear and plain ``floor(out / scale)`` for nearest."""
        src, shape = self.arg(node), _shape(node)
        mode = resize_arguments(self.gm, node)["mode"]
        scale = [float(shape[3] // src.shape[3]), float(shape[2] // src.shape[2])]
        attrs = {"mode": mode.upper(), "align_corners": False, "half_pixel_centers": mode == "bilinear"}
        attrs["scale"] = scale
        return Value(self.b.add(node.name, "resize", _nhwc(shape), attrs, [("input", [src.op])]), shape)

    def concat(self, node: fx.Node) -> Value:
        tensors = [self.env[t] for t in node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        dim = dim % len(shape)
        axis = {0: 0, 1: 3, 2: 1, 3: 2}[dim] if len(shape) == 4 else dim
        op = self.b.add(node.name, "concat", _nhwc(shape), {"axis": axis}, [("input", [t.op for t in tensors])])
        if len(shape) != 2 or dim != 1:
            return Value(op, shape)
        parts = [part for t in tensors for part in (t.segments or ((t.shape[1], t.chw),))]
        return Value(op, shape, segments=tuple(parts))  # flattened feature maps keep their (H, W, C) column order

    def reshape(self, node: fx.Node) -> Value:
        """A flatten to [batch, features] (``nn.Flatten``, ``torch.flatten``, a view/reshape) as XIR ``reshape``."""
        src = self.arg(node)
        rank = len(src.shape)
        out = [src.shape[0], int(np.prod(src.shape[1:]))]
        chw = tuple(src.shape[1:]) if rank == 4 else src.chw
        op = self.b.add(node.name, "reshape", out, {"shape": out}, [("input", [src.op])])
        return Value(op, out, chw, None if rank == 4 else src.segments)  # type: ignore[arg-type]

    def strided_slice(self, node: fx.Node) -> Value:
        """``x[:, a:b:s, ...]`` (slices only, the batch dim whole) as XIR ``strided_slice`` in NHWC order."""
        src, index = self.arg(node), node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        ranges = [i.indices(n) for i, n in zip(index, src.shape, strict=False)]
        ranges += [(0, n, 1) for n in src.shape[len(index) :]]
        begin, end, strides = ([r[k] for r in ranges] for k in range(3))
        if len(ranges) == 4:
            begin, end, strides = _nhwc(begin), _nhwc(end), _nhwc(strides)
        shape = _shape(node)
        attrs = {"begin": begin, "end": end, "strides": strides}
        return Value(self.b.add(node.name, "strided_slice", _nhwc(shape), attrs, [("input", [src.op])]), shape)

    def pad(self, node: fx.Node) -> Value:
        """``F.pad(x, pads)`` with zeros as XIR ``pad`` (``paddings``: before/after pairs per NHWC dim)."""
        src = self.arg(node)
        pads, rank = list(pad_arguments(node)["pad"]), len(src.shape)
        pairs = [[0, 0] for _ in range(rank)]
        for k in range(len(pads) // 2):  # torch lists the last dim first
            pairs[rank - 1 - k] = [pads[2 * k], pads[2 * k + 1]]
        if rank == 4:
            pairs = _nhwc(pairs)
        paddings = [int(v) for pair in pairs for v in pair]
        attrs = {"paddings": paddings, "mode": "CONSTANT", "constant_values": [0.0] * len(paddings)}
        shape = _shape(node)
        return Value(self.b.add(node.name, "pad", _nhwc(shape), attrs, [("input", [src.op])]), shape)

    # -- pooling ------------------------------------------------------------------------------------------
    def maxpool(self, node: fx.Node) -> Value:
        src, pool = self.arg(node), maxpool_of(self.gm, node)
        kh, kw = _pair(pool.kernel_size)
        sh, sw = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        ph, pw = _pair(pool.padding)
        attrs = {"kernel": [kw, kh], "stride": [sw, sh], "pad": [pw, pw, ph, ph], "global": False}
        attrs["pad_mode"] = "CEIL" if pool.ceil_mode else "FLOOR"
        shape = _shape(node)
        return Value(self.b.add(node.name, "maxpool2d", _nhwc(shape), attrs, [("input", [src.op])]), shape)

    def avgpool(self, node: fx.Node) -> Value:
        src, pool = self.arg(node), self.gm.get_submodule(node.target)
        (kh, kw), (sh, sw), (ph, pw) = pool.window(src.shape[2], src.shape[3])
        attrs = {"kernel": [kw, kh], "stride": [sw, sh], "pad": [pw, pw, ph, ph], "pad_mode": "FLOOR"}
        attrs |= {"global": pool.global_pool, "count_include_pad": True, "count_include_invalid": True}
        shape = _nhwc(_shape(node))
        op = self.b.add(node.name, "avgpool2d", shape, attrs, [("input", [src.op])])
        scale = avgpool_scale(kh, kw)
        if scale != 1.0:  # the DPU's reciprocal of kh * kw, as vai_q_pytorch models it: a multiply after the pool
            const = self.b.const(f"{node.name}_dpu_scale", np.array([scale], np.float32))
            op = self.b.add(f"{node.name}_mul", "mul", shape, {}, [("input", [op, const])])
        return Value(op, _shape(node))

    # -- layers with parameters ---------------------------------------------------------------------------
    def params(self, name: str, layer: nn.Module, weight: np.ndarray) -> list[tuple[str, list[str]]]:
        wq = layer.weight_fake_quant
        w = self.b.fix(self.b.const(f"{name}.weight", weight), fix_pos_from_scale(wq.scale))
        if layer.bias is None:
            return [("weights", [w])]
        bq = layer.bias_fake_quant
        if bq is None:
            raise UnsupportedOpError(f"layer {name!r} has a float bias; the DPU needs it quantized: use target='dpu'.")
        bias = fake_quantize(layer.bias.detach(), bq.scale, bq.zero_point, bq.spec).numpy()
        return [
            ("weights", [w]),
            ("bias", [self.b.fix(self.b.const(f"{name}.bias", bias), fix_pos_from_scale(bq.scale))]),
        ]

    def conv(self, node: fx.Node) -> Value:
        conv: QuantConv2d = self.gm.get_submodule(node.target)
        src, shape, name = self.arg(node), _shape(node), str(node.target)
        w = _quantized_weight(conv)
        depthwise = is_depthwise(conv)
        weight = w.permute(1, 2, 3, 0) if depthwise else w.permute(0, 2, 3, 1)  # [1, kh, kw, C] or OHWI
        args = [("input", [src.op])] + self.params(name, conv, weight.contiguous().numpy())
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        attrs = {"kernel": [kw, kh], "stride": [sw, sh], "dilation": [dw, dh], "pad": [pw, pw, ph, ph]}
        attrs |= {"pad_mode": "FLOOR", "bias_term": conv.bias is not None}
        attrs |= {"in_dim": conv.in_channels, "out_dim": conv.out_channels}
        if not depthwise:
            attrs["group"] = 1
        op = self.b.add(name, "depthwise-conv2d" if depthwise else "conv2d", _nhwc(shape), attrs, args)
        return Value(op, shape)

    def linear(self, node: fx.Node) -> Value:
        fc: QuantLinear = self.gm.get_submodule(node.target)
        src, shape, name = self.arg(node), _shape(node), str(node.target)
        w = _quantized_weight(fc)
        columns = src.nhwc_columns()
        if columns is not None:  # NHWC flatten order: the input's columns are (H, W, C), part by part
            w = w[:, torch.from_numpy(columns)]
        params = self.params(name, fc, w.contiguous().numpy())
        args = [("input", [src.op, params[0][1][0]])] + params[1:]
        attrs = {"transpose_a": False, "transpose_b": True}
        return Value(self.b.add(name, "matmul", shape, attrs, args), shape)


# dpu_verdict(...).op -> the Lowering method that writes it
_HANDLERS = {
    "data": "data",
    "fix": "fix",
    "identity": "identity",
    "relu": "relu",
    "relu6": "relu6",
    "add": "add",
    "mul": "mul",
    "hard-sigmoid": "hard_sigmoid",
    "hard-swish": "hard_swish",
    "resize": "resize",
    "concat": "concat",
    "reshape": "reshape",
    "strided_slice": "strided_slice",
    "pad": "pad",
    "maxpool2d": "maxpool",
    "avgpool2d": "avgpool",
    "conv2d": "conv",
    "depthwise-conv2d": "conv",
    "matmul": "linear",
}


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _quantized_weight(layer: nn.Module) -> torch.Tensor:
    fq = layer.weight_fake_quant
    with torch.no_grad():
        return fake_quantize(layer.weight.detach(), fq.scale, fq.zero_point, fq.spec).float()


def lower_graph(gm: fx.GraphModule, builder: XIRBuilder, *, values: dict[str, Value] | None = None) -> list[str]:
    """Lower every node of ``gm`` (shapes already propagated) into ``builder``; returns the output op names.

    ``values``, when given, is filled with each lowered fx node's name -> its :class:`Value` (the XIR op holding the
    node's output, e.g. the ``fix`` op of a FakeQuantize node): how the per-layer dump names tensors after the XModel.
    Quantized values inside one node's ops are there too, as ``"<node>.<part>"`` (a Hard-Swish's 8-bit factor:
    ``"<node>.hsigmoid"``).

    Raises:
        UnsupportedOpError: a node with no lowering; the message names it and lists what is supported.
    """
    lowering = Lowering(gm, builder)
    outputs = lowering.run()
    if values is not None:
        values.update({node.name: value for node, value in lowering.env.items()})
        values.update(lowering.inner)
    return outputs
