"""Graph passes on an exported QDQ ONNX model that make onnxruntime fuse it into integer kernels.

``export_onnx`` runs them in this order: :func:`requantize_after_shape_ops` (a shape op between a DequantizeLinear
and a Conv/Gemm/MatMul), :func:`quantize_biases` (int32 biases), :func:`add_weight_zero_points` (explicit int8 zero
points, needed for QGemm fusion), :func:`strip_metadata`. Each returns how much it changed and keeps values exact.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

__all__ = ["add_weight_zero_points", "quantize_biases", "requantize_after_shape_ops", "strip_metadata"]


def _initializers(model) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def quantize_biases(model) -> int:
    """Turn float Conv/Gemm biases into int32 initializers + DequantizeLinear (scale = input scale x weight scale).

    onnxruntime fuses ``DQ(x), DQ(w), DQ(b) -> Conv -> Q`` into QLinearConv only when the bias is int32.
    Returns the number of biases converted.

    The fake-quant model keeps float biases (as PyTorch's and TensorRT's fake-quant do), so this rounding moves each
    output by up to half a grid step, ``input_scale * weight_scale / 2``: far below an output quantization step with
    8-bit weights, but with 2-4-bit weights and few inputs per output it can be a sizeable part of one, and outputs
    then round one step the other way more often than near-tie noise alone would make them.
    """
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    converted = 0
    new_nodes = []
    taken = set(inits)
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        if dq_x.input[1] not in inits or dq_w.input[1] not in inits:
            continue
        x_scale = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float64).reshape(-1)
        w_scale = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64).reshape(-1)
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        if x_scale.size != 1 or w_scale.size not in (1, bias.size):
            continue
        scale = (x_scale[0] * np.broadcast_to(w_scale, bias.shape)).astype(np.float32)
        q = np.clip(np.rint(bias / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2]
        if f"{base}_int32" in taken:  # one layer called twice: each call has its own input scale, so its own bias
            base = next(f"{base}_call{k}" for k in itertools.count(2) if f"{base}_call{k}_int32" not in taken)
        taken.add(f"{base}_int32")
        model.graph.initializer.append(numpy_helper.from_array(q, f"{base}_int32"))
        model.graph.initializer.append(numpy_helper.from_array(scale, f"{base}_int32_scale"))
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{base}_int32", f"{base}_int32_scale"],
                [f"{base}_dequantized"],
                name=f"{base}_DequantizeLinear",
                axis=0,
            )
        )
        node.input[2] = f"{base}_dequantized"
        converted += 1
    for dq in new_nodes:
        model.graph.node.insert(0, dq)
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return converted


def add_weight_zero_points(model) -> int:
    """Give every DequantizeLinear of an int8 weight initializer an explicit all-zero int8 zero point.

    The zero point is optional in ONNX, but onnxruntime fuses ``DQ(x), DQ(w) -> Gemm -> Q`` into QGemm only when
    the weight DequantizeLinear has one (QLinearConv fusion works either way). Values are unchanged.
    Returns the number of nodes given a zero point.
    """
    from onnx import TensorProto, numpy_helper

    inits = _initializers(model)
    added = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 2:
            continue
        weight, scale = inits.get(node.input[0]), inits.get(node.input[1])
        if weight is None or scale is None or weight.data_type != TensorProto.INT8:
            continue
        name = f"{node.input[0]}_zero_point"
        if name not in inits:
            zero = numpy_helper.from_array(np.zeros(tuple(scale.dims), dtype=np.int8), name)
            model.graph.initializer.append(zero)
            inits[name] = zero
        node.input.append(name)
        added += 1
    return added


_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
_INT_KERNELS = ("Conv", "Gemm", "MatMul")


def requantize_after_shape_ops(model) -> int:
    """Let onnxruntime see ``DQ -> Conv/Gemm/MatMul`` where a shape op sits between them.

    * A weight (an integer initializer) read through a ``Transpose`` (``F.linear`` on 3-D inputs exports as
      ``DQ(w) -> Transpose -> MatMul``): the transpose is applied to the stored integers and the per-channel axis
      moved with it, so the MatMul reads ``DQ(w^T)`` directly. Values are unchanged.
    * An activation read through a reshape/flatten/squeeze/transpose with a per-tensor scale: the same Q/DQ pair is
      repeated after the shape op (exact: a reshape does not change values).
    Per-channel pairs behind other shape ops are left as they are (correct, just not fused).
    Returns the number of rewrites.
    """
    inits = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten = 0
    for node in list(model.graph.node):
        if node.op_type not in _SHAPE_OPS:
            continue
        dq = producers.get(node.input[0])
        users = consumers.get(node.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or not users:
            continue
        if any(u.op_type not in _INT_KERNELS for u in users) or dq.input[1] not in inits:
            continue
        if dq.input[0] in inits:  # a stored weight: only a transpose is folded into it
            if node.op_type == "Transpose":
                _fold_transpose_into_weight(model, node, dq, inits, users, consumers)
                rewritten += 1
        elif list(inits[dq.input[1]].dims) in ([], [1]):
            _repeat_pair_after(model, node, dq, users)
            rewritten += 1
    return rewritten


def _attribute(node, name: str, default: Any) -> Any:
    from onnx import helper

    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def _rewire(users: list, old: str, new: str) -> None:
    for user in users:
        for i, name in enumerate(user.input):
            if name == old:
                user.input[i] = new


def _fold_transpose_into_weight(model, transpose, dq, inits: dict, users: list, consumers: dict) -> None:
    from onnx import helper, numpy_helper

    weight = numpy_helper.to_array(inits[dq.input[0]])
    perm = list(_attribute(transpose, "perm", list(range(weight.ndim))[::-1]))
    name = f"{dq.input[0]}_transposed"
    if name not in inits:
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name)
        model.graph.initializer.append(inits[name])
    attrs = {}
    if len(inits[dq.input[1]].dims) and inits[dq.input[1]].dims[0] > 1:  # per-channel: the axis moves with the data
        axis = _attribute(dq, "axis", 1) % weight.ndim
        attrs["axis"] = perm.index(axis)
    out = f"{transpose.output[0]}_dequantized"
    new_dq = helper.make_node(
        "DequantizeLinear", [name, *dq.input[1:]], [out], name=f"{name}_DequantizeLinear", **attrs
    )
    _rewire(users, transpose.output[0], out)
    nodes = list(model.graph.node)
    model.graph.node.insert(nodes.index(transpose) + 1, new_dq)
    model.graph.node.remove(transpose)
    if all(c is transpose for c in consumers.get(dq.output[0], [])):
        model.graph.node.remove(dq)


def _repeat_pair_after(model, node, dq, users: list) -> None:
    from onnx import helper

    out = node.output[0]
    q_out, dq_out = f"{out}_requantized", f"{out}_dequantized"
    zp = list(dq.input[2:3])
    q_node = helper.make_node("QuantizeLinear", [out, dq.input[1], *zp], [q_out], name=f"{out}_QuantizeLinear")
    dq_node = helper.make_node("DequantizeLinear", [q_out, dq.input[1], *zp], [dq_out], name=f"{out}_DequantizeLinear")
    _rewire(users, out, dq_out)
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index + 1, dq_node)
    model.graph.node.insert(index + 1, q_node)


def strip_metadata(model) -> None:
    """Drop exporter debug metadata (per-node stack traces, doc strings, value_info): smaller file, same graph."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.metadata_props[:]
