"""Activation range search: groups, the objective, the search against a short reference, plumbing and errors."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from lightning_quant import quantize
from lightning_quant.algorithms import search_activation_ranges
from lightning_quant.algorithms.range_search import activation_groups, first_rows, relative_output_error
from lightning_quant.callbacks import QuantCallback
from lightning_quant.config import QuantOptions, scheme_for_target
from lightning_quant.errors import NotCalibratedError
from lightning_quant.quantizers import prepare
from lightning_quant.quantizers.functional import qparams_from_range
from lightning_quant.quantizers.prepare import iter_quantizers, prepare_info, set_fake_quant

PCT = scheme_for_target("x86", activation_observer="percentile", activation_percentile=99.9)


class Residual(nn.Module):
    """Stem, one residual block (its branch output is signed), head: the structure of a ResNet in miniature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.branch(x)))


def _data(batches: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(batches)]
    data[0][0] *= 40.0  # one outlier image: rare large activations, as in ResNet50's residual branches
    return data


def _calibrated(scheme=PCT) -> nn.Module:
    """Calibrated only: the search's own effect, without the default bias correction."""
    return quantize(
        Residual().eval(), _data(), scheme=scheme, options=QuantOptions(bias_correction=False), progress=False
    )


@torch.no_grad()
def reference_objective(qmodel: nn.Module, data: list[torch.Tensor]) -> float:
    """The search's objective written out in numpy: mean over samples of ||y_q - y||^2 / ||y||^2."""
    set_fake_quant(qmodel, False)
    ref = np.concatenate([qmodel(x).numpy() for x in data])
    set_fake_quant(qmodel, True)
    out = np.concatenate([qmodel(x).numpy() for x in data])
    return float(np.mean(((out - ref) ** 2).sum(1) / (ref**2).sum(1)))


@torch.no_grad()
def _reference_search(qmodel: nn.Module, data: list[torch.Tensor], candidates: list[float]) -> tuple[dict, float]:
    """Coordinate descent written out: quantizers grouped by name, ranges from each histogram, numpy objective."""
    quantizers = dict(iter_quantizers(qmodel))
    groups = {"signed": [], "residual_sum": [], "non_negative": []}
    for name, fq in quantizers.items():
        if "weight" in name or name.endswith((".x", ".head_2")):  # weights, the input, the output
            continue
        if name.endswith(".relu"):  # torch.relu(x + branch(x))
            groups["residual_sum"].append(fq)
        else:
            groups["signed" if fq.observer.min_val.item() < 0 else "non_negative"].append(fq)

    def set_range(fqs, p):
        for fq in fqs:
            obs = copy.copy(fq.observer)
            obs.spec = dataclasses.replace(fq.spec, percentile=p)
            scale, zp = qparams_from_range(*obs.clipped_range(), fq.spec)
            fq.scale.copy_(scale), fq.zero_point.copy_(zp)

    def objective():
        return reference_objective(qmodel, data)

    best, chosen = objective(), {}
    for group, fqs in groups.items():
        keep, tried = 99.9, [99.9]
        for p in [c for c in candidates if c != keep]:
            set_range(fqs, p)
            tried.append(p)
            err = objective()
            if err < best:
                best, keep = err, p
        grid = sorted(tried)
        at = grid.index(keep)
        neighbours = [grid[j] for j in (at - 1, at + 1) if 0 <= j < len(grid)]
        for n in neighbours:  # halfway in the clipped share: sqrt((100 - n) * (100 - keep)) clipped
            p = round(100 - float(np.sqrt((100 - n) * (100 - keep))) if n < 100 and keep < 100 else (n + keep) / 2, 4)
            set_range(fqs, p)
            err = objective()
            if err < best:
                best, keep = err, p
        set_range(fqs, keep)
        chosen[group] = keep
    return chosen, best


def test_groups_split_branch_outputs_sums_and_relu_outputs_and_leave_inputs_and_outputs():
    groups = {g: [n for n, _ in m] for g, m in activation_groups(_calibrated()).items()}
    assert list(groups) == ["signed", "residual_sum", "non_negative"]  # the search order
    assert groups["signed"] == ["activation_quantizers.branch_2"]  # the residual branch output, before the add
    assert groups["residual_sum"] == ["activation_quantizers.relu"]  # relu(x + branch(x))
    assert sorted(groups["non_negative"]) == [  # after a ReLU (head_0: the pooled ReLU output)
        "activation_quantizers.branch_1", "activation_quantizers.head_0", "activation_quantizers.stem_1",
    ]  # fmt: skip
    every = {n for n, _ in iter_quantizers(_calibrated()) if n.startswith("activation_quantizers.")}
    assert every - set(sum(groups.values(), [])) == {"activation_quantizers.x", "activation_quantizers.head_2"}


def test_search_matches_the_reference_coordinate_descent():
    candidates = [98.0, 99.0, 99.5, 99.9, 99.99, 100.0]
    data = _data()
    qmodel = _calibrated()
    reference = copy.deepcopy(qmodel)
    report = search_activation_ranges(qmodel, data, candidates=candidates, progress=False)
    chosen, best = _reference_search(reference, data, candidates)
    assert report.chosen == chosen
    assert report.final_error == pytest.approx(best, rel=1e-6)
    assert report.final_error <= report.start_error
    assert len(report.trials) in range(3 * len(candidates), 3 * (len(candidates) + 1) + 1)  # + 1 or 2 halfway
    for (_, a), (_, b) in zip(iter_quantizers(qmodel), iter_quantizers(reference), strict=True):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_max_samples_bounds_the_rows_the_objective_sees():
    """The ranking uses the first max_samples rows (the last batch cut); the ranges still come from every image."""
    candidates = [99.0, 99.9, 100.0]
    data = _data()  # 3 batches of 8
    qmodel, reference = _calibrated(), _calibrated()
    report = search_activation_ranges(qmodel, data, candidates=candidates, max_samples=12, progress=False)
    assert (report.batches, report.samples) == (2, 12) and "on 12 samples" in str(report)
    chosen, best = _reference_search(reference, [data[0], data[1][:4]], candidates)
    assert report.chosen == chosen and report.final_error == pytest.approx(best, rel=1e-6)
    everything = search_activation_ranges(_calibrated(), data, candidates=candidates, max_samples=None, progress=False)
    assert (everything.batches, everything.samples) == (3, 24)


