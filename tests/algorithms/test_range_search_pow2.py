"""Activation range search on power-of-two (DPU) scales: one fix position shift per group, against a short reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lightning_quant import export_xmodel, quantize
from lightning_quant.algorithms import search_activation_ranges
from lightning_quant.algorithms.range_search import _FixPosKnob, activation_groups, relative_output_error
from lightning_quant.app.report_step import range_search_line
from lightning_quant.config import QuantOptions
from lightning_quant.quantizers.dpu import fix_pos_from_scale
from lightning_quant.quantizers.dpu_shifts import check_dpu_shifts
from lightning_quant.quantizers.prepare import iter_quantizers, prepare_info, set_fake_quant
from tests.algorithms.test_range_search import PCT, Residual, _data, reference_objective


def _dpu() -> torch.nn.Module:
    return quantize(Residual().eval(), _data(), target="dpu", progress=False)


def _positions(qmodel) -> dict[str, int]:
    return {n: fix_pos_from_scale(fq.scale) for n, fq in iter_quantizers(qmodel) if "weight" not in n}


@torch.no_grad()
def _reference_search(qmodel, data, offsets) -> tuple[dict, float]:
    """Coordinate descent over shifts written out: groups by name, positions set by hand, numpy objective."""
    groups = {"signed": ["branch_2"], "residual_sum": ["relu"], "non_negative": ["branch_1", "head_0", "stem_1"]}
    quantizers = {n.rsplit(".", 1)[-1]: fq for n, fq in iter_quantizers(qmodel) if n.startswith("activation_")}
    base = {n: fix_pos_from_scale(fq.scale) for n, fq in quantizers.items()}

    def shift(names, offset):
        for n in names:
            quantizers[n].scale.fill_(2.0 ** -(base[n] + offset))

    def objective():
        return reference_objective(qmodel, data)

    best, chosen = objective(), {}
    for group, names in groups.items():
        keep, tried = 0, [0]
        todo = list(offsets)
        while todo:
            offset = todo.pop(0)
            shift(names, offset)
            tried.append(offset)
            err = objective()
            if err < best:
                best, keep = err, offset
            if not todo and keep == max(tried) > 0 and keep + 1 not in tried:  # one step further, once
                todo = [keep + 1] if len(tried) == len(offsets) + 1 else []
            elif not todo and keep == min(tried) < 0 and keep - 1 not in tried:
                todo = [keep - 1] if len(tried) == len(offsets) + 1 else []
        shift(names, keep)
        chosen[group] = keep
    return chosen, best


def test_dpu_activations_are_grouped_and_searched_by_fix_position_shift():
    qmodel = _dpu()
    groups = {g: sorted(n.rsplit(".", 1)[-1] for n, _ in m) for g, m in activation_groups(qmodel).items()}
    assert groups == {
        "signed": ["branch_2"], "residual_sum": ["relu"], "non_negative": ["branch_1", "head_0", "stem_1"],
    }  # fmt: skip
    before = _positions(qmodel)
    report = search_activation_ranges(qmodel, _data(), progress=False)
    assert report.parameter == "fix_pos_offset" and "fix position shifts" in str(report)
    assert set(report.chosen) == set(groups) and all(isinstance(v, int) for v in report.chosen.values())
    after = _positions(qmodel)
    for group, members in report.groups.items():
        for name in members:  # every member moved by its group's shift; scales stay powers of two
            assert after[name] == before[name] + report.chosen[group]
    untouched = set(before) - {n for m in report.groups.values() for n in m}
    assert untouched and all(after[n] == before[n] for n in untouched)  # model input/output, biases
    assert report.final_error <= report.start_error


def test_shift_search_matches_the_reference_coordinate_descent():
    data = _data()
    qmodel = _dpu()
    reference = copy.deepcopy(qmodel)
    report = search_activation_ranges(qmodel, data, fix_pos_offsets=(-1, 1, 2), progress=False)
    chosen, best = _reference_search(reference, data, [-1, 1, 2])
    assert report.chosen == chosen
    assert report.final_error == pytest.approx(best, rel=1e-6)
    for (_, a), (_, b) in zip(iter_quantizers(qmodel), iter_quantizers(reference), strict=True):
        assert torch.equal(a.scale, b.scale)


def test_the_kept_state_is_the_measured_one():
    data = _data()
    qmodel = _dpu()
    report = search_activation_ranges(qmodel, data, progress=False)
    with torch.no_grad():
        set_fake_quant(qmodel, False)
        ref = [qmodel(x) for x in data]
        set_fake_quant(qmodel, True)
        assert relative_output_error(ref, [qmodel(x) for x in data]) == pytest.approx(report.final_error, rel=1e-9)


def test_more_steps_past_the_edge_of_the_grid_only_when_the_edge_wins():
    assert _FixPosKnob.more([-1, 0, 1, 2], 2) == [3]
    assert _FixPosKnob.more([-1, 0, 1, 2], -1) == [-2]
    assert _FixPosKnob.more([-1, 0, 1, 2], 1) == [] and _FixPosKnob.more([0, 1], 0) == []


def test_a_huge_outlier_branch_is_clipped_by_a_positive_shift():
    """An image 1000x the others drives the branch's squared-error position coarse; shifting it back helps the rest."""
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(16, 3, 10, 10, generator=g) for _ in range(2)]
    data[0][0] *= 1000.0
    qmodel = quantize(Residual().eval(), data, target="dpu", progress=False)
    report = search_activation_ranges(qmodel, data, fix_pos_offsets=(1, 2), progress=False)
    assert report.final_error < report.start_error
    assert max(report.chosen.values()) > 0  # some group clips more than its calibrated position


