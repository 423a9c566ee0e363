"""Typed quantization configs: schemes, targets, PTQ calibration and the QAT schedule.

Example:
    >>> from lightning_quant.config import QuantSpec, scheme_for_target
    >>> scheme = scheme_for_target("x86")
    >>> scheme.activation.signed, scheme.weight.granularity.value
    (False, 'per_channel')
    >>> QuantSpec(bits=4, signed=True).quant_range()
    (-8, 7)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "Granularity",
    "QATSchedule",
    "QuantMode",
    "QuantScheme",
    "QuantSpec",
    "RoundingMode",
    "ScaleType",
    "Target",
    "scheme_for_target",
]


def _coerce_enum(enum_cls: type[Enum], value: Any, name: str) -> Enum:
    """Turn a string (or enum member) into ``enum_cls``; the error names the allowed values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)  # type: ignore[attr-defined]
        raise ValueError(f"{name}={value!r} is not supported; use one of {allowed}.") from None


class QuantMode(str, Enum):
    """How quantization parameters are obtained: calibration only (PTQ) or fine-tuning (QAT)."""

    PTQ = "ptq"
    QAT = "qat"


class Target(str, Enum):
    """Deployment runtimes with known integer kernels; each maps to a default :class:`QuantScheme`."""

    X86 = "x86"  # onnxruntime on any x86-64 CPU: uint8 asymmetric activations, 7-bit symmetric per-channel weights
    X86_VNNI = "x86_vnni"  # x86-64 with VNNI (AVX-512 VNNI, AVX-VNNI, AMX): same with full 8-bit weights
    TENSORRT = "tensorrt"  # int8 symmetric activations and per-channel int8 weights
    DPU = "dpu"  # Vitis AI DPU: int8 symmetric per-tensor, power-of-two scales


