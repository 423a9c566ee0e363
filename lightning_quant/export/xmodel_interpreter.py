"""A small numpy interpreter for uncompiled XIR graphs as written by :func:`~lightning_quant.export.export_xmodel`.

It runs ``data``, ``const``, ``fix``, ``conv2d``, ``depthwise-conv2d``, ``matmul``, ``add``, ``mul`` (with
broadcasting), ``concat``, ``stack``, ``relu``, ``relu6``, ``hard-sigmoid``, ``hard-swish``, ``maxpool2d``,
``avgpool2d``, ``resize`` (``NEAREST``/``BILINEAR`` by its ``scale`` attribute), ``reshape`` (with its ``shape``
attribute or, as Vitis AI writes it, a ``shape`` input), ``strided_slice`` and ``pad`` in float64, NHWC, by XIR's op
definitions; graphs written by Vitis AI's own quantizer run too (its reference ``LeNet_int.xmodel`` is tested
against its ``LeNet_int.onnx``). Values on ``2**-fix_point`` grids make every sum exact, so the result does not
depend on summation order. An ``avgpool2d`` or ``hard-sigmoid`` followed by a ``mul`` with a constant is computed as
``window_sum * (c / n)`` (``relu6(x + 3) * (c / 6)``), the DPU's dyadic reciprocal (``c / 6 = 2731 / 2**14``),
exactly as the fake-quant model and the DPU compiler's fused op do.

Example:
    >>> import tempfile, pathlib, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize, export_xmodel
    >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)],
    ...              target="dpu", progress=False)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> path = export_xmodel(q, pathlib.Path(tempfile.mkdtemp()) / "m.xmodel", x)
    >>> out = run_xmodel(path, x.numpy())[0]          # NCHW in, NCHW out for 4-D tensors
    >>> bool((out == q(x).detach().numpy()).all())
    True
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lightning_quant.export.xir_schema import message_class

__all__ = ["XModelInterpreter", "attr_value", "load_xmodel", "run_xmodel"]


def load_xmodel(path: str | os.PathLike):
    """Parse an ``.xmodel`` file into a ``Graph`` message."""
    return message_class("Graph").FromString(Path(path).read_bytes())


def attr_value(value: Any) -> Any:
    """The Python value of an ``AttrValue`` message (lists for vectors, bytes for bytes)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    inner = getattr(value, kind)
    if kind == "bytes_value":
        return inner.value
    if kind.endswith("_vec"):
        return list(inner.value)
    if kind.startswith("map_"):
        return dict(inner.value)
    return inner


def _round(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "PY3_ROUND":
        return np.round(x)
    floor = np.floor(x)
    tie = (x - floor) == 0.5
    away = np.where(x < 0, floor, floor + 1.0)  # std::round: ties away from zero
    std = np.where(tie, away, np.round(x))
    if mode == "STD_ROUND":
        return std
    return np.where(tie & (x < 0), np.ceil(x), std)  # DPU_ROUND


_CONST_TYPES = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "int64": "<i8", "int8": "i1", "uint8": "u1"}


def _windows(x: np.ndarray, kernel, stride, dilation, pad, fill: float):
    """Yield ``(kh_index, kw_index, strided view)`` of an NHWC input for each kernel tap."""
    (kw, kh), (sw, sh), (dw, dh), (pl, pr, pt, pb) = kernel, stride, dilation, pad
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    oh = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw, :]


