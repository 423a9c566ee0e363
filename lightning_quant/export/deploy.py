"""Deployable copy of a quantized model: int8 weights stored as integers, activation quantizers with frozen qparams.

One structure serves every exporter: with ``onnx_ops=True`` quantizers call the custom ops of
:mod:`lightning_quant.export.qdq_ops` (mapped onto ONNX QDQ nodes); otherwise plain torch ops, so a traced
TorchScript file loads with ``torch.jit.load`` alone. Either way the output equals the fake-quant model's.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)], progress=False)
    >>> d = deploy_model(q)
    >>> getattr(d, "0").weight_int8.dtype
    torch.int8
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.allclose(d(x), q(x), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.capture.bn_fold import set_submodule
from lightning_quant.config import QuantSpec, RoundingMode, ScaleType
from lightning_quant.export import qdq_ops  # noqa: F401  (registers torch.ops.lightning_quant.*)
from lightning_quant.quantizers.dynamic import DynamicQuantLinear, dynamic_fake_quantize
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.functional import fake_quantize
from lightning_quant.quantizers.modules import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from lightning_quant.quantizers.prepare import convert

__all__ = ["DeployDynamicLinear", "DeployLayer", "DeployQuantize", "deploy_model", "rounds_unlike_onnx"]

_ONNX_RANGES = {(0, 255), (-128, 127)}


def _check_onnx_activation(spec: QuantSpec, name: str) -> None:
    qmin, qmax = spec.quant_range()
    qmin -= int(spec.narrow_range)
    if (qmin, qmax) not in _ONNX_RANGES:
        raise ValueError(
            f"activation quantizer {name!r} is {spec.bits}-bit; ONNX QuantizeLinear supports 8-bit (int8/uint8) "
            "activations only (weights may use 2-8 bits). Quantize activations with bits=8, keep this layer float "
            "(exclude=...), or export TorchScript, which supports every bit width."
        )
    if spec.rounding is not RoundingMode.HALF_EVEN and spec.scale_type is not ScaleType.POWER_OF_TWO:
        raise ValueError(
            f"quantizer {name!r} rounds {spec.rounding.value}, but ONNX QuantizeLinear rounds half to even; use "
            "rounding='half_even' for ONNX targets (power-of-two DPU schemes export with QuantizeLinear's rounding)."
        )


class DeployQuantize(nn.Module):
    """Activation quantize-dequantize with frozen per-tensor qparams."""

    def __init__(self, fq: FakeQuantize, onnx_ops: bool) -> None:
        super().__init__()
        self.spec = fq.spec
        self.name = fq.name
        self.onnx_ops = onnx_ops
        if onnx_ops:
            _check_onnx_activation(fq.spec, fq.name)
        self.qmin, self.qmax = fq.spec.quant_range()
        self.scale_value = float(fq.scale.detach().flatten()[0])
        self.zero_point_value = int(fq.zero_point.flatten()[0])
        self.register_buffer("scale", fq.scale.detach().clone().float().reshape(()))
        self.register_buffer("zero_point", fq.zero_point.detach().clone().reshape(()))

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        del observe  # frozen: the graph's shared uses (a max pool's output) pass observe=False
        if self.onnx_ops:
            return torch.ops.lightning_quant.qdq_tensor(
                x, self.scale_value, self.zero_point_value, self.qmin, self.qmax
            )
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def extra_repr(self) -> str:
        return f"{self.name!r}, scale={self.scale_value:.6g}, zero_point={self.zero_point_value}"


def _deploy_bias(layer: nn.Module) -> torch.Tensor | None:
    """The layer's bias as the model computes it: float, or fake-quantized where the scheme quantizes biases (DPU)."""
    if layer.bias is None:
        return None
    bias = layer.bias.detach().clone()
    bq: FakeQuantize | None = getattr(layer, "bias_fake_quant", None)
    if bq is None:
        return bias
    with torch.no_grad():
        return fake_quantize(bias, bq.scale, bq.zero_point, bq.spec)


