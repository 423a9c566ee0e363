"""Accuracy control: the most sensitive layers go back to float until the metric bound holds, and stay float."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_quant import convert, quantize
from lightning_quant.algorithms import quantize_with_accuracy_control
from lightning_quant.config import Granularity, QuantOptions, scheme_for_target
from lightning_quant.quantizers.prepare import iter_quantizers, prepare_info

# 4-bit per-tensor weights, min/max ranges and no refinement unless a test names one: coarse on purpose, so one layer
# dominates the error and the search has something to find
SCHEME = scheme_for_target(
    "tensorrt", weight_bits=4, weight_granularity=Granularity.PER_TENSOR, activation_observer="minmax"
)
PLAIN = QuantOptions(bias_correction=False)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = 40.0 * model[2].weight.abs().max()  # one outlier: 4-bit per-tensor ruins it
    return model


def _data(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


HELD_OUT = _data(2, seed=7)


def _metric_for(model: nn.Module):
    """Higher is better: 100 minus the relative output error (percent) against the float model on held-out data."""
    with torch.no_grad():
        reference = torch.cat([model(x) for x in HELD_OUT])

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            out = torch.cat([m(x) for x in HELD_OUT])
        return 100.0 - 100.0 * float((out - reference).norm() / reference.norm())

    return metric


def _run(model, bound, **kwargs):
    kwargs.setdefault("options", PLAIN)
    return quantize_with_accuracy_control(
        model, _data(), _metric_for(model), max_accuracy_drop=bound, scheme=SCHEME, progress=False, **kwargs
    )


def test_most_sensitive_layer_goes_back_to_float_and_stays_there():
    model = _model()
    metric = _metric_for(model)
    all_quantized = metric(quantize(model, _data(), scheme=SCHEME, options=PLAIN, progress=False))
    bound = (100.0 - all_quantized) / 2
    qmodel, report = _run(model, bound)
    assert report.ranking[0][0] == "2"  # the outlier layer recovers the most
    assert report.kept_float[0] == "2" and len(report.kept_float) < 4
    assert report.met and report.drop <= bound and report.metric_final == pytest.approx(metric(qmodel))
    assert report.metric_quantized == pytest.approx(all_quantized)
    assert type(qmodel.get_submodule("2")) is nn.Conv2d  # excluded: a plain float conv, no fake-quant
    assert "2" in prepare_info(qmodel).float_layers
    assert not any(name.startswith("2.") for name, _ in iter_quantizers(qmodel))
    converted = convert(qmodel)  # convert() re-enables fake-quant: the float layer must stay float
    assert metric(converted) == pytest.approx(report.metric_final, abs=1e-4)
    assert "layers kept in float: 2" in str(report) and report.to_dict()["met"] is True


def test_bisection_finds_the_same_prefix_as_a_linear_search():
    model = _model()
    metric = _metric_for(model)
    bound = 12.0  # 4-bit per-tensor: about 63 with every layer quantized, 86 with the outlier layer in float
    _, report = _run(model, bound)
    assert len(report.kept_float) >= 2
    ranking = [layer for layer, _ in report.ranking]
    floor = report.metric_float - bound
    linear = next(
        k
        for k in range(1, len(ranking) + 1)
        if metric(quantize(model, _data(), scheme=SCHEME, exclude=ranking[:k], options=PLAIN, progress=False)) >= floor
    )
    assert len(report.kept_float) == linear
    assert len(report.evaluations) <= 1 + math.ceil(math.log2(len(ranking)))


def test_no_search_when_the_bound_already_holds_and_determinism():
    model = _model()
    qmodel, report = _run(model, 100.0)
    assert report.kept_float == [] and report.ranking == [] and report.evaluations == []
    assert report.metric_final == report.metric_quantized and report.quantized_layers == 4
    _, first = _run(model, 12.0)
    _, second = _run(model, 12.0)
    assert first.kept_float == second.kept_float and first.ranking == second.ranking


def test_user_exclude_is_kept_and_options_pass_through():
    model = _model()
    qmodel, report = _run(model, 20.0, exclude=["7"], options=QuantOptions(bias_correction=True))
    assert type(qmodel.get_submodule("7")) is nn.Linear
    assert "7" not in [layer for layer, _ in report.ranking]
    assert report.quantized_layers == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_accuracy_drop": -1.0}, r"max_accuracy_drop=-1.0 must be a finite number >= 0"),
        ({"max_accuracy_drop": float("nan")}, r"max_accuracy_drop=nan must be a finite number >= 0"),
        ({"max_accuracy_drop": True}, r"max_accuracy_drop=True must be a number >= 0"),
        ({"max_accuracy_drop": "1"}, r"max_accuracy_drop='1' must be a number >= 0"),
        ({"max_accuracy_drop": 1.0, "ranking_batches": 0}, r"ranking_batches=0 must be an integer >= 1"),
    ],
)
def test_bad_options(kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        quantize_with_accuracy_control(model, _data(), _metric_for(model), scheme=SCHEME, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adaroud": True}, r"quantize_with_accuracy_control\(\) got an unexpected keyword argument 'adaroud'"),
        ({"options": {"adaround": True}}, r"options=\.\.\.\) takes a QuantOptions, got dict"),
    ],
)
def test_misspelled_or_untyped_options_are_refused(kwargs, match):
    model = _model()
    with pytest.raises(TypeError, match=match):
        quantize_with_accuracy_control(
            model, _data(), _metric_for(model), max_accuracy_drop=1.0, scheme=SCHEME, progress=False, **kwargs
        )


@pytest.mark.parametrize("value", [float("nan"), "high", None, True])
def test_metric_must_be_a_finite_number(value):
    with pytest.raises(ValueError, match="metric_fn must return a finite number"):
        quantize_with_accuracy_control(_model(), _data(), lambda m: value, max_accuracy_drop=1.0, progress=False)


def test_bound_that_needs_every_layer_in_float_is_an_error():
    model = _model()
    calls = iter(range(1000))

    def never_good_enough(m: nn.Module) -> float:
        return 100.0 if next(calls) == 0 else 0.0  # float scores 100, anything quantized 0

    expected = r"not met even with 3 of the 4 quantized layers in float .*Allow a larger drop"
    with pytest.raises(ValueError, match=expected):
        quantize_with_accuracy_control(model, _data(), never_good_enough, max_accuracy_drop=1.0, progress=False)


def test_fallback_weight_bits_moves_sensitive_layers_to_8_bit_weights():
    model = _model()
    metric = _metric_for(model)
    bound = 12.0
    qmodel, report = _run(model, bound, fallback_weight_bits=8)
    assert report.kept_float == [] and report.higher_bits[0] == "2" and report.fallback_weight_bits == 8
    assert report.met and report.metric_final == pytest.approx(metric(qmodel))
    assert prepare_info(qmodel).weight_bits == dict.fromkeys(report.higher_bits, 8)
    bits = {name: fq.spec.bits for name, fq in iter_quantizers(qmodel) if name.endswith("weight_fake_quant")}
    assert bits == {f"{n}.weight_fake_quant": 8 if n in report.higher_bits else 4 for n in ("0", "2", "4", "7")}
    # the search's in-place switch is exactly what re-quantizing with layer_weight_bits gives
    k = len(report.higher_bits)
    assert dict(report.evaluations)[k] == pytest.approx(report.metric_final, abs=1e-4)
    assert f"{k} of 4 layers given 8-bit weights: 2" in str(report)
    assert report.to_dict()["higher_bits"] == report.higher_bits


def test_fallback_weight_bits_bad_values():
    model = _model()
    for bits, match in [(4, "above the scheme's 4-bit weights"), (9, "at most 8"), (True, "must be an integer")]:
        with pytest.raises(ValueError, match=match):
            _run(model, 1.0, fallback_weight_bits=bits)
    with pytest.raises(ValueError, match="DPU runs 8-bit weights only"):
        quantize_with_accuracy_control(
            model, _data(), _metric_for(model), max_accuracy_drop=1.0, target="dpu", fallback_weight_bits=8
        )


def test_layer_weight_bits_mixed_precision_quantize():
    model = _model()
    qmodel = quantize(
        model, _data(), scheme=SCHEME, layer_weight_bits={"2": 8, "[04]": 6}, options=PLAIN, progress=False
    )
    bits = {name: fq.spec.bits for name, fq in iter_quantizers(qmodel) if name.endswith("weight_fake_quant")}
    assert bits == {"0.weight_fake_quant": 6, "2.weight_fake_quant": 8, "4.weight_fake_quant": 6,
                    "7.weight_fake_quant": 4}  # fmt: skip
    assert prepare_info(qmodel).weight_bits == {"0": 6, "2": 8, "4": 6}
    metric = _metric_for(model)
    assert metric(qmodel) > metric(quantize(model, _data(), scheme=SCHEME, options=PLAIN, progress=False)) + 5
    with pytest.raises(ValueError, match=r"pattern 'conv\*' matches no Conv/Linear layer; .* 0, 2, 4, ..., 7 "):
        quantize(model, _data(), scheme=SCHEME, layer_weight_bits={"conv*": 8}, progress=False)


@pytest.mark.parametrize("fallback", [None, 8], ids=["float", "8-bit"])
def test_a_layer_tried_outside_the_scheme_runs_without_the_bias_correction_of_its_narrow_weights(fallback):
    """Bias correction compensated each layer's 4-bit weight error in its bias. While the search tries a layer in
    float (or at 8 bits), that compensation no longer applies: the layer runs with its float bias. Found by the app
    smoke test: with 3-bit weights, 19 of 20 layers "in float" scored below all 20 quantized."""
    from lightning_quant.algorithms.accuracy_control import _switched_off, _weights_at

    model = _model()
    qmodel = quantize(model, _data(), scheme=SCHEME, options=QuantOptions(bias_correction=True), progress=False)
    layers = prepare_info(qmodel).quantized_layers
    corrected = {name: qmodel.get_submodule(name).bias.detach().clone() for name in layers}
    assert any(not torch.equal(corrected[n], model.get_submodule(n).bias) for n in layers)
    everything = {name for name, _ in iter_quantizers(qmodel)}
    with torch.no_grad():
        if fallback is None:
            with _switched_off(qmodel, everything, layers):  # every layer "kept in float": the float model
                torch.testing.assert_close(qmodel(HELD_OUT[0]), model(HELD_OUT[0]))
        else:
            with _weights_at(qmodel, layers, fallback):
                for name in layers:
                    assert torch.equal(qmodel.get_submodule(name).bias, model.get_submodule(name).bias), name
    for name in layers:  # the refined biases are back
        assert torch.equal(qmodel.get_submodule(name).bias, corrected[name]), name


def test_a_requantized_model_that_misses_the_bound_gets_the_next_ranked_layer_too():
    """Quantizing again with the chosen layers re-calibrates everything around them, which can cost the point the
    search had; the next ranked layer then goes to float as well, until the bound holds (a few layers at most)."""
    model = _model()
    base_metric = _metric_for(model)
    search_model: list[nn.Module] = []

    def metric(m: nn.Module) -> float:  # every model quantized after the first loses 30 points the search never saw
        if not search_model and m is not model:
            search_model.append(m)
        penalty = 30.0 if m is not model and m is not search_model[0] and len(prepare_info(m).float_layers) < 2 else 0
        return base_metric(m) - penalty

    all_quantized = base_metric(quantize(model, _data(), scheme=SCHEME, options=PLAIN, progress=False))
    bound = (100.0 - all_quantized) / 2
    qmodel, report = quantize_with_accuracy_control(
        model, _data(), metric, max_accuracy_drop=bound, scheme=SCHEME, options=PLAIN, progress=False
    )
    first, last = report.requantized[0], report.requantized[-1]
    assert first[0] == 1 and first[1] < 100.0 - bound  # the search's choice, quantized again, missed the bound
    assert last[0] == 2 and report.met and report.kept_float == [r[0] for r in report.ranking[:2]]
    assert report.metric_final == pytest.approx(metric(qmodel))
    assert "quantized again until the bound held" in str(report)
