"""Dynamic quantization of Linear layers: int8 weights, activations quantized per batch at run time.

Like ``torch.ao.quantization.quantize_dynamic`` and onnxruntime's ``quantize_dynamic``: no calibration data; each
input of a Linear layer is quantized to uint8 with the range of that very tensor (onnxruntime's
``DynamicQuantizeLinear``: range extended to contain 0, ``scale = (max - min) / 255``, zero point rounded half to
even), weights are symmetric per output channel. Worth it for Linear-heavy parts (MLP heads, transformer blocks)
whose activation ranges vary too much from batch to batch for one calibrated range.

:func:`~lightning_quant.export_onnx` writes each layer as ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
(input scale x weight scales) -> Add (bias)``, the integer ops onnxruntime runs. The static and dynamic schemes
compose: quantize convolutions statically with ``quantize(..., exclude=["head.*"])``, then ``quantize_dynamic``
the result (it only touches float ``nn.Linear`` layers).

``torch.ao.quantization.quantize_dynamic``'s call shape works too: ``quantize_dynamic(model, {nn.Linear},
dtype=torch.qint8)`` is ``quantize_dynamic(model)``, and a set of layer names quantizes only those layers.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> qmodel = quantize_dynamic(model)
    >>> type(qmodel[0]).__name__, qmodel[0].weight_bits
    ('DynamicQuantLinear', 7)
    >>> x = torch.randn(8, 16)
    >>> bool((qmodel(x) - model(x)).abs().max() < 0.05)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.capture.bn_fold import set_submodule
from lightning_quant.config import Granularity, QuantMode, QuantSpec, Target, scheme_for_target
from lightning_quant.errors import NothingToQuantizeError
from lightning_quant.quantizers.functional import fake_quantize, qparams_from_range
from lightning_quant.quantizers.prepare import ExcludeEntry, exclude_entries, is_excluded

__all__ = ["DynamicQuantLinear", "dynamic_fake_quantize", "dynamic_qparams", "quantize_dynamic"]


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point of ``x`` as onnxruntime's ``DynamicQuantizeLinear`` computes them.

    Example:
        >>> s, z = dynamic_qparams(torch.tensor([-1.0, 0.5, 3.0]))
        >>> round(float(s), 6), int(z)
        (0.015686, 64)
    """
    low = torch.clamp(x.detach().min().float(), max=0.0)
    high = torch.clamp(x.detach().max().float(), min=0.0)
    scale = (high - low) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tensor: any scale gives zeros
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    return scale, zero_point