def test_quantize_runs_it_before_the_shift_constraints_and_the_xmodel_carries_it(tmp_path):
    qmodel = quantize(Residual().eval(), _data(), target="dpu", options=QuantOptions(range_search=True), progress=False)
    info = prepare_info(qmodel)
    assert info.refinements[:2] == ["range_search", "dpu_shifts"] and info.range_search.parameter == "fix_pos_offset"
    assert check_dpu_shifts(qmodel) == []
    export_xmodel(qmodel, tmp_path / "m.xmodel", _data()[0][:1])
    quant_info = json.loads((tmp_path / "m.quant_info.json").read_text())
    assert "m.xmodel" in {p.name for p in tmp_path.iterdir()} and quant_info


def test_search_is_deterministic_on_dpu_models():
    a = search_activation_ranges(_dpu(), _data(), progress=False)
    b = search_activation_ranges(_dpu(), _data(), progress=False)
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("bad", [[], [1.5], [True], [9], [-9]])
def test_bad_shifts_are_refused(bad):
    with pytest.raises(ValueError, match="fix position shift"):
        search_activation_ranges(_dpu(), _data(), fix_pos_offsets=bad, progress=False)


def test_empty_percentile_candidates_are_refused():
    with pytest.raises(ValueError, match="at least one candidate percentile"):
        search_activation_ranges(quantize(Residual().eval(), _data(), scheme=PCT, progress=False), _data(),
                                 candidates=[], progress=False)  # fmt: skip


def test_mixed_percentile_and_power_of_two_activations_are_refused():
    qmodel = quantize(Residual().eval(), _data(), scheme=PCT, progress=False)
    dpu = _dpu()
    donor = dict(iter_quantizers(dpu))["activation_quantizers.branch_2"]
    qmodel.activation_quantizers.branch_2 = donor  # one power-of-two quantizer among percentile ones
    with pytest.raises(ValueError, match="both percentile-estimated and power-of-two"):
        activation_groups(qmodel)


def test_report_line_names_the_shift():
    line = range_search_line({"signed": 1, "residual_sum": 0}, "fix_pos_offset")
    assert "fix position shift +1 for signed, +0 for residual_sum" in line
    assert "clipping percentile 99.9 for signed" in range_search_line({"signed": 99.9})


def test_dpu_with_percentile_ranges_searches_percentiles_and_stays_deployable(tmp_path):
    """The DPU scheme calibrated with the percentile estimator: the search tunes percentiles, scales stay powers of
    two (rounded up from the clipped range), the shift constraints hold and the XModel writes."""
    from lightning_quant.config import scheme_for_target

    scheme = scheme_for_target("dpu", activation_observer="percentile", activation_percentile=99.9)
    search = QuantOptions(range_search=True)
    qmodel = quantize(Residual().eval(), _data(), scheme=scheme, target="dpu", options=search, progress=False)
    report = prepare_info(qmodel).range_search
    assert report.parameter == "percentile" and set(report.chosen) == {"signed", "residual_sum", "non_negative"}
    assert all(isinstance(p, int) for p in _positions(qmodel).values())  # fix_pos_from_scale accepts every scale
    assert check_dpu_shifts(qmodel) == []
    export_xmodel(qmodel, tmp_path / "m.xmodel", _data()[0][:1])
    assert (tmp_path / "m.quant_info.json").is_file()
