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

from lightning_quant.export.dpu_rules import (
    SUPPORTED_SUMMARY,
    dpu_verdict,
    is_depthwise,
    maxpool_of,
    pad_arguments,
)
from lightning_quant.export.xir_builder import XIRBuilder
from lightning_quant.quantizers.dpu import fix_pos_from_scale
from lightning_quant.quantizers.dpu_pool import avgpool_scale
from lightning_quant.quantizers.functional import fake_quantize
from lightning_quant.quantizers.modules import QuantConv2d, QuantLinear

__all__ = ["UnsupportedOpError", "Value", "lower_graph"]


class UnsupportedOpError(ValueError):
    """A node of the model has no XIR lowering here; the message names it."""


@dataclass
class Value:
    """What an fx node produced: the XIR op holding it, its PyTorch shape, and its (C, H, W) if flattened."""

    op: str
    shape: list[int]
    chw: tuple[int, int, int] | None = None


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
        return Value(fix, src.shape, src.chw)

    def identity(self, node: fx.Node) -> Value:
        return self.arg(node)

    def relu(self, node: fx.Node) -> Value:
        return self.unary(node, "relu")

    def relu6(self, node: fx.Node) -> Value:
        return self.unary(node, "relu6")

    # -- element-wise and shape ops -----------------------------------------------------------------------
    def unary(self, node: fx.Node, op_type: str) -> Value:
        src = self.arg(node)
        return Value(self.b.add(node.name, op_type, _nhwc(src.shape), {}, [("input", [src.op])]), src.shape, src.chw)

    def add(self, node: fx.Node) -> Value:
        a, b = self.env[node.args[0]], self.env[node.args[1]]
        return Value(self.b.add(node.name, "add", _nhwc(a.shape), {}, [("input", [a.op, b.op])]), a.shape)

    def concat(self, node: fx.Node) -> Value:
        tensors = [self.env[t] for t in node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        dim = dim % len(shape)
        axis = {0: 0, 1: 3, 2: 1, 3: 2}[dim] if len(shape) == 4 else dim
        op = self.b.add(node.name, "concat", _nhwc(shape), {"axis": axis}, [("input", [t.op for t in tensors])])
        return Value(op, shape)

    def reshape(self, node: fx.Node) -> Value:
        """A flatten to [batch, features] (``nn.Flatten``, ``torch.flatten``, a view/reshape) as XIR ``reshape``."""
        src = self.arg(node)
        rank = len(src.shape)
        out = [src.shape[0], int(np.prod(src.shape[1:]))]
        chw = tuple(src.shape[1:]) if rank == 4 else src.chw
        op = self.b.add(node.name, "reshape", out, {"shape": out}, [("input", [src.op])])
        return Value(op, out, chw)  # type: ignore[arg-type]

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
        if src.chw is not None and src.chw[1] * src.chw[2] > 1:  # NHWC flatten order: columns (C,H,W) -> (H,W,C)
            w = w.reshape(w.shape[0], *src.chw).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
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

    Raises:
        UnsupportedOpError: a node with no lowering; the message names it and lists what is supported.
    """
    lowering = Lowering(gm, builder)
    outputs = lowering.run()
    if values is not None:
        values.update({node.name: value for node, value in lowering.env.items()})
    return outputs
