"""Typed quantization configs: schemes, targets, PTQ calibration and the QAT schedule.

Example:
    >>> from lightning_quant.config import QuantOptions, QuantSpec, scheme_for_target
    >>> scheme = scheme_for_target("x86")
    >>> scheme.activation.signed, scheme.weight.granularity.value
    (False, 'per_channel')
    >>> QuantSpec(bits=4, signed=True).quant_range()
    (-8, 7)
    >>> QuantOptions(bias_correction=True).refinements
    ('bias_correction',)
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "Granularity",
    "QATSchedule",
    "QuantMode",
    "QuantOptions",
    "QuantScheme",
    "QuantSpec",
    "RoundingMode",
    "ScaleType",
    "Target",
    "add_observer_name",
    "observer_names",
    "options_from_keywords",
    "resolve_scheme",
    "scheme_for_target",
]


# Names of the registered range estimators. The registry (lightning_quant.quantizers) adds each name here as it
# registers the estimator class, so that this bottom layer can validate a spec without importing the layer above.
_OBSERVER_NAMES: dict[str, None] = {}  # insertion-ordered: built-in estimators first


def add_observer_name(name: str) -> None:
    """Make ``name`` a valid :attr:`QuantSpec.observer` (called by ``lightning_quant.quantizers.register_observer``)."""
    _OBSERVER_NAMES[name] = None


def observer_names() -> list[str]:
    """The registered range estimator names, in registration order (built-in estimators first).

    Example:
        >>> {"minmax", "mean_minmax", "percentile", "mse", "entropy"} <= set(observer_names())
        True
    """
    return list(_OBSERVER_NAMES)


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
        if self.observer not in _OBSERVER_NAMES:
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
        >>> scheme_for_target("x86").activation.observer, scheme_for_target("x86", mode="qat").activation.observer
        ('mean_minmax', 'moving_average')
        >>> scheme_for_target("x86", weight_bits=4).weight.bits
        4

    Args:
        target: ``x86``, ``tensorrt`` or ``dpu``.
        mode: ``ptq`` uses ``mean_minmax`` activation ranges (the mean of each image's min and max; ``dpu``: Vitis
            AI's fix-position search); ``qat`` moving-average ranges.
        **overrides: ``weight_<field>`` / ``activation_<field>`` keyword overrides of any :class:`QuantSpec` field.

    Raises:
        ValueError: unknown target, mode or override name.
    """
    target = _coerce_enum(Target, target, "target")  # type: ignore[assignment]
    mode = _coerce_enum(QuantMode, mode, "mode")  # type: ignore[assignment]
    # PTQ: the mean over images of each image's min and max (NNCF's default too); plain min/max let one outlier image
    # set the range of heavy-tailed residual outputs (ResNet50: 42 % instead of 72 %; docs/benchmarks.md, "Choosing
    # the default activation estimator")
    act_observer = "moving_average" if mode is QuantMode.QAT else "mean_minmax"
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


# the post-calibration refinements, in the order they run (QuantOptions fields of the same names)
REFINEMENT_STEPS = ("range_search", "bias_correction", "adaround", "fast_finetune")
# the options that change the float network before quantizers are inserted (they apply to PTQ and QAT alike)
NETWORK_TRANSFORMS = ("replace_relu6", "cross_layer_equalization")


