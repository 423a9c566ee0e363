"""The benchmark scripts' method grammar and scheme choices (the parts that decide what a table row measured)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch import nn

from lightning_quant import QuantOptions, scheme_for_target

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

bench_accuracy = pytest.importorskip("bench_accuracy")
bench_calibration = pytest.importorskip("bench_calibration")


def test_methods_parse_into_scheme_overrides_and_quantize_options():
    """Every method states its settings in full (min/max, no bias correction unless named); default_<target> is the
    library's default call."""
    off = QuantOptions(bias_correction=False)
    scheme, overrides, options = bench_accuracy.parse_method("pow2+relu+cle+bc")
    assert (scheme, overrides) == ("pow2", {})
    assert options == QuantOptions(replace_relu6=True, cross_layer_equalization=True, bias_correction=True)
    scheme, overrides, options = bench_accuracy.parse_method("int8_pc+pct99.9+ff")
    assert overrides == {"activation_observer": "percentile", "activation_percentile": 99.9}
    assert options == QuantOptions(fast_finetune=True, bias_correction=False)
    assert bench_accuracy.parse_method("w4a8+mse+dw8")[1:] == ({"activation_observer": "mse"}, off)
    assert bench_accuracy.parse_method("int7_pc")[1:] == ({"activation_observer": "minmax"}, off)
    assert bench_accuracy.parse_method("int8_pc+meanmm+bc")[1:] == (
        {"activation_observer": "mean_minmax"},
        QuantOptions(bias_correction=True),
    )
    assert bench_accuracy.parse_method("w4a8+adaround+ps")[2] == QuantOptions(
        adaround=True, adaround_per_sample=True, bias_correction=False
    )
    assert bench_accuracy.parse_method("default_tensorrt") == ("default_tensorrt", {}, QuantOptions())


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("int8_pc+bogus", "unknown algorithm 'bogus'"),
        ("int8_pc+mse+kl", "more than one activation estimator"),
        ("int8_pc+pctabc", "unknown algorithm 'pctabc'"),
        ("int9+bc", "unknown scheme 'int9'"),
        ("w4a8+ps", "set adaround=True too"),
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


def test_fl8_names_the_stem_and_the_classifier():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 10))
    assert bench_accuracy.end_layers(model) == ["0", "3"]
    assert bench_accuracy.end_layers(nn.Sequential(nn.Linear(4, 2))) == ["0"]  # one layer is both ends
    assert bench_accuracy.parse_method("w4a8+fl8+dw8+adaround")[1:] == (
        {"activation_observer": "minmax"},
        QuantOptions(adaround=True, bias_correction=False),
    )


def test_resume_keeps_rows_and_replace_measures_named_methods_again(tmp_path, monkeypatch):
    out = tmp_path / "acc.json"
    measured = []

    def fake_run(model, dm, method, args):
        measured.append(method)
        return {"method": method, "target": "x86_vnni", "top1": 50.0 + len(measured), "images": 10, "ptq_s": 1.0}

    monkeypatch.setattr(bench_accuracy, "load", lambda name, args: (nn.Identity(), None))
    monkeypatch.setattr(bench_accuracy, "run_method", fake_run)
    monkeypatch.setattr(bench_accuracy.torch, "set_num_threads", lambda n: None)  # keep the test process's threads
    float_row = {"model": "resnet20", "method": "float", "top1": 60.0, "images": 10}
    base = ["--models", "resnet20", "--out", str(out), "--threads", "1", "--resume"]
    settings = {"calibration_size": 512, "seed": 0, "batch_size": 128, "limit_batches": None}
    out.write_text(json.dumps({"settings": settings, "rows": [float_row]}))
    bench_accuracy.main([*base, "--methods", "int8_pc", "int8_pt"])
    bench_accuracy.main([*base, "--methods", "int8_pc", "int8_pt"])  # nothing left to measure
    assert measured == ["int8_pc", "int8_pt"]
    bench_accuracy.main([*base, "--methods", "int8_pc", "--replace"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["top1"]) for r in rows] == [("float", 60.0), ("int8_pc", 53.0), ("int8_pt", 52.0)]
    assert rows[1]["drop"] == -7.0 and len(rows[1]["measured"]) == 10  # YYYY-MM-DD


