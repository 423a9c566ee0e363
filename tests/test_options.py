"""QuantOptions: validation, round trip, immutability, the deprecated keyword path, and the one scheme a call uses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lightning_quant import QuantCallback, QuantOptions, quantize
from lightning_quant.algorithms import quantize_with_accuracy_control
from lightning_quant.config import QuantScheme, Target, resolve_scheme, scheme_for_target

SWITCHES = [f.name for f in dataclasses.fields(QuantOptions) if f.name != "refinement_batches"]
DEPRECATED = r"options=QuantOptions\(bias_correction=True\)"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_a_switch_that_is_not_a_bool_is_refused(switch, value):
    if switch == "bias_correction":  # None is its per-run default (QuantOptions.resolved)
        if value is None:
            assert QuantOptions(bias_correction=None).bias_correction is None
            return
        with pytest.raises(ValueError, match=rf"QuantOptions\.{switch}={value!r} must be True, False or None"):
            QuantOptions(**{switch: value})
        return
    with pytest.raises(ValueError, match=rf"QuantOptions\.{switch}={value!r} must be True or False"):
        QuantOptions(**{switch: value})


def test_bias_correction_defaults_per_run_and_an_explicit_choice_is_kept():
    """quantize(model, data) corrects biases (PTQ on x86/tensorrt); QAT and the DPU do not; True/False stay."""
    auto = QuantOptions()
    assert auto.bias_correction is None and auto.refinements == ()
    assert auto.resolved("ptq", "x86").bias_correction is True
    assert auto.resolved("ptq", "tensorrt").refinements == ("bias_correction",)
    assert auto.resolved("ptq", "dpu").bias_correction is False
    assert auto.resolved("qat", "x86").bias_correction is False
    assert QuantOptions(bias_correction=False).resolved("ptq", "x86").bias_correction is False
    assert QuantOptions(bias_correction=True).resolved("ptq", "dpu").bias_correction is True
    assert QuantCallback(mode="qat").options.bias_correction is False  # no error: the default is decided per mode
    assert QuantCallback().options.bias_correction is True
    assert QuantCallback(target="dpu").options.bias_correction is False


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4", None])
def test_refinement_batches_must_be_an_integer_of_at_least_one(value):
    with pytest.raises(ValueError, match=rf"QuantOptions\.refinement_batches={value!r} must be an integer >= 1"):
        QuantOptions(refinement_batches=value)


def test_refinement_batches_accepts_positive_integers():
    assert QuantOptions(refinement_batches=1).refinement_batches == 1
    assert QuantOptions().refinement_batches == 4


def test_adaround_per_sample_needs_adaround():
    with pytest.raises(ValueError, match=r"adaround_per_sample=True .* set adaround=True too"):
        QuantOptions(adaround_per_sample=True)
    assert QuantOptions(adaround=True, adaround_per_sample=True).refinements == ("adaround",)


def test_from_dict_refuses_an_unknown_key_and_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown QuantOptions key\(s\) bias_corection; known: adaround, "):
        QuantOptions.from_dict({"bias_corection": True})
    with pytest.raises(ValueError, match=r"unknown QuantOptions key\(s\) a, b; known: .*refinement_batches"):
        QuantOptions.from_dict({"b": True, "a": False, "adaround": True})
    with pytest.raises(ValueError, match=r"QuantOptions\.bias_correction='yes' must be True, False or None"):
        QuantOptions.from_dict({"bias_correction": "yes"})  # known key, invalid value: the constructor refuses it


def test_check_mode_refuses_refinements_for_qat():
    options = QuantOptions(replace_relu6=True, bias_correction=True, fast_finetune=True)
    with pytest.raises(ValueError, match=r"^bias_correction, fast_finetune refine a PTQ calibration; QAT trains"):
        options.check_mode("qat")
    options.check_mode("ptq")
    QuantOptions(replace_relu6=True, cross_layer_equalization=True).check_mode("qat")  # transforms are fine in QAT
    with pytest.raises(ValueError, match=r"mode='int8' is not supported"):
        options.check_mode("int8")


def test_check_scheme_refuses_range_search_without_percentile_or_power_of_two():
    search = QuantOptions(range_search=True)
    with pytest.raises(ValueError, match=r"range_search tunes .* activations use 'mean_minmax' with float scales"):
        search.check_scheme(scheme_for_target("x86"))
    with pytest.raises(ValueError, match=r"activations use 'mse' with float scales"):
        search.check_scheme(scheme_for_target("tensorrt", activation_observer="mse"))
    search.check_scheme(scheme_for_target("x86", activation_observer="percentile"))
    search.check_scheme(scheme_for_target("dpu"))  # power-of-two: it shifts fix positions instead
    QuantOptions().check_scheme(scheme_for_target("x86"))


def test_quantize_checks_the_scheme_before_calibrating():
    with pytest.raises(ValueError, match="range_search tunes"):
        quantize(_model(), [], options=QuantOptions(range_search=True), progress=False)  # not "calibration data empty"


# ----------------------------------------------------------------------------------------- value semantics
def test_to_dict_from_dict_round_trip():
    options = QuantOptions(
        replace_relu6=True, cross_layer_equalization=True, range_search=True, bias_correction=True, adaround=True,
        adaround_per_sample=True, fast_finetune=True, refinement_batches=7,
    )  # fmt: skip
    data = options.to_dict()
    assert data == {**dict.fromkeys(SWITCHES, True), "refinement_batches": 7}
    assert QuantOptions.from_dict(data) == options
    assert QuantOptions.from_dict(QuantOptions().to_dict()) == QuantOptions()
    assert QuantOptions.from_dict({}) == QuantOptions()  # every key has a default


def test_refinements_and_transforms_come_in_the_order_they_run():
    everything = QuantOptions.from_dict({**dict.fromkeys(SWITCHES, True)})
    assert everything.network_transforms == ("replace_relu6", "cross_layer_equalization")
    assert everything.refinements == ("range_search", "bias_correction", "adaround", "fast_finetune")
    assert QuantOptions().refinements == () and QuantOptions().network_transforms == ()


def test_options_are_frozen_and_hashable():
    options = QuantOptions(bias_correction=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.bias_correction = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.refinement_batches = 8  # type: ignore[misc]
    assert options.bias_correction is True
    assert len({options, QuantOptions(bias_correction=True)}) == 1
    assert dataclasses.replace(options, fast_finetune=True).refinements == ("bias_correction", "fast_finetune")


# ---------------------------------------------------------------------------------------- deprecated keywords
def test_quantize_deprecated_keyword_warns_and_gives_the_same_model_bit_for_bit():
    with pytest.warns(DeprecationWarning, match=DEPRECATED) as caught:
        old = quantize(_model(), _data(), target="tensorrt", bias_correction=True, progress=False)
    assert "quantize(bias_correction=...) is deprecated" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    new = quantize(_model(), _data(), target="tensorrt", options=QuantOptions(bias_correction=True), progress=False)
    _assert_bit_identical(old.state_dict(), new.state_dict())
    plain = quantize(_model(), _data(), target="tensorrt", options=QuantOptions(bias_correction=False), progress=False)
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in new.state_dict().items())  # it did correct


def test_callback_deprecated_keyword_warns_and_gives_the_same_callback():
    with pytest.warns(DeprecationWarning, match=DEPRECATED) as caught:
        old = QuantCallback(mode="ptq", bias_correction=True, progress=False)
    assert "QuantCallback(bias_correction=...) is deprecated" in str(caught[0].message)
    new = QuantCallback(mode="ptq", options=QuantOptions(bias_correction=True), progress=False)
    assert old.options == new.options == QuantOptions(bias_correction=True)
    assert old.state_dict() == new.state_dict()
    assert new.state_dict()["options"] == QuantOptions(bias_correction=True).to_dict()


def test_deprecated_keywords_still_validate():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="set adaround=True too"):
        QuantCallback(adaround_per_sample=True)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="refine a PTQ calibration"):
        QuantCallback(mode="qat", fast_finetune=True)


def test_accuracy_control_deprecated_keyword_warns():
    with pytest.warns(DeprecationWarning, match=r"options=QuantOptions\(bias_correction=True\)"):
        qmodel, report = quantize_with_accuracy_control(
            _model(), _data(), lambda m: 1.0, max_accuracy_drop=1.0, bias_correction=True, progress=False
        )
    assert report.kept_float == []


@pytest.mark.parametrize(
    ("call", "name"),
    [(lambda **kw: quantize(_model(), _data(), progress=False, **kw), "quantize"), (QuantCallback, "QuantCallback")],
    ids=["quantize", "QuantCallback"],
)
def test_option_keyword_mistakes_raise_type_error(call, name):
    with pytest.raises(TypeError, match=rf"{name}\(\) got an unexpected keyword argument 'bias_corection'"):
        call(bias_corection=True)
    with pytest.raises(TypeError, match=rf"{name}\(\) got options= and the option keyword\(s\) fast_finetune"):
        call(options=QuantOptions(bias_correction=True), fast_finetune=True)
    with pytest.raises(TypeError, match=rf"{name}\(options=\.\.\.\) takes a QuantOptions, got dict"):
        call(options={"bias_correction": True})


# --------------------------------------------------------------------------------------------- target / scheme
def test_resolve_scheme_uses_the_scheme_and_refuses_a_contradicting_target():
    dpu = scheme_for_target("dpu")
    assert resolve_scheme(None, dpu, "ptq") is dpu
    assert resolve_scheme("dpu", dpu, "ptq") is dpu and resolve_scheme(Target.DPU, dpu, "ptq") is dpu
    assert resolve_scheme(None, None, "ptq") == scheme_for_target("x86")
    assert resolve_scheme("tensorrt", None, "qat") == scheme_for_target("tensorrt", "qat")
    with pytest.raises(ValueError, match=r"target='x86' contradicts scheme\.target='dpu'"):
        resolve_scheme("x86", dpu, "ptq")
    hand_built = resolve_scheme("tensorrt", QuantScheme(), "ptq")  # a hand-built scheme without a target takes it
    assert hand_built.target is Target.TENSORRT and hand_built.weight == QuantScheme().weight
    with pytest.raises(ValueError, match=r"target='tpu' is not supported"):
        resolve_scheme("tpu", dpu, "ptq")
    with pytest.raises(TypeError, match="scheme must be a QuantScheme, got dict"):
        resolve_scheme(None, dpu.to_dict(), "ptq")  # type: ignore[arg-type]


def test_callback_and_quantize_take_the_target_from_the_scheme():
    with pytest.raises(ValueError, match=r"target='x86' contradicts scheme\.target='dpu'"):
        QuantCallback(target="x86", scheme=scheme_for_target("dpu"))
    with pytest.raises(ValueError, match=r"target='x86' contradicts scheme\.target='dpu'"):
        quantize(_model(), _data(), target="x86", scheme=scheme_for_target("dpu"), progress=False)
    callback = QuantCallback(scheme=scheme_for_target("dpu"))
    assert callback.target is Target.DPU
    assert callback.state_dict()["target"] == "dpu"
    assert QuantCallback(target="dpu", scheme=scheme_for_target("dpu")).target is Target.DPU
    assert QuantCallback().target is Target.X86 and QuantCallback().state_dict()["target"] == "x86"