def dynamic_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` to uint8 with its own range and back (straight-through gradient inside the range)."""
    scale, zero_point = dynamic_qparams(x)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return x + ((q - zero_point) * scale - x).detach()


class DynamicQuantLinear(nn.Module):
    """``nn.Linear`` with fake-quantized per-channel weights and per-batch uint8 input quantization.

    The float weight stays a parameter (its scales are computed from it once, at construction); ``weight_int8``
    and ``weight_scale`` give the stored integer form.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, name: str = "") -> None:
        super().__init__()
        if not (spec.symmetric and spec.signed and spec.granularity is Granularity.PER_CHANNEL):
            raise ValueError("dynamic quantization stores symmetric signed per-channel weights; use such a spec.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.name = name
        self.spec = spec
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        w = self.weight.detach()
        scale, zero_point = qparams_from_range(w.amin(dim=1), w.amax(dim=1), spec)
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("weight_zero_point", zero_point)

    @property
    def weight_bits(self) -> int:
        return self.spec.bits

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer computes with it (on the integer grid, in float)."""
        return fake_quantize(self.weight, self.weight_scale, self.weight_zero_point, self.spec)

    def weight_int8(self) -> torch.Tensor:
        """Integer weight codes, ``(out_features, in_features)`` int8."""
        return torch.round(self.quantized_weight() / self.weight_scale.reshape(-1, 1)).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(dynamic_fake_quantize(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.name!r}, in={self.in_features}, out={self.out_features}, int{self.spec.bits} weights, dynamic"


def _from_torch_ao(qconfig_spec: Iterable[type[nn.Module] | str], dtype: torch.dtype | None) -> tuple[str, ...]:
    """Check torch.ao's ``qconfig_spec``/``dtype`` and return the layer names it limits quantization to (() = all).

    Raises:
        TypeError: a ``{type: qconfig}`` dict, or an entry that is neither a module type nor a layer name.
        ValueError: a module type other than ``nn.Linear``, or a ``dtype`` other than ``torch.qint8``.
    """
    if isinstance(qconfig_spec, Mapping):
        raise TypeError(
            "quantize_dynamic(model, {type: qconfig}) is torch.ao's per-type qconfig; lightning_quant's qparams come "
            "from the target: call quantize_dynamic(model, 'x86') (or 'x86_vnni'/'tensorrt', weight_bits=8 for 8-bit "
            "weights)."
        )
    entries = list(qconfig_spec)
    others = sorted({e.__name__ for e in entries if isinstance(e, type) and not issubclass(e, nn.Linear)})
    if others:
        raise ValueError(
            f"quantize_dynamic quantizes nn.Linear only; {', '.join(others)} has no dynamic quantization here. Call "
            "quantize_dynamic(model) for the Linear layers (the others stay in float)."
        )
    bad = [e for e in entries if not isinstance(e, (str, type))]
    if bad:
        raise TypeError(f"qconfig_spec entries are module types or layer names, got {bad[0]!r}; use {{nn.Linear}}.")
    if dtype is not None and dtype != torch.qint8:
        half = "; for float16 weights use model.half() instead" if dtype in (torch.float16, torch.bfloat16) else ""
        raise ValueError(
            f"dtype={dtype}: lightning_quant's dynamic quantization stores int8 weights (torch.qint8 is the only "
            f"dtype it takes); call quantize_dynamic(model) or quantize_dynamic(model, dtype=torch.qint8){half}."
        )
    return tuple(e for e in entries if isinstance(e, str))


def quantize_dynamic(
    model: nn.Module,
    target: Target | str | Iterable[type[nn.Module] | str] = Target.X86,
    *,
    weight_bits: int | None = None,
    exclude: ExcludeEntry | Iterable[ExcludeEntry] = (),
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A copy of ``model`` with every float ``nn.Linear`` dynamically quantized (see the module docstring).

    Example (torch.ao's call shape):
        >>> qmodel = quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), {nn.Linear}, dtype=torch.qint8)
        >>> type(qmodel[0]).__name__
        'DynamicQuantLinear'

    Args:
        model: float model, or a statically quantized one whose float Linear layers should go dynamic.
        target: ``x86`` (7-bit weights: AVX2 integer kernels saturate on 8-bit ones without VNNI), ``x86_vnni`` or
            ``tensorrt`` (8-bit). ``dpu`` has no dynamic quantization. A set of module types and/or layer names
            (``torch.ao.quantization.quantize_dynamic``'s ``qconfig_spec``) is accepted in its place and means the
            ``x86`` target: ``{nn.Linear}`` quantizes every Linear layer, ``{"fc1", "head"}`` only the Linear layers
            at or under those names.
        weight_bits: override the target's weight width (2-8).
        exclude: Linear layers to keep in float: glob patterns of layer names and/or ``nn.Module`` types.
        dtype: torch.ao's weight dtype; only ``torch.qint8`` (what every target stores) or None.

    Raises:
        ValueError: ``target='dpu'``, a bad ``weight_bits``, a ``qconfig_spec`` type other than ``nn.Linear``, or
            a ``dtype`` other than ``torch.qint8``.
        TypeError: a ``{type: qconfig}`` dict as ``qconfig_spec``, or an ``exclude``/``qconfig_spec`` entry that is
            neither a string nor an ``nn.Module`` type.
        NothingToQuantizeError: no float ``nn.Linear`` layer (after ``exclude`` and the ``qconfig_spec`` names).
    """
    only: tuple[str, ...] = ()
    if not isinstance(target, (str, Target)):  # torch.ao's qconfig_spec: {nn.Linear}, {"fc1", ...}
        only = _from_torch_ao(target, dtype)
        target = Target.X86
    elif dtype is not None:
        _from_torch_ao((), dtype)
    scheme = scheme_for_target(target, QuantMode.PTQ)
    if scheme.target is Target.DPU:
        raise ValueError("the DPU runs fixed-point activations only; use quantize(..., target='dpu') instead.")
    spec = scheme.weight if weight_bits is None else scheme_for_target(target, weight_bits=weight_bits).weight
    patterns = exclude_entries(exclude)

    def chosen(name: str, module: nn.Module) -> bool:
        inside = not only or any(name == o or name.startswith(f"{o}.") or not o for o in only)
        return type(module) is nn.Linear and inside and not is_excluded(name, patterns, module)

    qmodel = copy.deepcopy(model)
    names = [n for n, m in qmodel.named_modules() if n and chosen(n, m)]
    if type(qmodel) is nn.Linear and chosen("", qmodel):
        return DynamicQuantLinear(qmodel, spec, "")
    if not names:
        raise NothingToQuantizeError(
            f"quantize_dynamic found no float nn.Linear layer in {type(model).__name__}"
            + (f" outside exclude={list(patterns)}" if patterns else "")
            + (f" at or under {sorted(only)}" if only else "")
            + "; it quantizes nn.Linear only (use quantize() with calibration data for convolutions)."
        )
    for name in names:
        set_submodule(qmodel, name, DynamicQuantLinear(qmodel.get_submodule(name), spec, name))
    return qmodel.eval()
