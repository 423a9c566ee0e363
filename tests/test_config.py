"""Config validation (one test per `raise` in config.py) and the per-target default schemes."""

from __future__ import annotations

import pytest

from lightning_quant.config import (
    Granularity,
    QATSchedule,
    QuantMode,
    QuantScheme,
    QuantSpec,
    RoundingMode,
    ScaleType,
    Target,
    scheme_for_target,
)

# --- QuantSpec validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, 16, -8, 8.0, "8"])
def test_bits_outside_2_to_8_raise(bits):
    with pytest.raises(ValueError, match=r"bits=.* is not supported; use an integer from 2 to 8"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [True, False])
def test_bool_bits_raise(bits):
    with pytest.raises(ValueError, match=rf"bits={bits} is not supported"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_bits_in_range_accepted(bits):
    assert QuantSpec(bits=bits).quant_range() == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("granularity", "per_row", "'per_tensor', 'per_channel'"),
        ("scale_type", "pow2", "'float', 'power_of_two'"),
        ("rounding", "nearest", "'half_even', 'half_up', 'half_away'"),
    ],
)
def test_bad_enum_strings_list_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}='{value}' is not supported; use one of {allowed}\."):
        QuantSpec(**{field: value})


def test_enum_strings_and_members_are_coerced():
    spec = QuantSpec(granularity="per_channel", scale_type=ScaleType.POWER_OF_TWO, rounding="half_up")
    assert spec.granularity is Granularity.PER_CHANNEL and spec.per_channel
    assert spec.scale_type is ScaleType.POWER_OF_TWO and spec.rounding is RoundingMode.HALF_UP


@pytest.mark.parametrize("signed", [True, False])
def test_power_of_two_needs_symmetric(signed):
    with pytest.raises(ValueError, match="power_of_two scales need a symmetric scheme"):
        QuantSpec(scale_type="power_of_two", symmetric=False, signed=signed)


@pytest.mark.parametrize("kw", [dict(signed=False), dict(symmetric=False), dict(symmetric=False, signed=False)])
def test_narrow_range_needs_symmetric_signed(kw):
    with pytest.raises(ValueError, match="narrow_range applies to symmetric signed integers only"):
        QuantSpec(narrow_range=True, **kw)


def test_learnable_power_of_two_raises():
    with pytest.raises(ValueError, match="learnable scales cannot stay powers of two"):
        QuantSpec(learnable=True, scale_type="power_of_two")
    assert QuantSpec(learnable=True).learnable


@pytest.mark.parametrize("c", [0.0, -0.1, 1.5, float("nan")])
def test_bad_averaging_constant_raises(c):
    with pytest.raises(ValueError, match=r"averaging_constant=.* must be in \(0, 1\]"):
        QuantSpec(averaging_constant=c)


def test_averaging_constant_one_is_allowed():
    assert QuantSpec(averaging_constant=1.0).averaging_constant == 1.0


def test_unknown_observer_raises():
    with pytest.raises(ValueError, match=r"observer='histogram' is not registered; use one of 'minmax', .*register"):
        QuantSpec(observer="histogram")


def test_quant_range_and_dict_round_trip():
    assert QuantSpec(bits=4, signed=True).quant_range() == (-8, 7)
    assert QuantSpec(bits=4, narrow_range=True).quant_range() == (-7, 7)
    assert QuantSpec(bits=2, symmetric=False, signed=False).quant_range() == (0, 3)
    spec = QuantSpec(bits=6, symmetric=False, signed=False, rounding="half_away", observer="moving_average")
    d = spec.to_dict()
    assert d["rounding"] == "half_away" and d["granularity"] == "per_tensor"
    assert QuantSpec(**d) == spec


# --- QuantScheme ------------------------------------------------------------------------------------------------


def test_per_channel_activations_raise():
    with pytest.raises(ValueError, match="per-channel activation quantization is not supported"):
        QuantScheme(activation=QuantSpec(granularity="per_channel"))
    with pytest.raises(ValueError, match="per-channel activation"):
        QuantScheme(activation={"granularity": "per_channel"})


def test_scheme_dict_round_trip():
    scheme = scheme_for_target("dpu")
    again = QuantScheme.from_dict(scheme.to_dict())
    assert again == scheme
    d = scheme.to_dict()
    from_dicts = QuantScheme(weight=d["weight"], activation=d["activation"], target=d["target"])
    assert from_dicts == scheme and d["target"] == "dpu"
    assert QuantScheme.from_dict({"weight": d["weight"], "activation": d["activation"]}).target is None  # old states


# --- scheme_for_target ------------------------------------------------------------------------------------------


