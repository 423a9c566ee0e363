"""sensitivity_analysis: ranks a deliberately damaged quantizer first, restores the model, metric and plot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import quantize, scheme_for_target
from lightning_quant.algorithms import sensitivity_analysis
from lightning_quant.errors import NotCalibratedError
from lightning_quant.quantizers import iter_quantizers, prepare
from tests.helpers.models import TinyConvBN, warm_bn


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.fixture()
def qmodel() -> nn.Module:
    torch.manual_seed(0)
    return quantize(warm_bn(TinyConvBN()), batches(), progress=False)


def test_damaged_quantizer_ranks_first_and_keeping_it_float_recovers(qmodel):
    names = [n for n, _ in iter_quantizers(qmodel)]
    victim = next(n for n in names if n.endswith("conv2.weight_fake_quant"))
    fq = dict(iter_quantizers(qmodel))[victim]
    fq.scale.mul_(40.0)  # 40x coarser weights: most codes collapse to 0
    report = sensitivity_analysis(qmodel, batches(), progress=False)
    assert report.rows[0].name == victim and report.rows[0].kind == "weight"
    assert sorted(r.name for r in report.rows) == sorted(names)
    assert report.rows[0].without_sqnr_db > report.all_on_sqnr_db + 10  # float there recovers most of the error
    assert [r.alone_sqnr_db for r in report.rows] == sorted(r.alone_sqnr_db for r in report.rows)


def test_model_is_left_as_it_was(qmodel):
    x = batches(1)[0]
    with torch.no_grad():
        before = qmodel(x)
    flags = [(fq.fake_quant_enabled.item(), fq.observer_enabled.item()) for _, fq in iter_quantizers(qmodel)]
    sensitivity_analysis(qmodel, batches(), progress=False)
    assert flags == [(fq.fake_quant_enabled.item(), fq.observer_enabled.item()) for _, fq in iter_quantizers(qmodel)]
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)


def test_metric_is_evaluated_for_the_most_sensitive_only(qmodel, tmp_path):
    x = torch.cat(batches())
    with torch.no_grad():
        labels = qmodel(x).argmax(1)  # the quantized model's own predictions: its metric is 1.0 by construction
    calls = []

    def agreement(model: nn.Module) -> float:
        calls.append(1)
        with torch.no_grad():
            return (model(x).argmax(1) == labels).float().mean().item()

    report = sensitivity_analysis(qmodel, batches(), metric_fn=agreement, metric_top=2, progress=False)
    assert report.metric_all_on == 1.0 and report.metric_float is not None
    assert [k.kind for k in report.kinds] == ["weight", "activation"]  # x86: float biases
    assert len(calls) == 2 + 2 + 2 * 2  # float, all on, the two most sensitive, each kind alone and without
    assert all(k.metric_alone is not None and k.metric_without is not None for k in report.kinds)
    assert [r.metric_without is not None for r in report.rows] == [True, True] + [False] * (len(report.rows) - 2)
    table = report.to_table()
    assert "| quantizer | kind |" in table and report.rows[0].name in table and "| weight | " in table
    png = report.plot(tmp_path / "sensitivity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.to_dict()["rows"][0]["name"] == report.rows[0].name


def test_kinds_show_which_part_of_a_scheme_costs_the_most():
    """On the DPU target (weights, activations and biases quantized) a damaged kind stands out as a whole."""
    torch.manual_seed(0)
    q = quantize(warm_bn(TinyConvBN()), batches(), target="dpu", progress=False)
    report = sensitivity_analysis(q, batches(), progress=False)
    assert [k.kind for k in report.kinds] == ["weight", "activation", "bias"]
    assert [k.count for k in report.kinds] == [sum(r.kind == k.kind for r in report.rows) for k in report.kinds]
    assert report.kinds[2].alone_sqnr_db > min(k.alone_sqnr_db for k in report.kinds)  # not the worst yet
    for _, fq in iter_quantizers(q):
        if fq.name.endswith(".bias"):
            fq.scale.data.fill_(2.0**6)  # every bias rounds to 0
    damaged = sensitivity_analysis(q, batches(), progress=False)
    by_kind = {k.kind: k for k in damaged.kinds}
    assert by_kind["bias"].alone_sqnr_db == min(k.alone_sqnr_db for k in damaged.kinds)
    assert by_kind["bias"].without_sqnr_db == max(k.without_sqnr_db for k in damaged.kinds)
    assert damaged.to_dict()["kinds"][2]["kind"] == "bias"


def test_clear_errors():
    prepared = prepare(warm_bn(TinyConvBN()), scheme_for_target("x86"))
    with pytest.raises(NotCalibratedError, match="calibrate the model first"):
        sensitivity_analysis(prepared, batches(), progress=False)
    with pytest.raises(ValueError, match="holds no quantizer"):
        sensitivity_analysis(nn.Linear(2, 2), [torch.randn(1, 2)], progress=False)
    qmodel = quantize(warm_bn(TinyConvBN()), batches(), progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        sensitivity_analysis(qmodel, batches(), num_batches=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        sensitivity_analysis(qmodel, [], progress=False)


def test_histograms_are_written_with_each_clip_range_and_bad_names_refused(qmodel, tmp_path, monkeypatch):
    from lightning_quant.algorithms import plot_quantizer_histograms
    from lightning_quant.algorithms import sensitivity as module

    names = [name for name, _ in iter_quantizers(qmodel)][:2]
    seen = {}
    original = module._clip_range

    def spy(fq):
        seen[fq.name or len(seen)] = original(fq)
        return original(fq)

    monkeypatch.setattr(module, "_clip_range", spy)
    path = plot_quantizer_histograms(qmodel, batches(), tmp_path / "h" / "hist.png", names, num_batches=2)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(seen) == 2 and all(low < high for low, high in seen.values())
    with pytest.raises(ValueError, match=r"unknown quantizer\(s\) \['nope'\] \(known: "):
        plot_quantizer_histograms(qmodel, batches(), tmp_path / "x.png", ["nope"])
    with pytest.raises(ValueError, match=r"unknown quantizer\(s\) \[\]"):
        plot_quantizer_histograms(qmodel, batches(), tmp_path / "x.png", [])


def test_clip_range_of_a_per_channel_weight_is_the_widest_channel(qmodel):
    from lightning_quant.algorithms.sensitivity import _clip_range

    fq = next(fq for name, fq in iter_quantizers(qmodel) if name.endswith("weight_fake_quant"))
    low, high = _clip_range(fq)
    qmin, qmax = fq.spec.quant_range()
    assert high == pytest.approx(float(fq.scale.max()) * qmax) and low == pytest.approx(float(fq.scale.max()) * qmin)