class Granularity(str, Enum):
    """One scale for the whole tensor, or one per output channel (weights only)."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


class ScaleType(str, Enum):
    """Any float scale, or scales restricted to powers of two (shift-only hardware such as the DPU)."""

    FLOAT = "float"
    POWER_OF_TWO = "power_of_two"


class RoundingMode(str, Enum):
    """How ``x / scale`` is rounded to an integer.

    ``half_up`` (``floor(x + 0.5)``) is identical to XIR's ``DPU_ROUND``; ``half_away`` is C's ``std::round``.
    """

    HALF_EVEN = "half_even"
    HALF_UP = "half_up"
    HALF_AWAY = "half_away"


@dataclass
class QuantSpec:
    """How one tensor (weights or activations) is quantized.

    Example:
        >>> QuantSpec(bits=8, symmetric=True, signed=True, narrow_range=True).quant_range()
        (-127, 127)

    Args:
        bits: integer bit width, 2 to 8.
        symmetric: zero point fixed at 0 when True; otherwise an asymmetric range with a zero point.
        signed: signed integers (int8) when True, unsigned (uint8) when False.
        granularity: ``per_tensor`` or ``per_channel`` (weights only).
        ch_axis: channel axis for per-channel scales (0 = output channels of conv/linear weights).
        scale_type: ``float`` or ``power_of_two``.
        rounding: ``half_even``, ``half_up`` or ``half_away``.
        narrow_range: drop the most negative code (int8 -> [-127, 127]), as TensorRT and ORT weights use.
        observer: name of a registered range estimator: ``minmax``, ``moving_average``, ``mean_minmax`` (the mean
            of every sample's min and max), ``percentile``, ``mse``, ``entropy`` (see ``docs/algorithms.md``) or
            one you register.
        averaging_constant: momentum of the ``moving_average`` estimator.
        learnable: learn the scale with the task loss during QAT (LSQ).
        percentile: the ``percentile`` estimator clips at this percentile of ``|x|`` (symmetric specs) or of
            each tail (asymmetric specs), in (50, 100].

    Raises:
        ValueError: bits outside 2..8, an unknown enum value, an unknown observer name, a non-positive
            averaging constant, a percentile outside (50, 100], or a combination no integer runtime supports
            (listed in the message).
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    granularity: Granularity = Granularity.PER_TENSOR
    ch_axis: int = 0
    scale_type: ScaleType = ScaleType.FLOAT
    rounding: RoundingMode = RoundingMode.HALF_EVEN
    narrow_range: bool = False
    observer: str = "minmax"
    averaging_constant: float = 0.01
    learnable: bool = False
    percentile: float = 99.99

    def __post_init__(self) -> None:
        self.granularity = _coerce_enum(Granularity, self.granularity, "granularity")  # type: ignore[assignment]
        self.scale_type = _coerce_enum(ScaleType, self.scale_type, "scale_type")  # type: ignore[assignment]
        self.rounding = _coerce_enum(RoundingMode, self.rounding, "rounding")  # type: ignore[assignment]
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not supported; use an integer from 2 to 8 (8 is the default).")
        if not 0.0 < float(self.averaging_constant) <= 1.0:
            raise ValueError(f"averaging_constant={self.averaging_constant!r} must be in (0, 1]; 0.01 is typical.")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
            raise ValueError(f"percentile={self.percentile!r} must be a number in (50, 100]; 99.99 is typical.")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile={self.percentile!r} must be in (50, 100]; 99.99 is typical.")
        if self.scale_type is ScaleType.POWER_OF_TWO and not self.symmetric:
            raise ValueError(
                "power_of_two scales need a symmetric scheme (zero point 0), as shift-only hardware has no "
                "zero point; set symmetric=True or scale_type='float'."
            )
        if self.narrow_range and not (self.symmetric and self.signed):
            raise ValueError("narrow_range applies to symmetric signed integers only; set narrow_range=False.")
        if self.learnable and self.scale_type is ScaleType.POWER_OF_TWO:
            raise ValueError("learnable scales cannot stay powers of two; set learnable=False or scale_type='float'.")
        from lightning_quant.quantizers.observers import observer_names  # local: observers import this module

        if self.observer not in observer_names():
            raise ValueError(
                f"observer={self.observer!r} is not registered; use one of {', '.join(map(repr, observer_names()))}"
                " or register your own with lightning_quant.quantizers.register_observer."
            )

    def quant_range(self) -> tuple[int, int]:
        """Return the integer range ``(qmin, qmax)`` this spec quantizes into."""
        if self.signed:
            qmin, qmax = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
            return (qmin + 1 if self.narrow_range else qmin), qmax
        return 0, 2**self.bits - 1

    @property
    def per_channel(self) -> bool:
        return self.granularity is Granularity.PER_CHANNEL

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class QuantScheme:
    """Weight and activation specs together, plus model-level options.

    Example:
        >>> s = QuantScheme(weight=QuantSpec(bits=4, granularity="per_channel"), activation=QuantSpec(signed=False,
        ...     symmetric=False))
        >>> s.weight.bits, s.activation.quant_range()
        (4, (0, 255))

    Args:
        weight: how conv/linear weights are quantized.
        activation: how activations are quantized.
        target: the runtime the scheme was built for (set by :func:`scheme_for_target`); ``dpu`` also
            quantizes biases (8-bit, own fix position) and models the DPU's average-pool multiply.

    Raises:
        ValueError: per-channel activations (no runtime here supports them), or an unknown target.
    """

    weight: QuantSpec = field(default_factory=lambda: QuantSpec(granularity=Granularity.PER_CHANNEL))
    activation: QuantSpec = field(default_factory=QuantSpec)
    target: Target | None = None

    def __post_init__(self) -> None:
        if isinstance(self.weight, dict):
            self.weight = QuantSpec(**self.weight)
        if isinstance(self.activation, dict):
            self.activation = QuantSpec(**self.activation)
        if self.target is not None:
            self.target = _coerce_enum(Target, self.target, "target")  # type: ignore[assignment]
        if self.activation.per_channel:
            raise ValueError(
                "per-channel activation quantization is not supported by the integer runtimes targeted here; "
                "use granularity='per_tensor' for activations."
            )

    @property
    def bias(self) -> QuantSpec | None:
        """How biases are quantized: the weight spec on the DPU (biases get their own 8-bit position), else None."""
        return self.weight if self.target is Target.DPU else None

    def to_dict(self) -> dict[str, Any]:
        target = None if self.target is None else self.target.value
        return {"weight": self.weight.to_dict(), "activation": self.activation.to_dict(), "target": target}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        return cls(
            weight=QuantSpec(**data["weight"]), activation=QuantSpec(**data["activation"]), target=data.get("target")
        )


def scheme_for_target(target: Target | str, mode: QuantMode | str = QuantMode.PTQ, **overrides: Any) -> QuantScheme:
    """Return the default scheme that matches a runtime's integer kernels.

    The ``dpu`` scheme follows Vitis AI: int8, per-tensor power-of-two scales chosen by the ``dpu_pot`` observer,
    weights and biases rounded half away from zero, activations half up (XIR's ``DPU_ROUND``).

    Example:
        >>> scheme_for_target("tensorrt").activation.quant_range()
        (-128, 127)
        >>> scheme_for_target("dpu").weight.observer, scheme_for_target("dpu").bias.rounding.value
        ('dpu_pot', 'half_away')
        >>> scheme_for_target("x86", mode="qat").activation.observer
        'moving_average'
        >>> scheme_for_target("x86", weight_bits=4).weight.bits
        4

    Args:
        target: ``x86``, ``tensorrt`` or ``dpu``.
        mode: ``ptq`` uses min/max activation ranges; ``qat`` moving-average ranges.
        **overrides: ``weight_<field>`` / ``activation_<field>`` keyword overrides of any :class:`QuantSpec` field.

    Raises:
        ValueError: unknown target, mode or override name.
    """
    target = _coerce_enum(Target, target, "target")  # type: ignore[assignment]
    mode = _coerce_enum(QuantMode, mode, "mode")  # type: ignore[assignment]
    act_observer = "moving_average" if mode is QuantMode.QAT else "minmax"
    if target in (Target.X86, Target.X86_VNNI):
        # uint8 x int8 kernels without VNNI add pairs of products in int16 (vpmaddubsw) and saturate unless the
        # weights use 7 bits (255 * 63 * 2 < 32767): onnxruntime's own `reduce_range`. VNNI CPUs need no such cut.
        bits = 8 if target is Target.X86_VNNI else 7
        weight = dict(bits=bits, symmetric=True, signed=True, narrow_range=True, granularity=Granularity.PER_CHANNEL)
        act = dict(symmetric=False, signed=False)
    elif target is Target.TENSORRT:
        weight = dict(symmetric=True, signed=True, narrow_range=True, granularity=Granularity.PER_CHANNEL)
        act = dict(symmetric=True, signed=True)
    else:  # DPU
        weight = dict(
            symmetric=True,
            signed=True,
            granularity=Granularity.PER_TENSOR,
            scale_type=ScaleType.POWER_OF_TWO,
            rounding=RoundingMode.HALF_AWAY,
        )
        act = dict(symmetric=True, signed=True, scale_type=ScaleType.POWER_OF_TWO, rounding=RoundingMode.HALF_UP)
        # Vitis AI's fix-position search (lightning_quant.quantizers.dpu); QAT keeps moving-average activations
        weight["observer"] = "dpu_pot"
        act_observer = "dpu_pot" if mode is QuantMode.PTQ else act_observer
    act["observer"] = act_observer
    spec_fields = {f.name for f in dataclasses.fields(QuantSpec)}
    for key, value in overrides.items():
        prefix, _, name = key.partition("_")
        if prefix not in ("weight", "activation") or name not in spec_fields:
            raise ValueError(
                f"unknown scheme override {key!r}; use weight_<field> or activation_<field> with a field of "
                f"QuantSpec: {', '.join(sorted(spec_fields))}."
            )
        (weight if prefix == "weight" else act)[name] = value
    return QuantScheme(weight=QuantSpec(**weight), activation=QuantSpec(**act), target=target)


@dataclass
class QATSchedule:
    """When QAT stops updating observers and BatchNorm statistics (torchvision's QAT reference by default).

    Counted in epochs, or in optimizer steps when the ``*_step`` field is set (it wins over the epoch).

    Example:
        >>> QATSchedule(freeze_bn_epoch=None, freeze_observer_step=100).freeze_observer_step
        100

    Raises:
        ValueError: a negative epoch or step.
    """

    freeze_observer_epoch: int | None = 4
    freeze_bn_epoch: int | None = 3
    freeze_observer_step: int | None = None
    freeze_bn_step: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"QATSchedule.{f.name}={value!r} must be a non-negative integer or None (never).")

    def observers_frozen(self, epoch: int, step: int) -> bool:
        return (
            _reached(self.freeze_observer_step, step)
            if self.freeze_observer_step is not None
            else _reached(self.freeze_observer_epoch, epoch)
        )

    def bn_frozen(self, epoch: int, step: int) -> bool:
        return (
            _reached(self.freeze_bn_step, step)
            if self.freeze_bn_step is not None
            else _reached(self.freeze_bn_epoch, epoch)
        )


def _reached(limit: int | None, value: int) -> bool:
    return limit is not None and value >= limit