@dataclass(frozen=True)
class QuantOptions:
    """What runs around calibration: float-network transforms before quantizers are inserted, and the refinements
    after calibration. One frozen value, passed as ``options=`` to :func:`~lightning_quant.quantize` and
    :class:`~lightning_quant.QuantCallback`, saved with every checkpoint and re-applied on every load.

    Example:
        >>> opts = QuantOptions(replace_relu6=True, cross_layer_equalization=True, bias_correction=True)
        >>> opts.refinements, opts.network_transforms
        (('bias_correction',), ('replace_relu6', 'cross_layer_equalization'))
        >>> QuantOptions.from_dict(opts.to_dict()) == opts
        True
        >>> QuantOptions(adaround_per_sample=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: adaround_per_sample=True changes how AdaRound weighs ... set adaround=True too ...

    Args:
        replace_relu6: swap every ``nn.ReLU6`` for ``nn.ReLU`` first (:func:`lightning_quant.algorithms.relu6_to_relu`):
            cross-layer equalization can then pair the layers around them (MobileNetV2 per-tensor needs it) and the
            DPU runs ReLU natively. It changes the float function where activations exceed 6.
        cross_layer_equalization: equalize consecutive layer pairs of the float network, with bias absorption
            (:func:`lightning_quant.algorithms.equalize`); pairs through a ReLU6 are left as they are unless
            ``replace_relu6``. Changes the weights, not the function.
        range_search: (PTQ) after calibration, choose the activation clipping percentile of each group (branch
            outputs, residual sums, other ReLU outputs) that keeps the output closest to float
            (:func:`lightning_quant.algorithms.search_activation_ranges`); needs the ``percentile`` activation
            estimator, or power-of-two scales (``target="dpu"``: it shifts each group's fix positions instead).
        bias_correction: (PTQ) correct each layer's bias for the mean quantization error
            (:func:`lightning_quant.algorithms.correct_bias`); for ``dpu`` before the shift constraints. ``None`` (the
            default) decides per run (:meth:`resolved`): on for PTQ on ``x86``, ``x86_vnni`` and ``tensorrt`` (it
            streams one batch at a time: a few seconds, no memory to speak of), off for QAT and ``dpu`` (Vitis AI
            leaves it to the user). ``False`` switches it off.
        adaround: (PTQ) learn each weight's rounding direction layer by layer
            (:func:`lightning_quant.algorithms.adaround`, Nagel et al. 2020); worth it at 4-6 bit weights.
        adaround_per_sample: (with ``adaround``) weigh every calibration image's layer output error the same instead
            of pooling them, so a few images with huge activations do not decide the rounding for the rest.
        fast_finetune: (PTQ) tune weights layer by layer against the float outputs (AdaQuant, Vitis AI's
            ``--fast_finetune``; :func:`lightning_quant.algorithms.fast_finetune`); runs after AdaRound.
        refinement_batches: the refinements use the first ``min(calibration batches, refinement_batches)``
            calibration batches.

    Raises:
        ValueError: a switch that is not a bool, ``adaround_per_sample`` without ``adaround``, or
            ``refinement_batches`` below 1.
    """

    replace_relu6: bool = False
    cross_layer_equalization: bool = False
    range_search: bool = False
    bias_correction: bool | None = None
    adaround: bool = False
    adaround_per_sample: bool = False
    fast_finetune: bool = False
    refinement_batches: int = 4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"QuantOptions.{f.name}={value!r} must be True or False.")
            if f.type in ("bool | None", bool | None) and value is not None and not isinstance(value, bool):
                raise ValueError(f"QuantOptions.{f.name}={value!r} must be True, False or None (the default).")
        batches = self.refinement_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"QuantOptions.refinement_batches={batches!r} must be an integer >= 1 (4 is typical).")
        if self.adaround_per_sample and not self.adaround:
            raise ValueError(
                "adaround_per_sample=True changes how AdaRound weighs the calibration images, but adaround is off; set "
                "adaround=True too (recipes: quant.options.adaround=true) or drop adaround_per_sample."
            )

    @property
    def refinements(self) -> tuple[str, ...]:
        """The post-calibration steps switched on, in the order they run (a ``None`` switch is not on until
        :meth:`resolved` decides it)."""
        return tuple(step for step in REFINEMENT_STEPS if getattr(self, step))

    def resolved(self, mode: QuantMode | str, target: Target | str | None) -> QuantOptions:
        """These options with every per-run default (``None``) decided for ``mode`` and ``target``.

        ``quantize()``, :class:`~lightning_quant.QuantCallback` and the app call it, so what runs, what the checkpoint
        records and what the report shows are the decided values.

        Example:
            >>> auto = QuantOptions()
            >>> auto.resolved("ptq", "x86").refinements, auto.resolved("qat", "x86").refinements
            (('bias_correction',), ())
            >>> off = QuantOptions(bias_correction=False)  # an explicit choice is kept
            >>> auto.resolved("ptq", "dpu").refinements, off.resolved("ptq", "x86") == off
            ((), True)
        """
        if self.bias_correction is not None:
            return self
        mode = _coerce_enum(QuantMode, mode, "mode")
        target = None if target is None else _coerce_enum(Target, target, "target")
        on = mode is QuantMode.PTQ and target is not Target.DPU
        return dataclasses.replace(self, bias_correction=on)

    @property
    def network_transforms(self) -> tuple[str, ...]:
        """The float-network transforms switched on, in the order they run."""
        return tuple(name for name in NETWORK_TRANSFORMS if getattr(self, name))

    def check_mode(self, mode: QuantMode | str) -> None:
        """Refinements tune a PTQ calibration; QAT trains the weights itself.

        Raises:
            ValueError: ``mode='qat'`` with a refinement switched on (the message names them).
        """
        if _coerce_enum(QuantMode, mode, "mode") is QuantMode.QAT and self.refinements:
            raise ValueError(
                f"{', '.join(self.refinements)} refine a PTQ calibration; QAT trains the weights itself. Use "
                "mode='ptq' with them, or drop them from the options for mode='qat'."
            )

    def check_scheme(self, scheme: QuantScheme) -> None:
        """The range search tunes percentiles or power-of-two positions: fail before calibration, not after it.

        Raises:
            ValueError: ``range_search`` with activations that use neither the ``percentile`` estimator nor
                power-of-two scales.
        """
        act = scheme.activation
        if self.range_search and act.observer != "percentile" and act.scale_type is not ScaleType.POWER_OF_TWO:
            raise ValueError(
                f"range_search tunes the clipping percentile of the 'percentile' activation estimator (or power-of-two "
                f"fix positions), but the scheme's activations use {act.observer!r} with {act.scale_type.value} "
                "scales; use scheme_for_target(target, activation_observer='percentile') (recipes: "
                "quant.scheme.activation_observer=percentile), target='dpu', or drop range_search."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantOptions:
        """Rebuild options from :meth:`to_dict` output (a checkpoint, a recipe's ``quant.options``).

        Raises:
            ValueError: an unknown key (the message lists the known ones) or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantOptions key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**data)


def resolve_scheme(target: Target | str | None, scheme: QuantScheme | None, mode: QuantMode | str) -> QuantScheme:
    """The one scheme a call quantizes with: ``scheme`` if given (its ``target`` is the target; a hand-built scheme
    without one takes ``target``), else the default scheme of ``target`` (``x86`` when neither is given).

    Example:
        >>> resolve_scheme(None, None, "ptq").target.value, resolve_scheme("dpu", None, "ptq").weight.observer
        ('x86', 'dpu_pot')
        >>> resolve_scheme("x86", scheme_for_target("dpu"), "ptq")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: target='x86' contradicts scheme.target='dpu': the scheme decides the target. ...

    Raises:
        TypeError: ``scheme`` is not a :class:`QuantScheme`.
        ValueError: an unknown target, or a ``target`` that contradicts ``scheme.target``.
    """
    if scheme is None:
        return scheme_for_target(Target.X86 if target is None else target, mode)
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a QuantScheme, got {type(scheme).__name__}; see scheme_for_target().")
    if target is not None:
        wanted = _coerce_enum(Target, target, "target")
        if scheme.target is None:  # a hand-built scheme: the given target names it
            return dataclasses.replace(scheme, target=wanted)
        if scheme.target is not wanted:
            have = None if scheme.target is None else scheme.target.value
            raise ValueError(
                f"target={wanted.value!r} contradicts scheme.target={have!r}: the scheme decides the target. Drop "
                f"target=, or build the scheme for that target with scheme_for_target({wanted.value!r}, ...)."
            )
    return scheme


def options_from_keywords(options: QuantOptions | None, keywords: dict[str, Any], caller: str) -> QuantOptions:
    """``options`` as given, or built from the switches older releases took as keyword arguments (deprecated:
    the warning shows the new call).

    Raises:
        TypeError: a keyword that is neither an option nor a parameter of ``caller``; ``options`` that is not a
            :class:`QuantOptions`; both ``options=`` and option keywords.
    """
    if options is not None and not isinstance(options, QuantOptions):
        raise TypeError(
            f"{caller}(options=...) takes a QuantOptions, got {type(options).__name__}; e.g. "
            "options=QuantOptions(bias_correction=True) (QuantOptions.from_dict(d) builds one from a dict)."
        )
    if not keywords:
        return options or QuantOptions()
    known = {f.name for f in dataclasses.fields(QuantOptions)}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if options is not None:
        raise TypeError(
            f"{caller}() got options= and the option keyword(s) {', '.join(sorted(keywords))}; put them all in "
            "options=QuantOptions(...)."
        )
    new_call = ", ".join(f"{k}={v!r}" for k, v in keywords.items())
    warnings.warn(
        f"{caller}({', '.join(f'{k}=...' for k in keywords)}) is deprecated and will be removed in the next release; "
        f"pass options=QuantOptions({new_call}) (from lightning_quant import QuantOptions).",
        DeprecationWarning,
        stacklevel=3,
    )
    return QuantOptions(**keywords)
