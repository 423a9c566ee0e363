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

from lightning_quant.capture.bn_fold import bn_fold_factor, bn_folded_bias, fold_bn_into
from lightning_quant.config import QuantScheme, QuantSpec
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.state_flags import BufferFlags

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


@torch.no_grad()
def _observe_once(quantizer: FakeQuantize, value: torch.Tensor) -> None:
    """Calibrate ``quantizer`` on ``value`` (a parameter that exists only now, e.g. a folded bias)."""
    was_observing = bool(quantizer.observer_enabled.item())
    quantizer.enable_observer(True)
    quantizer(value)
    quantizer.enable_observer(was_observing)


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


class QuantConvBn(BufferFlags, nn.Module):
    """Conv followed by BatchNorm for QAT, simulating the folded INT8 conv (Krishnamoorthi 2018, sec. 3.2).

    The conv weight is scaled by ``gamma / sqrt(running_var + eps)`` and fake-quantized exactly as the
    deployed folded conv is. While BatchNorm uses batch statistics (training, until :meth:`freeze_bn`), the
    scaling is undone on the output and BatchNorm normalizes it. On running statistics (eval mode, or frozen)
    the layer computes the deployed conv itself: the quantized folded weight plus the folded bias
    ``beta + (bias - running_mean) * gamma / std``, so evaluating the QAT network is evaluating what exports.

    Where the scheme quantizes biases (the DPU's 8-bit biases), ``bias_fake_quant`` quantizes the folded bias
    on running statistics; with batch statistics its rounding error is added to BatchNorm's output, so training
    sees the deployed bias too (the error carries no gradient, as a straight-through rounding would not).
    :meth:`to_folded` returns the plain fake-quant conv with BatchNorm folded in and these quantizers' states.

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> layer = QuantConvBn(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), scheme_for_target("dpu"), "c")
        >>> _ = layer(torch.randn(2, 3, 8, 8))                     # batch statistics; observers calibrate
        >>> _ = layer.eval(); x = torch.randn(1, 3, 8, 8)
        >>> torch.equal(layer(x), layer.to_folded()(x))          # eval mode computes the deployed conv
        True
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, scheme: QuantScheme, name: str) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.scheme = scheme
        self.name = name
        self.weight_fake_quant = _weight_quantizer(scheme.weight, conv.weight, name)
        self.bias_fake_quant = FakeQuantize(scheme.bias, name=f"{name}.bias") if scheme.bias is not None else None
        if self.bias_fake_quant is not None:
            self.bias_fake_quant.to(conv.weight.device)
            self.register_load_state_dict_post_hook(QuantConvBn._calibrate_bias_after_legacy_load)
        self._bias_state_missing = False
        self._register_flag("bn_frozen", False, device=conv.weight.device)

    def freeze_bn(self, frozen: bool = True) -> None:
        self._set_flag("bn_frozen", frozen)

    def _view(self, t: torch.Tensor, dims: int, axis: int) -> torch.Tensor:
        shape = [1] * dims
        shape[axis] = -1
        return t.reshape(shape)

    def folded_bias(self, factor: torch.Tensor | None = None) -> torch.Tensor:
        """The float bias of the deployed conv: ``beta + (bias - running_mean) * gamma / std`` (``factor``: this
        forward's ``gamma / std``, when it has it already)."""
        return bn_folded_bias(self.conv.bias, self.bn, bn_fold_factor(self.bn) if factor is None else factor)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.conv, nn.Linear):
            return F.linear(x, weight, bias)
        return self.conv._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = bn_fold_factor(self.bn)
        w = self.conv.weight
        w_q = self.weight_fake_quant(w * self._view(factor, w.dim(), 0))
        if not self.training or self._flag("bn_frozen"):  # running statistics: exactly the deployed conv
            bias = self.folded_bias(factor)
            return self._conv(x, w_q, self.bias_fake_quant(bias) if self.bias_fake_quant is not None else bias)
        # conv(x, w_q) / factor, with the division on the weight instead of the (far larger) output: the same values,
        # and the backward pass skips an output-sized division and its gradient (15 % of a MobileNetV2 QAT step)
        y = self._conv(x, w_q / self._view(factor, w.dim(), 0), None)
        if self.conv.bias is not None:
            y = y + self._view(self.conv.bias, y.dim(), 1)
        y = self.bn(y)
        if self.bias_fake_quant is not None:
            bias = self.folded_bias().detach()  # from the statistics BatchNorm just updated, not this forward's factor
            y = y + self._view(self.bias_fake_quant(bias) - bias, y.dim(), 1)
        return y

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # type: ignore[override]
        """A QAT checkpoint of 0.2 or earlier has no folded-bias quantizer: keep this one's (uncalibrated) state, and
        calibrate it on the loaded folded bias once the BatchNorm is loaded too (the value ``to_folded`` gave it)."""
        head = f"{prefix}bias_fake_quant."
        if self.bias_fake_quant is not None and f"{prefix}weight_fake_quant.scale" in state_dict:
            if not any(key.startswith(head) for key in state_dict):
                state_dict.update({head + k: v for k, v in self.bias_fake_quant.state_dict().items()})
                self._bias_state_missing = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _calibrate_bias_after_legacy_load(module: nn.Module, incompatible_keys: object) -> None:
        if isinstance(module, QuantConvBn) and module._bias_state_missing and module.bias_fake_quant is not None:
            module._bias_state_missing = False
            _observe_once(module.bias_fake_quant, module.folded_bias().detach())
            module.bias_fake_quant.enable_observer(bool(module.weight_fake_quant.observer_enabled.item()))

    @torch.no_grad()
    def to_folded(self) -> nn.Module:
        """The equivalent fake-quant conv/linear with BatchNorm folded into weight and bias."""
        folded = fold_bn_into(self.conv, self.bn)
        q = quantized_layer_from_float(folded, self.scheme, self.name)
        q.weight_fake_quant.load_state_dict(self.weight_fake_quant.state_dict())
        if q.bias_fake_quant is not None:
            own = self.bias_fake_quant
            if own is not None and own.calibrated.item():
                q.bias_fake_quant.load_state_dict(own.state_dict())
            else:  # never ran on running statistics: calibrate on the folded bias
                _observe_once(q.bias_fake_quant, q.bias)
        return q

    def extra_repr(self) -> str:
        return f"{self.name!r}, bn_frozen={bool(self.bn_frozen.item())}"
