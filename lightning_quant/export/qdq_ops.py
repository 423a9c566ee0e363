"""Custom torch ops that stand for ONNX QuantizeLinear/DequantizeLinear (and the dynamically quantized linear's
DynamicQuantizeLinear/MatMulInteger), with their ONNX translations.

In PyTorch they compute exactly what the deployed kernels compute; ``torch.onnx.export(dynamo=True)`` maps them
one-to-one onto QDQ nodes through :func:`onnx_translations` (a narrow-range activation, e.g. int8 [-127, 127], gets a
``Clip`` before its QuantizeLinear, which saturates at [-128, 127]), so the exported graph holds int8 weight
initializers with constant scales and no scale arithmetic.

Example:
    >>> import torch
    >>> x = torch.tensor([0.26, -3.0])
    >>> torch.ops.lightning_quant.qdq_tensor(x, 0.01, 0, -128, 127).tolist()
    [0.25999999046325684, -1.2799999713897705]
    >>> w = torch.tensor([[10, -3], [127, 0]], dtype=torch.int8)
    >>> torch.ops.lightning_quant.dq_channel(w, torch.tensor([0.5, 0.25]), 0).tolist()
    [[5.0, -1.5], [31.75, 0.0]]
"""

from __future__ import annotations

import torch

from lightning_quant.quantizers.dynamic import dynamic_qparams

__all__ = ["onnx_translations"]


@torch.library.custom_op("lightning_quant::qdq_tensor", mutates_args=())
def qdq_tensor(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor quantize + dequantize (round half to even, like QuantizeLinear)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


@qdq_tensor.register_fake
def _qdq_tensor_fake(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lightning_quant::dq_channel", mutates_args=())
def dq_channel(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel dequantize of stored int8 weights (zero point 0)."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.reshape(shape)


@dq_channel.register_fake
def _dq_channel_fake(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("lightning_quant::dynamic_linear", mutates_args=())
def dynamic_linear(
    x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Dynamically quantized linear, as onnxruntime computes it: uint8 input codes from the input's own range
    (``DynamicQuantizeLinear``), exact integer products with ``weight_t`` (int8, ``(in, out)``), then scaled."""
    scale, zero_point = dynamic_qparams(x)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    acc = torch.matmul((q - zero_point).double(), weight_t.double())  # exact, like MatMulInteger's int32 sums
    return (acc.float() * (scale * weight_scale) + bias).to(x.dtype)


@dynamic_linear.register_fake
def _dynamic_linear_fake(x, weight_t, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` (imports onnx/onnxscript, optional dependencies)."""
    import onnx
    from onnxscript import opset18 as op

    def qdq_tensor_onnx(x, scale: float, zero_point: int, qmin: int, qmax: int):
        s = op.Constant(value_float=scale)
        unsigned = qmin >= 0
        z = op.Cast(op.Constant(value_int=zero_point), to=onnx.TensorProto.UINT8 if unsigned else onnx.TensorProto.INT8)
        if (qmin, qmax) != ((0, 255) if unsigned else (-128, 127)):
            # QuantizeLinear saturates at its type's range; a narrower one (narrow_range: [-127, 127]) is clipped in
            # float first, at the codes' own values, which QuantizeLinear maps back onto exactly those codes.
            low, high = (qmin - zero_point) * scale, (qmax - zero_point) * scale
            x = op.Clip(x, op.Constant(value_float=low), op.Constant(value_float=high))
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)

    def dq_channel_onnx(q, scale, axis: int):
        return op.DequantizeLinear(q, scale, axis=axis)

    def dynamic_linear_onnx(x, weight_t, weight_scale, bias):
        xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, weight_t, x_zero_point)
        return op.Add(op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), op.Mul(x_scale, weight_scale)), bias)

    return {
        torch.ops.lightning_quant.dynamic_linear.default: dynamic_linear_onnx,
        torch.ops.lightning_quant.qdq_tensor.default: qdq_tensor_onnx,
        torch.ops.lightning_quant.dq_channel.default: dq_channel_onnx,
    }