@pytest.mark.parametrize("model", ["mobilenet_v2", "resnet50", "resnet20", "resnet56"])
def test_peer_benchmark_ours_recipe_row_runs_the_models_recipe(model):
    """bench_peers' ``ours_recipe`` row claims to be the model's recipe: its scheme and options must be what the app
    builds from the recipe file, so that a recipe change cannot leave the peer table measuring something else. The
    ``ours`` and ``ours_tensorrt`` rows are the default call with only the target given."""
    from omegaconf import OmegaConf

    from lightning_quant.app import compose_config
    from lightning_quant.app.main import quant_options, quant_scheme

    bench_peers = pytest.importorskip("bench_peers")
    entry = bench_peers.MODELS[model]
    cfg = compose_config([f"recipe={entry['recipe']}"])
    assert cfg.quant.target == "x86"  # the module docstring's claim for the ours row
    scheme, options = quant_scheme(cfg, "ptq"), quant_options(cfg, "ptq")
    assert bench_peers.ours_scheme(model, "ours_recipe") == scheme
    assert bench_peers.ours_options(model, "ours_recipe") == options
    assert bench_peers.DEFAULT_CALLS == {"ours": "x86", "ours_tensorrt": "tensorrt"}
    for variant in ("ours_per_tensor", "ours_pow2", "ours_per_tensor_cle", "ours_best"):  # the model's settings hold
        assert bench_peers.ours_scheme(model, variant).activation.observer == scheme.activation.observer, variant
        switched_on = bench_peers.ours_options(model, variant)
        assert all(getattr(switched_on, k) for k in (*options.network_transforms, *options.refinements)), variant
    assert bench_peers.ours_options(model, "ours_dpu") == QuantOptions(**bench_peers.DATA_FREE)  # Vitis AI's recipe
    recipe = OmegaConf.load(SCRIPTS.parent / "recipes" / "recipe" / f"{entry['recipe']}.yaml")
    if "batch_size" in recipe.get("data", {}):  # a recipe that batches its calibration its own way (range search)
        assert entry["calib_batch"] == recipe.data.batch_size


def test_peer_benchmark_variants_keep_the_recipes_activation_settings():
    bench_peers = pytest.importorskip("bench_peers")
    pct = scheme_for_target("x86", activation_observer="percentile", activation_percentile=99.9)
    assert bench_peers.activation_overrides(pct) == {"activation_observer": "percentile", "activation_percentile": 99.9}
    assert bench_peers.activation_overrides(scheme_for_target("dpu")) == {}
    both = QuantOptions(replace_relu6=True, bias_correction=True, adaround=True, adaround_per_sample=True)
    assert bench_peers.option_notes(both) == ["ReLU6 -> ReLU", "bias correction", "AdaRound", "per-sample AdaRound"]
    assert bench_peers.option_notes(QuantOptions()) == []


def test_peer_summary_bolds_the_best_default_and_tells_failures_from_missing_runs():
    bench_peers = pytest.importorskip("bench_peers")
    rows = [
        {"model": "m", "method": "float", "status": "ok", "top1": 80.0},
        {"model": "m", "method": "ours", "status": "ok", "top1": 80.5, "drop_points": -0.5},
        {"model": "m", "method": "ort", "status": "ok", "top1": 80.7, "drop_points": -0.7},
        {"model": "m", "method": "ours_best", "status": "ok", "top1": 99.0, "drop_points": -19.0},  # not a default
        {"model": "m", "method": "pt2e", "status": "error"},
    ]
    line = bench_peers.summary([{"rows": rows}]).splitlines()[-1]
    assert line == "| m (80.00) | 80.50 (+0.50) | - | fails | - | **80.70 (+0.70)** |"