def test_x86_scheme():
    s = scheme_for_target("x86")
    a, w = s.activation, s.weight
    assert (a.signed, a.symmetric, a.quant_range(), a.granularity) == (False, False, (0, 255), Granularity.PER_TENSOR)
    assert (w.signed, w.symmetric, w.narrow_range, w.granularity) == (True, True, True, Granularity.PER_CHANNEL)
    assert w.quant_range() == (-63, 63) and w.ch_axis == 0  # 7-bit: no u8s8 saturation on CPUs without VNNI
    assert a.observer == "mean_minmax" and a.scale_type is ScaleType.FLOAT  # the PTQ default: per-image extremes
    vnni = scheme_for_target("x86_vnni")
    assert vnni.weight.quant_range() == (-127, 127) and vnni.activation == a


def test_tensorrt_scheme():
    s = scheme_for_target(Target.TENSORRT)
    assert (s.activation.signed, s.activation.symmetric, s.activation.quant_range()) == (True, True, (-128, 127))
    assert s.weight.per_channel and s.weight.narrow_range and s.weight.quant_range() == (-127, 127)


def test_dpu_scheme():
    s = scheme_for_target("dpu")
    for spec in (s.activation, s.weight):
        assert spec.scale_type is ScaleType.POWER_OF_TWO
        assert spec.granularity is Granularity.PER_TENSOR
        assert spec.symmetric and spec.signed and not spec.narrow_range
    assert s.activation.rounding is RoundingMode.HALF_UP
    assert s.weight.rounding is RoundingMode.HALF_AWAY


@pytest.mark.parametrize("target", ["x86", "tensorrt", "dpu"])
def test_qat_mode_uses_moving_average_activations(target):
    assert scheme_for_target(target, mode="qat").activation.observer == "moving_average"
    # the DPU picks fix positions with Vitis AI's search (lightning_quant.quantizers.dpu), weights always
    default = "dpu_pot" if target == "dpu" else "minmax"
    assert scheme_for_target(target, mode=QuantMode.QAT).weight.observer == default
    ptq_activations = "dpu_pot" if target == "dpu" else "mean_minmax"
    assert scheme_for_target(target).activation.observer == ptq_activations


def test_overrides():
    s = scheme_for_target("x86", weight_bits=4, activation_rounding="half_up", weight_granularity="per_tensor")
    assert s.weight.bits == 4 and s.weight.quant_range() == (-7, 7)
    assert s.activation.rounding is RoundingMode.HALF_UP
    assert not s.weight.per_channel
    # overrides still go through validation
    with pytest.raises(ValueError, match="narrow_range applies to symmetric signed"):
        scheme_for_target("x86", activation_narrow_range=True)


@pytest.mark.parametrize("key", ["weights_bits", "activation_bitz", "bits", "input_bits"])
def test_unknown_override_raises(key):
    with pytest.raises(ValueError, match=rf"unknown scheme override '{key}'; use weight_<field> or activation_<field>"):
        scheme_for_target("x86", **{key: 4})


def test_unknown_target_and_mode_list_allowed_values():
    with pytest.raises(
        ValueError, match=r"target='arm' is not supported; use one of 'x86', 'x86_vnni', 'tensorrt', 'dpu'"
    ):
        scheme_for_target("arm")
    with pytest.raises(ValueError, match=r"mode='int8' is not supported; use one of 'ptq', 'qat'"):
        scheme_for_target("x86", mode="int8")


# --- QATSchedule ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["freeze_observer_epoch", "freeze_bn_epoch", "freeze_observer_step", "freeze_bn_step"]
)
@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_qat_schedule_rejects_negative_and_non_int(field, value):
    with pytest.raises(ValueError, match=rf"QATSchedule.{field}={value!r} must be a non-negative integer or None"):
        QATSchedule(**{field: value})


def test_qat_schedule_epochs_and_steps():
    s = QATSchedule()
    assert (s.freeze_observer_epoch, s.freeze_bn_epoch) == (4, 3)
    assert not s.bn_frozen(2, 10_000) and s.bn_frozen(3, 0)
    assert not s.observers_frozen(3, 0) and s.observers_frozen(4, 0)
    steps = QATSchedule(freeze_observer_step=100, freeze_bn_step=0, freeze_observer_epoch=0)
    assert not steps.observers_frozen(50, 99) and steps.observers_frozen(0, 100)  # the step wins over the epoch
    assert steps.bn_frozen(0, 0)
    never = QATSchedule(freeze_observer_epoch=None, freeze_bn_epoch=None)
    assert not never.observers_frozen(10**6, 10**6) and not never.bn_frozen(10**6, 10**6)
