"""Quantized drop-in layers: Conv1d/2d/3d and Linear with weight fake-quant, and QAT Conv+BatchNorm.

Each keeps the float layer's parameter names (``weight``, ``bias``), so its state dict reads like the
original plus ``weight_fake_quant.*``. ``input_fake_quant`` is only set when a layer is quantized on its own
(the module-level fallback for code that graph capture cannot follow).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant.config import scheme_for_target
    >>> q = quantized_layer_from_float(nn.Conv2d(3, 8, 3), scheme_for_target("x86"), name="conv")
    >>> type(q).__name__, tuple(q(torch.randn(1, 3, 8, 8)).shape)
    ('QuantConv2d', (1, 8, 6, 6))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.config import QuantScheme, QuantSpec
from lightning_quant.quantizers.fake_quant import FakeQuantize

__all__ = [
    "add_zero_bias",
    "QUANTIZABLE_LAYERS",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvBn",
    "QuantLinear",
    "quantized_layer_from_float",
]


def _weight_quantizer(spec: QuantSpec, weight: torch.Tensor, name: str) -> FakeQuantize:
    return FakeQuantize(spec, weight.shape[spec.ch_axis] if spec.per_channel else None, name=f"{name}.weight")


class _WeightQuantMixin:
    """Shared setup: weight fake-quant, optional input and bias fake-quant, and a copy of the float parameters.

    ``bias_fake_quant`` exists when the scheme quantizes biases (``scheme.bias``, the DPU target) and the layer
    has a bias; otherwise it is None and the bias stays float.
    """

    weight_fake_quant: FakeQuantize
    input_fake_quant: FakeQuantize | None
    bias_fake_quant: FakeQuantize | None

    def _init_from_float(self, float_layer: nn.Module, scheme: QuantScheme, name: str, quantize_input: bool) -> None:
        self.load_state_dict(float_layer.state_dict())  # type: ignore[attr-defined]
        self.weight_fake_quant = _weight_quantizer(scheme.weight, float_layer.weight, name)
        self.input_fake_quant = FakeQuantize(scheme.activation, name=f"{name}.input") if quantize_input else None
        quantize_bias = scheme.bias is not None and float_layer.bias is not None
        self.bias_fake_quant = FakeQuantize(scheme.bias, name=f"{name}.bias") if quantize_bias else None
        self.to(float_layer.weight.device)  # type: ignore[attr-defined]

    def _maybe_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_fake_quant(x) if self.input_fake_quant is not None else x

    def _quant_bias(self) -> torch.Tensor | None:
        bias = self.bias  # type: ignore[attr-defined]
        return self.bias_fake_quant(bias) if self.bias_fake_quant is not None else bias


class QuantConv1d(_WeightQuantMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self._maybe_quantize_input(x), self.weight_fake_quant(self.weight), self._quant_bias()
        )


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self._maybe_quantize_input(x), self.weight_fake_quant(self.weight), self._quant_bias()
        )


class QuantConv3d(_WeightQuantMixin, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self._maybe_quantize_input(x), self.weight_fake_quant(self.weight), self._quant_bias()
        )


class QuantLinear(_WeightQuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._maybe_quantize_input(x), self.weight_fake_quant(self.weight), self._quant_bias())


_QUANT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
}
QUANTIZABLE_LAYERS: tuple[type[nn.Module], ...] = tuple(_QUANT_CLASS)


def add_zero_bias(layer: nn.Module, name: str, bias_spec: QuantSpec | None) -> None:
    """Give a bias-less quantized layer a zero bias (bias correction does, and a checkpoint of such a layer needs one
    to load into), with a bias quantizer where the scheme quantizes biases (``bias_spec``: the DPU's).

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> layer = quantized_layer_from_float(nn.Linear(3, 2, bias=False), scheme_for_target("dpu"), "fc")
        >>> add_zero_bias(layer, "fc", scheme_for_target("dpu").bias)
        >>> layer.bias.tolist(), layer.bias_fake_quant is not None
        ([0.0, 0.0], True)
    """
    weight = layer.weight
    layer.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
    if bias_spec is not None:
        layer.bias_fake_quant = FakeQuantize(bias_spec, name=f"{name}.bias").to(weight.device)


def _constructor_kwargs(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Linear):
        return dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)
    return dict(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )


def quantized_layer_from_float(
    layer: nn.Module, scheme: QuantScheme, name: str, quantize_input: bool = False
) -> nn.Module:
    """Return the fake-quant twin of a float Conv/Linear (exact type match), with the same weights."""
    cls = _QUANT_CLASS[type(layer)]
    q = cls(**_constructor_kwargs(layer), device="meta")
    q.to_empty(device=layer.weight.device)
    q._init_from_float(layer, scheme, name, quantize_input)
    return q


class QuantConvBn(nn.Module):
    """Conv followed by BatchNorm for QAT, simulating the folded INT8 conv (Krishnamoorthi 2018, sec. 3.2).

    The conv weight is scaled by ``gamma / sqrt(running_var + eps)`` and fake-quantized exactly as the
    deployed folded conv is (a quantized bias, as on the DPU, applies from :meth:`to_folded` on); the scaling is
    undone on the output and BatchNorm then normalizes with batch statistics, until :meth:`freeze_bn` switches
    it to running statistics. :meth:`to_folded` returns the
    plain fake-quant conv with BatchNorm folded in.
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, scheme: QuantScheme, name: str) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.scheme = scheme
        self.name = name
        self.weight_fake_quant = _weight_quantizer(scheme.weight, conv.weight, name)
        self.register_buffer("bn_frozen", torch.tensor(0, dtype=torch.uint8, device=conv.weight.device))

    def freeze_bn(self, frozen: bool = True) -> None:
        self.bn_frozen.fill_(int(frozen))

    def _scale_factor(self) -> torch.Tensor:
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        return self.bn.weight / std if self.bn.affine else 1.0 / std

    def _view(self, t: torch.Tensor, dims: int, axis: int) -> torch.Tensor:
        shape = [1] * dims
        shape[axis] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self._scale_factor()
        w = self.conv.weight
        w_q = self.weight_fake_quant(w * self._view(factor, w.dim(), 0))
        if isinstance(self.conv, nn.Linear):
            y = F.linear(x, w_q)
        else:
            y = self.conv._conv_forward(x, w_q, None)
        y = y / self._view(factor, y.dim(), 1)
        if self.conv.bias is not None:
            y = y + self._view(self.conv.bias, y.dim(), 1)
        if self.training and not self.bn_frozen.item():
            return self.bn(y)
        return F.batch_norm(
            y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps
        )

    @torch.no_grad()
    def to_folded(self) -> nn.Module:
        """The equivalent fake-quant conv/linear with BatchNorm folded into weight and bias."""
        from lightning_quant.capture.bn_fold import fold_bn_into

        folded = fold_bn_into(self.conv, self.bn)
        q = quantized_layer_from_float(folded, self.scheme, self.name)
        q.weight_fake_quant.load_state_dict(self.weight_fake_quant.state_dict())
        if q.bias_fake_quant is not None:  # the folded bias exists only now: calibrate its quantizer on it
            q.bias_fake_quant(q.bias)
        return q

    def extra_repr(self) -> str:
        return f"{self.name!r}, bn_frozen={bool(self.bn_frozen.item())}"
