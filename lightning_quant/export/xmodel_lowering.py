"""Lowering a calibrated, traced DPU model (torch.fx graph) to XIR ops, one fx node at a time.

Layouts follow XIR: 4-D activations are NHWC, conv weights OHWI, depthwise weights ``[1, kh, kw, C]``,
linear weights ``[out, in]`` (``matmul`` with ``transpose_b``). A flatten of an NCHW tensor becomes a ``reshape``
of the NHWC tensor, so the next linear layer's weight columns are permuted from (C, H, W) to (H, W, C) order.
Attribute and argument names are those of Vitis AI's ``LeNet_int.xmodel`` (and of XIR's op definitions stored
in it, for ops LeNet does not use).

Example:
    >>> _nhwc([1, 8, 4, 4]), _nhwc([2, 10])
    ([1, 4, 4, 8], [2, 10])
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_quant.capture.patterns import is_fused_activation
from lightning_quant.export.xir_builder import XIRBuilder
from lightning_quant.quantizers.dpu import fix_pos_from_scale
from lightning_quant.quantizers.dpu_pool import DPUAvgPool2d, avgpool_scale
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.functional import fake_quantize
from lightning_quant.quantizers.modules import QuantConv2d, QuantLinear

__all__ = ["UnsupportedOpError", "Value", "lower_graph"]

_PASSTHROUGH_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity)
_PASSTHROUGH_CALLS = {F.dropout, "contiguous"}
_RELU_CALLS = {F.relu, torch.relu, "relu"}
_ADD_CALLS = {operator.add, torch.add, "add"}
_FLATTEN_CALLS = {torch.flatten, "flatten", "view", "reshape"}


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
        f"export_xmodel cannot lower {what} (node {node.name!r}: {node.format_node()}). Supported: conv2d, depthwise "
        "conv2d, linear, add, cat, relu/relu6, max/avg pooling, flatten, slicing, zero padding, dropout. Keep this "
        "part outside the model you export, or replace it with a supported op."
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
        if node.op == "placeholder":
            shape = _shape(node)
            attrs = {"shape": _nhwc(shape), "data_type": "FLOAT32"}
            return Value(self.b.add(node.name, "data", _nhwc(shape), attrs), shape)
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            self.outputs = [self.env[o].op for o in outs]
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target))
        if node.op in ("call_function", "call_method"):
            return self.visit_call(node)
        raise _unsupported(node, f"a {node.op} node")

    def visit_module(self, node: fx.Node, module: nn.Module) -> Value | None:
        if isinstance(module, FakeQuantize):
            src = self.arg(node)
            fix = self.b.fix(src.op, fix_pos_from_scale(module.scale), module.spec.rounding, module.spec.bits)
            return Value(fix, src.shape, src.chw)
        if isinstance(module, QuantConv2d):
            return self.conv(node, module)
        if isinstance(module, QuantLinear):
            return self.linear(node, module)
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            return self.unary(node, "relu" if isinstance(module, nn.ReLU) else "relu6")
        if isinstance(module, nn.MaxPool2d):
            return self.maxpool(node, module)
        if isinstance(module, DPUAvgPool2d):
            return self.avgpool(node, module)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, module.start_dim, module.end_dim)
        if isinstance(module, _PASSTHROUGH_MODULES):
            return self.arg(node)
        raise _unsupported(node, f"module {type(module).__name__}")

    def visit_call(self, node: fx.Node) -> Value | None:
        target = node.target
        if target == "size":
            return None  # an int for a later view/reshape; handled there
        if target in _PASSTHROUGH_CALLS:
            return self.arg(node)
        if target in _RELU_CALLS:
            return self.unary(node, "relu")
        if target is F.relu6 or (target is F.hardtanh and is_fused_activation(self.gm, node)):
            return self.unary(node, "relu6")
        if target in _ADD_CALLS:
            return self.add(node)
        if target in (torch.cat, torch.concat):
            return self.concat(node)
        if target in _FLATTEN_CALLS:
            return self.flatten_call(node)
        if target is operator.getitem:
            return self.strided_slice(node)
        if target is F.pad:
            return self.pad(node)
        if target is F.max_pool2d:
            names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
            kwargs = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
            return self.maxpool(node, nn.MaxPool2d(**kwargs))
        raise _unsupported(node, f"{getattr(target, '__name__', target)!s}")

    # -- element-wise and shape ops -----------------------------------------------------------------------
    def unary(self, node: fx.Node, op_type: str) -> Value:
        src = self.arg(node)
        return Value(self.b.add(node.name, op_type, _nhwc(src.shape), {}, [("input", [src.op])]), src.shape, src.chw)

    def add(self, node: fx.Node) -> Value:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 2 or len(node.args) != 2 or node.kwargs or self.env[args[0]].shape != self.env[args[1]].shape:
            raise _unsupported(node, "an add that is not tensor + tensor of one shape")
        a, b = self.env[args[0]], self.env[args[1]]
        return Value(self.b.add(node.name, "add", _nhwc(a.shape), {}, [("input", [a.op, b.op])]), a.shape)

    def concat(self, node: fx.Node) -> Value:
        tensors = [self.env[t] for t in node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        dim = dim % len(shape)
        axis = {0: 0, 1: 3, 2: 1, 3: 2}[dim] if len(shape) == 4 else dim
        op = self.b.add(node.name, "concat", _nhwc(shape), {"axis": axis}, [("input", [t.op for t in tensors])])
        return Value(op, shape)

    def flatten_call(self, node: fx.Node) -> Value:
        if node.target in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, start, end)
        out = _shape(node)
        if len(out) != 2 or out[0] != self.arg(node).shape[0]:
            raise _unsupported(node, f"a {node.target} to {out} (only flattening to [batch, features] is supported)")
        return self.flatten(node, 1, -1)

    def flatten(self, node: fx.Node, start: int, end: int) -> Value:
        src = self.arg(node)
        rank = len(src.shape)
        if start % rank != 1 or end % rank != rank - 1:
            raise _unsupported(node, f"a flatten of dims {start}..{end} (only dims 1..-1 are supported)")
        out = [src.shape[0], int(np.prod(src.shape[1:]))]
        chw = tuple(src.shape[1:]) if rank == 4 else src.chw
        op = self.b.add(node.name, "reshape", out, {"shape": out}, [("input", [src.op])])
        return Value(op, out, chw)  # type: ignore[arg-type]

    def strided_slice(self, node: fx.Node) -> Value:
        """``x[:, a:b:s, ...]`` (slices only, the batch dim whole) as XIR ``strided_slice`` in NHWC order."""
        src, index = self.arg(node), node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if not index or not all(isinstance(i, slice) for i in index) or len(index) > len(src.shape) or src.chw:
            raise _unsupported(node, "an indexing that is not plain slicing of an unflattened tensor")
        ranges = [i.indices(n) for i, n in zip(index, src.shape, strict=False)]
        ranges += [(0, n, 1) for n in src.shape[len(index) :]]
        whole = index[0].start in (None, 0) and index[0].stop is None and index[0].step in (None, 1)
        if not whole:  # judged on the slice itself: the export traces one example, so indices() would hide it
            raise _unsupported(node, "a slice of the batch dimension")
        if any(step < 1 for _, _, step in ranges):
            raise _unsupported(node, "a slice with a negative step")
        begin, end, strides = ([r[k] for r in ranges] for k in range(3))
        if len(ranges) == 4:
            begin, end, strides = _nhwc(begin), _nhwc(end), _nhwc(strides)
        shape = _shape(node)
        attrs = {"begin": begin, "end": end, "strides": strides}
        return Value(self.b.add(node.name, "strided_slice", _nhwc(shape), attrs, [("input", [src.op])]), shape)

    def pad(self, node: fx.Node) -> Value:
        """``F.pad(x, pads)`` with zeros as XIR ``pad`` (``paddings``: before/after pairs per NHWC dim)."""
        src = self.arg(node)
        names = ["pad", "mode", "value"]
        kwargs = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        pads, rank = list(kwargs["pad"]), len(src.shape)
        if kwargs.get("mode", "constant") != "constant" or kwargs.get("value") not in (None, 0, 0.0):
            raise _unsupported(node, "a pad that is not constant zero padding")
        if src.chw is not None or len(pads) % 2 or len(pads) // 2 >= rank:
            raise _unsupported(node, "a pad of the batch dimension or of a flattened tensor")
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
    def maxpool(self, node: fx.Node, pool: nn.MaxPool2d) -> Value:
        src = self.arg(node)
        kh, kw = _pair(pool.kernel_size)
        sh, sw = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        ph, pw = _pair(pool.padding)
        if _pair(pool.dilation) != (1, 1):
            raise _unsupported(node, "a dilated max pool")
        attrs = {"kernel": [kw, kh], "stride": [sw, sh], "pad": [pw, pw, ph, ph], "global": False}
        attrs["pad_mode"] = "CEIL" if pool.ceil_mode else "FLOOR"
        shape = _shape(node)
        return Value(self.b.add(node.name, "maxpool2d", _nhwc(shape), attrs, [("input", [src.op])]), shape)

    def avgpool(self, node: fx.Node, pool: DPUAvgPool2d) -> Value:
        src = self.arg(node)
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

    def conv(self, node: fx.Node, conv: QuantConv2d) -> Value:
        src, shape, name = self.arg(node), _shape(node), str(node.target)
        w = _quantized_weight(conv)
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
        if conv.groups > 1 and not depthwise:
            raise _unsupported(node, f"a grouped conv (groups={conv.groups}, not depthwise with multiplier 1)")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise _unsupported(node, f"a conv with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
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

    def linear(self, node: fx.Node, fc: QuantLinear) -> Value:
        src, shape, name = self.arg(node), _shape(node), str(node.target)
        if len(src.shape) != 2:
            raise _unsupported(node, f"a linear layer on a {len(src.shape)}-D input (flatten to 2-D first)")
        w = _quantized_weight(fc)
        if src.chw is not None and src.chw[1] * src.chw[2] > 1:  # NHWC flatten order: columns (C,H,W) -> (H,W,C)
            w = w.reshape(w.shape[0], *src.chw).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        params = self.params(name, fc, w.contiguous().numpy())
        args = [("input", [src.op, params[0][1][0]])] + params[1:]
        attrs = {"transpose_a": False, "transpose_b": True}
        return Value(self.b.add(name, "matmul", shape, attrs, args), shape)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _quantized_weight(layer: nn.Module) -> torch.Tensor:
    fq = layer.weight_fake_quant
    with torch.no_grad():
        return fake_quantize(layer.weight.detach(), fq.scale, fq.zero_point, fq.spec).float()


def lower_graph(gm: fx.GraphModule, builder: XIRBuilder) -> list[str]:
    """Lower every node of ``gm`` (shapes already propagated) into ``builder``; returns the output op names.

    Raises:
        UnsupportedOpError: a node with no lowering; the message names it and lists what is supported.
    """
    return Lowering(gm, builder).run()
