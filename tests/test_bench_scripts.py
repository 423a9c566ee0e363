"""The benchmark scripts' method grammar and scheme choices (the parts that decide what a table row measured)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

bench_accuracy = pytest.importorskip("bench_accuracy")
bench_calibration = pytest.importorskip("bench_calibration")


def test_methods_parse_into_scheme_overrides_and_quantize_flags():
    scheme, overrides, flags = bench_accuracy.parse_method("pow2+relu+cle+bc")
    assert (scheme, overrides) == ("pow2", {})
    assert flags == {"replace_relu6": True, "cross_layer_equalization": True, "bias_correction": True}
    scheme, overrides, flags = bench_accuracy.parse_method("int8_pc+pct99.9+ff")
    assert overrides == {"activation_observer": "percentile", "activation_percentile": 99.9}
    assert flags == {"fast_finetune": True}
    assert bench_accuracy.parse_method("w4a8+mse+dw8")[1:] == ({"activation_observer": "mse"}, {})


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("int8_pc+bogus", "unknown algorithm 'bogus'"),
        ("int8_pc+mse+kl", "more than one activation estimator"),
        ("int8_pc+pctabc", "unknown algorithm 'pctabc'"),
        ("int9+bc", "unknown scheme 'int9'"),
    ],
)
def test_bad_methods_are_refused_before_any_evaluation(method, message):
    with pytest.raises(ValueError, match=message):
        bench_accuracy.parse_method(method)


def test_schemes_and_their_targets():
    pc, target = bench_accuracy.scheme_for("int8_pc")
    assert target == "x86_vnni" and pc.weight.per_channel and pc.weight.bits == 8
    pt, _ = bench_accuracy.scheme_for("int8_pt")
    assert not pt.weight.per_channel
    w4, _ = bench_accuracy.scheme_for("w4a8")
    assert w4.weight.bits == 4 and w4.activation.bits == 8
    assert bench_accuracy.scheme_for("pow2")[1] == "dpu"
    assert bench_calibration.scheme_for("dpu").activation.observer == "dpu_pot"
    assert bench_calibration.scheme_for("entropy").activation.observer == "entropy"


def test_dw8_names_only_depthwise_convolutions():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, groups=4))
    assert bench_accuracy.depthwise_layers(model) == ["0"]