def test_peer_table_names_each_loss_of_every_ours_row():
    """Every ``ours*`` row lists the peers that beat it: on top-1 at any margin, on a cost by more than 5 %."""
    bench_peers = pytest.importorskip("bench_peers")

    def row(method, top1, seconds):
        return {"model": "m", "method": method, "status": "ok", "top1": top1, "calibration_s": seconds, "notes": []}

    rows = [row("ours", 98.0, 20.0), row("ours_tensorrt", 99.0, 10.0), row("pt2e", 98.5, 18.0)]
    bench_peers.annotate_losses(rows)
    bench_peers.annotate_losses(rows)  # idempotent: re-rendering a table does not repeat its notes
    assert rows[0]["notes"] == ["LOSS: pt2e top-1 +0.50", "LOSS: pt2e calibration 18.00 vs 20.00 s"]
    assert rows[1]["notes"] == [] and rows[2]["notes"] == []


def test_paired_comparison_counts_each_models_own_wins_and_tests_the_split():
    import numpy as np
    from paired_comparison import compare, decode_predictions, encode_predictions, mcnemar_p_value

    labels = np.zeros(100, dtype=np.int64)
    first, second = labels.copy(), labels.copy()
    first[:30] = 1  # 30 images only the second model gets right
    second[30:35] = 1  # 5 only the first
    paired = compare(first, second, labels)
    assert (paired.only_first, paired.only_second) == (5, 30) and paired.significant
    assert not compare(first[28:], second[28:], labels[28:]).significant  # 5 vs 2 images: chance does that
    # exact two-sided binomial tail: 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * 56 / 1024
    assert mcnemar_p_value(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_p_value(0, 0) == 1.0 and mcnemar_p_value(2000, 2000) == 1.0  # no float underflow past 1074
    assert 0 < mcnemar_p_value(900, 1100) < 1e-5
    wide = np.array([0, 300, 70000])
    assert (decode_predictions(encode_predictions(wide)) == wide).all()
    assert encode_predictions(np.array([3, 9]))["dtype"] == "uint8"
    with pytest.raises(ValueError, match="class indices"):
        encode_predictions(np.array([-1, 2]))
    with pytest.raises(ValueError, match="shape"):
        compare(first, second[:5], labels)


def test_peer_table_says_whether_a_top1_loss_is_more_than_noise():
    """With predictions and labels, a loss note names the images each side wins and whether the split is noise;
    every row gets its agreement with the float model's predictions."""
    import numpy as np

    bench_peers = pytest.importorskip("bench_peers")
    from paired_comparison import encode_predictions

    labels = np.zeros(1000, dtype=np.int64)
    float_pred, ours, close_peer, far_peer = (labels.copy() for _ in range(4))
    float_pred[:100] = 1
    ours[:110] = 1  # 890 right
    close_peer[:105] = 1  # 895 right: 5 images better
    far_peer[:60] = 1  # 940 right: 50 images better

    def row(method, predicted):
        top1 = 100.0 * float((predicted == labels).mean())
        return {"model": "m", "method": method, "status": "ok", "top1": top1, "notes": [],
                "predictions": encode_predictions(predicted)}  # fmt: skip

    rows = [row("float", float_pred), row("ours", ours), row("ort", close_peer), row("nncf", far_peer)]
    bench_peers.finish_rows(rows, {"m": {"labels": encode_predictions(labels)}})
    assert rows[1]["agree_float"] == pytest.approx(99.0) and rows[3]["agree_float"] == pytest.approx(96.0)
    assert rows[1]["notes"] == [
        "LOSS: ort top-1 +0.50 (5 vs 0 images, p=0.062: within noise)",
        "LOSS: nncf top-1 +5.00 (50 vs 0 images, p=1.8e-15)",
    ]
    assert "| 99.00 |" in bench_peers.table(rows).splitlines()[3]


def test_bias_correction_variants_float_inputs_correct_by_the_mean_float_input():
    """``float_inputs``: each bias moves by the weight error on the mean float input of the calibration images (the
    first layer's input is the same float data in both models, so the expected value is computed directly)."""
    import torch

    bench_bias_correction = pytest.importorskip("bench_bias_correction")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    data = [torch.randn(4, 3, 8, 8) + 0.5 for _ in range(3)]
    qmodel = bench_bias_correction.quantize_with_float_input_correction(
        model, data, "x86", min_standard_errors=None
    )  # fmt: skip
    first = qmodel.get_submodule("0")
    with torch.no_grad():
        delta = first.weight_fake_quant(first.weight) - first.weight
        expected = model[0].bias - torch.cat(
            [nn.functional.conv2d(x, delta, padding=1) for x in data]
        ).mean((0, 2, 3))  # fmt: skip
    assert torch.allclose(first.bias, expected, atol=1e-6)
    assert not torch.equal(first.bias, model[0].bias)  # 7-bit weights do move the mean
    gated = bench_bias_correction.quantize_with_float_input_correction(model, data, "x86", min_standard_errors=1e9)
    assert torch.equal(gated.get_submodule("0").bias, model[0].bias)  # no channel passes an impossible gate


def test_bias_correction_variants_limit_and_restore_the_corrected_layers():
    bench_bias_correction = pytest.importorskip("bench_bias_correction")
    walk = bench_bias_correction.bias_correction.weight_layers
    with pytest.raises(RuntimeError), bench_bias_correction.correcting_only(bench_bias_correction.is_depthwise):
        assert bench_bias_correction.bias_correction.weight_layers is not walk
        raise RuntimeError("a failing run")
    assert bench_bias_correction.bias_correction.weight_layers is walk
    assert bench_bias_correction.is_depthwise(nn.Conv2d(8, 8, 3, groups=8))
    assert not bench_bias_correction.is_depthwise(nn.Conv2d(8, 16, 3, groups=4))
    assert not bench_bias_correction.is_depthwise(nn.Linear(4, 4))
    with pytest.raises(SystemExit):
        bench_bias_correction.parse_args(["--variants", "fan_inX"])
    assert bench_bias_correction.parse_args(["--variants", "fan_in64"]).variants == ["fan_in64"]


def test_bench_qat_frozen_row_trains_the_deployed_convs():
    """``ours_frozen`` times QAT after the schedule's freezes: observers off, every conv+BN on running statistics,
    fake-quant still on (the row must not time a float model)."""
    import torch

    from lightning_quant.quantizers import iter_quantizers
    from lightning_quant.quantizers.modules import QuantConvBn

    bench_qat = pytest.importorskip("bench_qat")
    model = bench_qat.build("mobilenet_v2", "ours_frozen", torch.randn(2, 3, 32, 32))
    convbn = [m for m in model.modules() if isinstance(m, QuantConvBn)]
    assert model.training and convbn and all(m.bn_frozen.item() for m in convbn)
    quantizers = [fq for _, fq in iter_quantizers(model)]
    assert not any(fq.observer_enabled.item() for fq in quantizers)
    assert all(fq.fake_quant_enabled.item() and fq.calibrated.item() for fq in quantizers)


def test_bench_qat_interleaved_rows_take_their_own_float_step():
    bench_qat = pytest.importorskip("bench_qat")
    rows = [
        {"model": "m", "method": "float", "step_s": 1.0, "peak_mb": 100.0},
        {"model": "m", "method": "ours", "step_s": 1.5, "peak_mb": 120.0, "float_step_s": 1.25},
        {"model": "m", "method": "pt2e", "step_s": 3.0, "peak_mb": 150.0},
    ]
    lines = bench_qat.table(rows).splitlines()
    assert "| 1.20x |" in lines[3] and "float 1.250 s interleaved" in lines[3]
    assert "| 3.00x |" in lines[4]