class XModelInterpreter:
    """Runs a ``Graph`` message op by op; :meth:`run` returns the outputs of ops no other op consumes."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.ops = {op.name: op for op in graph.op_node}
        consumed = {name for op in graph.op_node for arg in op.args for name in arg.ops}
        self.outputs = [op.name for op in graph.op_node if op.name not in consumed and op.type not in ("const",)]
        self.inputs = [op.name for op in graph.op_node if op.type == "data"]
        self._handlers: dict[str, Callable] = {
            "data": self._data, "const": self._const, "fix": self._fix, "conv2d": self._conv,
            "depthwise-conv2d": self._conv, "matmul": self._matmul, "add": self._add, "mul": self._mul,
            "concat": self._concat, "stack": self._stack, "relu": self._relu, "relu6": self._relu6,
            "maxpool2d": self._pool, "avgpool2d": self._pool, "reshape": self._reshape,
            "strided_slice": self._strided_slice, "pad": self._pad, "hard-sigmoid": self._hard_sigmoid,
            "hard-swish": self._hard_swish, "resize": self._resize,
        }  # fmt: skip

    def run(self, feeds: dict[str, np.ndarray], *, keep_all: bool = False) -> dict[str, np.ndarray]:
        """Execute with ``feeds`` (data op name -> NHWC array); returns every graph output (NHWC), by op name.

        With ``keep_all`` no value is dropped and every op's output is returned, by op name in graph order (the
        per-layer dump of :mod:`lightning_quant.export.deploy_check`; it holds every activation in float64).

        Example:
            >>> import numpy as np
            >>> from lightning_quant.export.xir_builder import XIRBuilder
            >>> b = XIRBuilder("Net")
            >>> x = b.add("x", "data", [1, 2], {"shape": [1, 2], "data_type": "FLOAT32"})
            >>> y = b.add("y", "relu", [1, 2], {}, [("input", [b.fix(x, fix_point=1)])])
            >>> values = XModelInterpreter(b.graph).run({x: np.array([[-1.0, 0.3]])}, keep_all=True)
            >>> {name: v.tolist() for name, v in values.items()}
            {'Net__x': [[-1.0, 0.3]], 'Net__x_fix': [[-1.0, 0.5]], 'Net__y': [[0.0, 0.5]]}

        Raises:
            KeyError: a data op without a feed, or an op type this interpreter does not know (named).
        """
        self.values: dict[str, np.ndarray] = {}
        self.sums: dict[str, tuple[np.ndarray, int]] = {}
        self.feeds = feeds
        # a value is dropped once its last consumer has run: float64 copies of every activation of a ResNet50
        # batch would otherwise all be alive at the end (9 GB for 32 images at 128 px)
        pending = Counter(name for op in self.graph.op_node for arg in op.args for name in arg.ops)
        outputs = set(self.outputs)
        for op in self.graph.op_node:  # ops are stored in topological order
            handler = self._handlers.get(op.type)
            if handler is None:
                raise KeyError(f"op {op.name!r} has type {op.type!r}, which this interpreter does not run.")
            self.values[op.name] = handler(op, {k: attr_value(v) for k, v in op.attr.items()})
            for name in (name for arg in op.args for name in arg.ops):
                pending[name] -= 1
                if pending[name] == 0 and name not in outputs and not keep_all:
                    self.values.pop(name, None)
                    self.sums.pop(name, None)
        if keep_all:
            return dict(self.values)  # insertion order: the graph's
        return {name: self.values[name] for name in self.outputs}

    def _in(self, op: Any, arg: str = "input", i: int = 0) -> np.ndarray:
        return self.values[[a for a in op.args if a.name == arg][0].ops[i]]

    def _data(self, op, attrs):
        if op.name not in self.feeds:
            raise KeyError(f"no input fed for data op {op.name!r}; feed it by that name.")
        return np.asarray(self.feeds[op.name], dtype=np.float64).reshape([-1, *attrs["shape"][1:]])  # any batch

    def _const(self, op, attrs):
        kind = str(attrs.get("data_type", "float32")).lower()
        if kind not in _CONST_TYPES:
            raise KeyError(f"const op {op.name!r} holds {kind!r} data; this interpreter reads {sorted(_CONST_TYPES)}.")
        return np.frombuffer(attrs["data"], dtype=_CONST_TYPES[kind]).astype(np.float64).reshape(attrs["shape"])

    def _fix(self, op, attrs):
        scale, half = 2.0 ** attrs["fix_point"], 2 ** (attrs["bit_width"] - 1)
        lo, hi = (-half, half - 1) if attrs["if_signed"] else (0, 2 * half - 1)
        return np.clip(_round(self._in(op) * scale, attrs["round_mode"]), lo, hi) / scale

    def _conv(self, op, attrs):
        x, w = self._in(op), self._in(op, "weights")
        depthwise = op.type == "depthwise-conv2d"
        out = None
        for i, j, view in _windows(x, attrs["kernel"], attrs["stride"], attrs["dilation"], attrs["pad"], 0.0):
            term = view * w[0, i, j, :] if depthwise else view @ w[:, i, j, :].T
            out = term if out is None else out + term
        if any(a.name == "bias" for a in op.args):
            out = out + self._in(op, "bias")
        return out

    def _matmul(self, op, attrs):
        a, b = self._in(op, "input", 0), self._in(op, "input", 1)
        out = (a.T if attrs.get("transpose_a") else a) @ (b.T if attrs.get("transpose_b") else b)
        return out + self._in(op, "bias") if any(a.name == "bias" for a in op.args) else out

    def _add(self, op, attrs):
        return self._in(op, "input", 0) + self._in(op, "input", 1)

    def _mul(self, op, attrs):
        names = [a for a in op.args if a.name == "input"][0].ops
        first, other = names[0], self.values[names[1]]
        if first in self.sums and self.ops[names[1]].type == "const" and other.size == 1:
            total, n = self.sums[first]
            return total * (float(other.reshape(())) / n)  # dyadic c / n: exact
        return self.values[first] * other

    def _concat(self, op, attrs):
        return np.concatenate([self.values[n] for n in op.args[0].ops], axis=attrs["axis"])

    def _stack(self, op, attrs):
        return np.stack([self.values[n] for n in op.args[0].ops], axis=attrs.get("axis", 0))

    def _relu(self, op, attrs):
        return np.maximum(self._in(op), 0.0)

    def _relu6(self, op, attrs):
        return np.clip(self._in(op), 0.0, 6.0)

    def _hard_sigmoid(self, op, attrs):
        total = np.clip(self._in(op) + 3.0, 0.0, 6.0)
        self.sums[op.name] = (total, 6)  # a following mul by c computes total * (c / 6): the DPU's 2731 / 2**14
        return total / 6.0

    def _hard_swish(self, op, attrs):
        x = self._in(op)
        return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0

    def _resize(self, op, attrs):
        """XIR ``resize`` by its ``scale`` attribute (``[w, h]``, out / in), modes ``NEAREST`` and ``BILINEAR``."""
        if any(a.name == "size" for a in op.args) or not attrs.get("scale"):
            raise KeyError(f"resize op {op.name!r} gives a size input; this interpreter runs the scale attribute only.")
        x, mode = self._in(op), attrs["mode"]
        align, half = bool(attrs.get("align_corners")), bool(attrs.get("half_pixel_centers"))
        if mode not in ("NEAREST", "BILINEAR"):
            raise KeyError(f"resize op {op.name!r} has mode {mode!r}; this interpreter runs NEAREST and BILINEAR.")
        for axis, factor in ((2, attrs["scale"][0]), (1, attrs["scale"][1])):
            x = _resize_axis(x, axis, int(round(x.shape[axis] * factor)), mode, align, half)
        return x

    def _pool(self, op, attrs):
        x, is_max = self._in(op), op.type == "maxpool2d"
        kernel = [x.shape[2], x.shape[1]] if attrs.get("global") else attrs["kernel"]
        stride = kernel if attrs.get("global") else attrs["stride"]
        out = None
        fill = -np.inf if is_max else 0.0
        pad = list(attrs.get("pad", [0, 0, 0, 0]))
        if attrs.get("pad_mode") == "CEIL" and not attrs.get("global"):
            pad = _ceil_pad(x.shape[1:3], kernel, stride, pad)
        for _, _, view in _windows(x, kernel, stride, [1, 1], pad, fill):
            out = view if out is None else (np.maximum(out, view) if is_max else out + view)
        if is_max:
            return out
        self.sums[op.name] = (out, kernel[0] * kernel[1])
        return out / (kernel[0] * kernel[1])

    def _strided_slice(self, op, attrs):
        x = self._in(op)  # the batch dim is kept whole (the lowering refuses batch slices): any batch size runs
        ranges = zip(attrs["begin"][1:], attrs["end"][1:], attrs["strides"][1:], strict=True)
        return x[(slice(None), *(slice(b, e, s) for b, e, s in ranges))]

    def _pad(self, op, attrs):
        if attrs["mode"] != "CONSTANT":
            raise KeyError(f"op {op.name!r} pads with mode {attrs['mode']!r}; this interpreter runs CONSTANT only.")
        p = attrs["paddings"]
        value = attrs.get("constant_values", [0.0])
        return np.pad(self._in(op), [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)], constant_values=value[0])

    def _reshape(self, op, attrs):
        x = self._in(op)
        if any(a.name == "shape" for a in op.args):  # Vitis AI: the target shape is an input (a stack of consts)
            shape = [int(v) for v in self._in(op, "shape").reshape(-1)]
        else:
            shape = list(attrs["shape"])
        return x.reshape([x.shape[0], *shape[1:]])  # the batch dimension stays the input's: any batch runs


def _ceil_pad(size, kernel, stride, pad) -> list[int]:
    """``pad`` (left, right, top, bottom) grown on the right and bottom for ``pad_mode`` ``CEIL``: XIR's
    ``ceil((in + pad - kernel) / stride) + 1`` outputs, less a last window that would start in the padding only
    (PyTorch's ``ceil_mode`` rule, which the lowering writes as ``CEIL``)."""
    pad = list(pad)
    for (lo, hi), n, k, s in zip(((2, 3), (0, 1)), size, (kernel[1], kernel[0]), (stride[1], stride[0]), strict=True):
        out = -(-(n + pad[lo] + pad[hi] - k) // s) + 1
        if (out - 1) * s >= n + pad[lo]:
            out -= 1
        pad[hi] += max(0, (out - 1) * s + k - (n + pad[lo] + pad[hi]))
    return pad


def _resize_axis(x: np.ndarray, axis: int, out: int, mode: str, align: bool, half: bool) -> np.ndarray:
    """One axis of XIR ``resize`` (its op definition: ``scale = in / out``, or ``(in - 1) / (out - 1)`` with
    ``align_corners``; source ``(o + 0.5) * scale - 0.5`` with ``half_pixel_centers``, else ``o * scale``)."""
    size = x.shape[axis]
    scale = (size - 1) / (out - 1) if align and out > 1 else size / out
    o = np.arange(out, dtype=np.float64)
    source = (o + 0.5) * scale - 0.5 if half else o * scale
    if mode == "NEAREST":
        index = np.round(source) if align else np.floor(source)
        return np.take(x, np.minimum(index, size - 1).astype(np.int64), axis=axis)
    low = np.floor(source)
    lerp = source - low  # a source left of the first pixel reads it twice: the weights then add up to that pixel
    top = np.clip(low, 0, size - 1).astype(np.int64)
    bottom = np.clip(low + 1, 0, size - 1).astype(np.int64)
    shape = [1] * x.ndim
    shape[axis] = out
    lerp = lerp.reshape(shape)
    return np.take(x, top, axis=axis) * (1.0 - lerp) + np.take(x, bottom, axis=axis) * lerp


def run_xmodel(path_or_graph: Any, *inputs: np.ndarray, nchw: bool = True) -> list[np.ndarray]:
    """Run an XModel on positional inputs (in data-op order); returns the outputs in graph order.

    With ``nchw`` (default) 4-D inputs are given and outputs returned in PyTorch's NCHW layout.
    """
    graph = path_or_graph if hasattr(path_or_graph, "op_node") else load_xmodel(path_or_graph)
    interp = XModelInterpreter(graph)
    if len(inputs) != len(interp.inputs):
        raise ValueError(f"the graph has {len(interp.inputs)} input(s) ({interp.inputs}); {len(inputs)} given.")
    feeds = {}
    for name, x in zip(interp.inputs, inputs, strict=True):
        x = np.asarray(x)
        feeds[name] = x.transpose(0, 2, 3, 1) if nchw and x.ndim == 4 else x
    outs = interp.run(feeds)
    return [v.transpose(0, 3, 1, 2) if nchw and v.ndim == 4 else v for v in outs.values()]