class DeployLayer(nn.Module):
    """Conv1d/2d/3d or Linear with int8 weights and per-output-channel float scales.

    The bias stays float, or holds the fake-quantized values when the scheme quantizes biases (DPU).
    """

    def __init__(self, layer: nn.Module, onnx_ops: bool) -> None:
        super().__init__()
        fq: FakeQuantize = layer.weight_fake_quant
        spec = fq.spec
        if not spec.symmetric or not spec.signed:
            raise ValueError(
                f"layer {fq.name!r}: exporters store symmetric signed int8 weights; quantize weights with "
                "symmetric=True, signed=True (every built-in target does)."
            )
        # Weights of any width 2-8 are stored as int8 codes (a 4-bit layer holds codes in [-7, 7]); only activations
        # pass through QuantizeLinear, whose ranges are fixed.
        self.name = fq.name
        self.onnx_ops = onnx_ops
        self.is_linear = isinstance(layer, nn.Linear)
        weight = layer.weight.detach()
        out_channels = weight.shape[0]
        scale = fq.scale.detach().float().reshape(-1).expand(out_channels).clone()
        # Codes from the model's own fake-quant weights, so the file holds exactly what the model computes (a
        # separate rounding pass can land one code away at ties: x / s and x * (1 / s) differ by an ulp).
        with torch.no_grad():
            weight_fq = fake_quantize(weight, fq.scale, fq.zero_point, spec)
        q = torch.round(weight_fq / scale.reshape([-1] + [1] * (weight.dim() - 1)))
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", _deploy_bias(layer))
        if not self.is_linear:
            self.conv_kwargs = dict(
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
            )
            if layer.padding_mode != "zeros":
                raise ValueError(
                    f"layer {fq.name!r}: padding_mode={layer.padding_mode!r} cannot be exported; use 'zeros'."
                )
            self.conv_fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        self.input_quantizer = (
            DeployQuantize(layer.input_fake_quant, onnx_ops) if layer.input_fake_quant is not None else None
        )

    def dequantized_weight(self) -> torch.Tensor:
        if self.onnx_ops:
            return torch.ops.lightning_quant.dq_channel(self.weight_int8, self.weight_scale, 0)
        shape = [-1] + [1] * (self.weight_int8.dim() - 1)
        return self.weight_int8.float() * self.weight_scale.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.dequantized_weight()
        if self.is_linear:
            return F.linear(x, w, self.bias)
        return self.conv_fn(x, w, self.bias, **self.conv_kwargs)

    def extra_repr(self) -> str:
        return f"{self.name!r}, int8 weight {tuple(self.weight_int8.shape)}"


class DeployDynamicLinear(nn.Module):
    """A dynamically quantized Linear with its int8 weight stored transposed (``(in, out)``, MatMulInteger's B).

    Computes what onnxruntime computes: the input quantized to uint8 with its own range, integer products, then
    ``input_scale * weight_scale``, plus the float bias.
    """

    def __init__(self, layer: DynamicQuantLinear, onnx_ops: bool) -> None:
        super().__init__()
        self.name = layer.name
        self.onnx_ops = onnx_ops
        with torch.no_grad():
            self.register_buffer("weight_t_int8", layer.weight_int8().t().contiguous())
            self.register_buffer("weight_scale", layer.weight_scale.detach().float().clone())
            bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(layer.out_features)
            self.register_buffer("bias", bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_ops:
            return torch.ops.lightning_quant.dynamic_linear(x, self.weight_t_int8, self.weight_scale, self.bias)
        w = self.weight_t_int8.float() * self.weight_scale
        return torch.matmul(dynamic_fake_quantize(x), w) + self.bias

    def extra_repr(self) -> str:
        return f"{self.name!r}, dynamic, int8 weight {tuple(self.weight_t_int8.shape)} (in, out)"


def rounds_unlike_onnx(deployed: nn.Module) -> list[str]:
    """Names of activation quantizers whose rounding QuantizeLinear cannot reproduce at exact ties (DPU half up)."""
    quantizers = [m for m in deployed.modules() if isinstance(m, DeployQuantize)]
    return [m.name for m in quantizers if m.spec.rounding is not RoundingMode.HALF_EVEN]


def deploy_model(qmodel: nn.Module, *, onnx_ops: bool = False) -> nn.Module:
    """Deployable copy of a calibrated/QAT model (BatchNorm folded, int8 weights, frozen activation qparams).

    Args:
        qmodel: a model from ``quantize()``/``prepare()`` after calibration or QAT.
        onnx_ops: use the QDQ custom ops understood by the ONNX exporter.

    Raises:
        NotCalibratedError: some quantizer never saw data.
        ValueError: a quantizer the chosen format cannot express (the message names it and the fix).
    """
    frozen = convert(qmodel)
    read_by_graph = _graph_attribute_reads(frozen)
    for name, module in list(frozen.named_modules()):
        if isinstance(module, (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)):
            deployed = DeployLayer(module, onnx_ops)
            if f"{name}.weight" in read_by_graph:  # the graph also uses the float weight itself (a tied weight)
                deployed.register_buffer("weight", module.weight.detach().clone())
            set_submodule(frozen, name, deployed)
        elif isinstance(module, DynamicQuantLinear):
            set_submodule(frozen, name, DeployDynamicLinear(module, onnx_ops))
    for name, module in list(frozen.named_modules()):
        if isinstance(module, FakeQuantize):
            set_submodule(frozen, name, DeployQuantize(module, onnx_ops))
    return frozen.eval().requires_grad_(False)


def _graph_attribute_reads(model: nn.Module) -> set[str]:
    """The full dotted names of every attribute an fx graph inside ``model`` reads (``get_attr`` nodes)."""
    reads = set()
    for path, module in model.named_modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            prefix = f"{path}." if path else ""
            reads |= {prefix + str(n.target) for n in graph.nodes if n.op == "get_attr"}
    return reads