def test_first_rows_cuts_every_batch_tensor_of_structured_inputs():
    batch = {"image": torch.zeros(5, 3), "mask": torch.ones(5, 2), "table": torch.ones(7)}
    (cut,) = first_rows([batch, batch], 3)
    assert {k: tuple(v.shape) for k, v in cut.items()} == {"image": (3, 3), "mask": (3, 2), "table": (7,)}
    assert len(first_rows([batch, batch], 6)) == 2 and first_rows([batch], None) == [batch]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_samples_is_refused(bad):
    with pytest.raises(ValueError, match="max_samples"):
        search_activation_ranges(_calibrated(), _data(), max_samples=bad, progress=False)


def test_search_result_is_the_measured_state_and_survives_a_qparams_refresh():
    data = _data()
    qmodel = _calibrated()
    report = search_activation_ranges(qmodel, data, candidates=[99.0, 100.0], progress=False)
    with torch.no_grad():
        set_fake_quant(qmodel, False)
        ref = [qmodel(x) for x in data]
        set_fake_quant(qmodel, True)
        assert relative_output_error(ref, [qmodel(x) for x in data]) == pytest.approx(report.final_error, rel=1e-9)
    scales = {n: fq.scale.clone() for n, fq in iter_quantizers(qmodel)}
    for _, fq in iter_quantizers(qmodel):
        fq.refresh_qparams()  # e.g. a later distributed sync: recomputed from the histograms, same choice
    assert all(torch.equal(fq.scale, scales[n]) for n, fq in iter_quantizers(qmodel))
    assert all(fq.fake_quant_enabled.item() and not fq.observer_enabled.item() for _, fq in iter_quantizers(qmodel))
    assert prepare_info(qmodel).range_search is report


def test_outlier_branch_gets_more_clipping_than_relu_outputs():
    report = search_activation_ranges(_calibrated(), _data(), progress=False)
    assert report.chosen["signed"] < 99.9  # the outlier image's branch values are clipped harder
    assert report.chosen["non_negative"] > report.chosen["signed"] and report.final_error < report.start_error
    assert "signed (1 quantizers)" in str(report)


def test_search_is_deterministic():
    a = search_activation_ranges(_calibrated(), _data(), progress=False)
    b = search_activation_ranges(_calibrated(), _data(), progress=False)
    assert a.to_dict() == b.to_dict()


def test_relative_output_error_weighs_every_sample_the_same():
    ref = [torch.tensor([[1.0, 0.0], [100.0, 0.0]])]
    out = [torch.tensor([[1.1, 0.0], [110.0, 0.0]])]  # 10 % off on both, whatever the scale
    assert relative_output_error(ref, out) == pytest.approx(0.01)


def test_quantize_and_callback_run_it_and_record_it():
    search = QuantOptions(range_search=True)
    qmodel = quantize(Residual().eval(), _data(), scheme=PCT, options=search, progress=False)
    assert prepare_info(qmodel).refinements == ["range_search", "bias_correction"]  # the default follows the search
    assert prepare_info(qmodel).range_search.chosen.keys() == {"signed", "residual_sum", "non_negative"}
    callback = QuantCallback("ptq", scheme=PCT, options=search)
    assert callback.state_dict()["options"]["range_search"] is True
    with pytest.raises(ValueError, match="range_search refine a PTQ calibration; QAT trains the weights itself"):
        QuantCallback("qat", options=search)
    assert QuantCallback("qat").options.refinements == ()  # the per-run default: nothing to refuse


def test_other_estimators_are_refused_with_the_fix():
    qmodel = _calibrated(scheme_for_target("x86", activation_observer="mse"))
    with pytest.raises(ValueError, match="uses 'mse' with float scales; calibrate with activation_observer='perc"):
        search_activation_ranges(qmodel, _data(), progress=False)


def test_bad_candidates_and_uncalibrated_models_are_refused():
    with pytest.raises(ValueError, match=r"candidate percentile 40\.0 must be in \(50, 100\]"):
        search_activation_ranges(_calibrated(), _data(), candidates=[99.0, 40.0], progress=False)
    with pytest.raises(NotCalibratedError):
        search_activation_ranges(prepare(Residual().eval(), PCT), _data(), progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        search_activation_ranges(_calibrated(), [], progress=False)


def test_groups_on_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()  # out += identity; out = self.relu(out)
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    groups = activation_groups(quantize(model, data, scheme=PCT, progress=False))
    names = {g: sorted(n.rsplit(".", 1)[-1] for n, _ in m) for g, m in groups.items()}
    assert len(names["residual_sum"]) == 8 and all(n.endswith("relu_1") for n in names["residual_sum"])
    assert len(names["signed"]) == 11  # 8 conv2 + 3 downsample outputs: what each add sums
    assert all(n.endswith(("conv2", "downsample_0")) for n in names["signed"])
