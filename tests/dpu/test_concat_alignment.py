"""Vitis AI's concat rule on the DPU target: a concat's inputs read by it alone share its output's fix position."""

from __future__ import annotations

import statistics
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2, resnet50

from lightning_quant import export_xmodel, quantize
from lightning_quant.config import QuantSpec, scheme_for_target
from lightning_quant.export.xmodel_interpreter import load_xmodel, run_xmodel
from lightning_quant.models.cifar_resnet import cifar_resnet
from lightning_quant.quantizers import prepare
from lightning_quant.quantizers.dpu import best_fix_pos, fix_pos_from_scale
from lightning_quant.quantizers.dpu_concat import align_concat_positions, check_concat_alignment, concat_groups
from lightning_quant.quantizers.dpu_shifts import check_dpu_shifts, enforce_dpu_shifts
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.prepare import convert, set_fake_quant, set_observers

SHAPE = (3, 12, 12)


def _batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, *SHAPE, generator=g) for _ in range(n)]


class Inception(nn.Module):
    """Four branches with ranges about 1000x apart (one through a max pool), concatenated, then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b3, self.b5 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 5, padding=2)
        self.pool, self.bp = nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1)
        self.head, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)
        with torch.no_grad():
            for conv, gain in ((self.b1, 0.02), (self.b5, 20.0)):
                conv.weight.mul_(gain)
                conv.bias.mul_(gain)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.stem(x))
        return [F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.b5(x)), F.relu(self.bp(self.pool(x)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.head(torch.cat(self.branches(x), dim=1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class DenseBlock(nn.Module):
    """DenseNet-style: every concat also feeds the next layer, so its first input is read twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem, self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.out = nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            self.c1.weight.mul_(20.0)
            self.c2.weight.mul_(30.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.relu(self.stem(x))
        x1 = torch.cat([x0, F.relu(self.c1(x0))], 1)
        x2 = torch.cat([x1, F.relu(self.c2(x1))], 1)
        return self.out(x2)


class Odd(nn.Module):
    """A concat of a tensor with itself, nested concats, concats inside a residual add, an input read through a
    dropout, and max pools whose outputs reuse the quantizers of their inputs, which are read elsewhere too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.b, self.c, self.d = nn.Conv2d(8, 2, 3, padding=1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 4, 1)
        self.e, self.drop = nn.Conv2d(8, 4, 1, stride=2), nn.Dropout(0.1)
        self.head, self.fc = nn.Conv2d(20, 4, 1), nn.Linear(4, 3)
        with torch.no_grad():
            self.c.weight.mul_(10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        same = F.relu(self.a(s))
        doubled = torch.cat([same, same], 1)
        nested = torch.cat([torch.cat([self.b(s), self.c(s)], 1), F.relu(self.d(s))], 1)
        r = s + nested + doubled
        y = torch.cat([F.max_pool2d(s, 2), F.max_pool2d(r, 2), self.drop(F.relu(self.e(s)))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.head(y)), 1), 1))


@pytest.fixture(scope="module")
def inception():
    model = Inception().eval()
    data = _batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = quantize(model, data, target="dpu", progress=False)
    assert not [w for w in caught if "DPU shift constraints moved" in str(w.message)]  # the rule alone decides here
    return model, data, qmodel


def _pos(model: nn.Module, name: str) -> int:
    return fix_pos_from_scale(model.get_submodule(name).scale)


def _own(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).observer.fix_pos()


def _exported_equals_fake_quant(qmodel: nn.Module, tmp_path, name: str = "m") -> object:
    x = torch.cat([torch.randn(3, *SHAPE), 4 * torch.rand(2, *SHAPE) - 2])
    path = export_xmodel(qmodel, tmp_path / f"{name}.xmodel", x[:1])
    (out,) = run_xmodel(path, x.numpy())
    with torch.no_grad():
        expected = qmodel(x).numpy()
    assert np.array_equal(out, expected), f"max diff {np.abs(out - expected).max()}"
    return load_xmodel(path)


def test_inception_concat_takes_the_output_position_by_vitis_rule(inception):
    model, data, qmodel = inception
    [group] = concat_groups(qmodel)
    assert group.concats == ("cat",) and group.kept == ()
    assert group.members == tuple(f"activation_quantizers.relu_{i}" for i in (1, 2, 3, 4))
    # the rule: the concat output's position, chosen on the float concat output (per batch the least squared
    # error position, over batches the most frequent one, the lower on a tie), as vai_q_pytorch calibrates it
    with torch.no_grad():
        per_batch = [best_fix_pos(torch.cat(model.branches(x), 1)) for x in data]
    rule = min(statistics.multimode(per_batch))
    assert {_pos(qmodel, q) for q in (group.leader, *group.members)} == {rule}
    own = [_own(qmodel, q) for q in group.members]
    assert max(own) - min(own) >= 6 and any(p != rule for p in own)  # the branches alone would differ widely
    assert check_concat_alignment(qmodel) == [] and check_dpu_shifts(qmodel) == []


def test_inception_xmodel_fixes_concat_inputs_at_the_shared_position(inception, tmp_path):
    _, _, qmodel = inception
    graph = _exported_equals_fake_quant(qmodel, tmp_path)
    ops = {op.name: op for op in graph.op_node}
    [concat] = [op for op in graph.op_node if op.type == "concat"]
    inputs = [ops[name] for arg in concat.args for name in arg.ops]
    assert len(inputs) == 4 and {op.type for op in inputs} == {"fix"}
    assert {op.attr["fix_point"].int32_value for op in inputs} == {_pos(qmodel, "activation_quantizers.cat")}


def test_densenet_inputs_read_elsewhere_keep_their_position(tmp_path):
    qmodel = quantize(DenseBlock().eval(), _batches(), target="dpu", progress=False)
    first, second = concat_groups(qmodel)
    assert (first.leader, first.members, first.kept) == (
        "activation_quantizers.cat",
        ("activation_quantizers.relu_1",),
        ("activation_quantizers.relu",),  # x0 also feeds c1: vai_q_pytorch keeps its own position
    )
    assert (second.leader, second.members, second.kept) == (
        "activation_quantizers.cat_1",
        ("activation_quantizers.relu_2",),
        ("activation_quantizers.cat",),  # x1 also feeds c2
    )
    for group in (first, second):
        assert _pos(qmodel, group.members[0]) == _pos(qmodel, group.leader)
        assert [_pos(qmodel, k) for k in group.kept] == [_own(qmodel, k) for k in group.kept]
    assert _pos(qmodel, "activation_quantizers.relu") != _pos(qmodel, "activation_quantizers.cat")  # re-fixed
    assert check_concat_alignment(qmodel) == [] and check_dpu_shifts(qmodel) == []
    _exported_equals_fake_quant(qmodel, tmp_path)


def test_self_concat_nested_concat_and_concat_in_a_residual(tmp_path):
    qmodel = quantize(Odd().eval(), _batches(), target="dpu", progress=False)
    q = "activation_quantizers."
    assert [(g.concats, g.leader, g.members, g.kept) for g in concat_groups(qmodel)] == [
        (("cat",), q + "cat", (q + "relu_1",), ()),  # cat([same, same]): one input, read by the concat only
        (("cat_1", "cat_2"), q + "cat_2", (q + "b", q + "c", q + "cat_1", q + "relu_2"), ()),  # nested: one group
        # max pools reuse the quantizers of s and of the residual sum, read elsewhere too; e's output via dropout
        (("cat_3",), q + "cat_3", (q + "relu_3",), (q + "relu", q + "add_1")),
    ]
    for group in concat_groups(qmodel):
        assert {_pos(qmodel, m) for m in (group.leader, *group.members)} == {_pos(qmodel, group.leader)}
    assert check_concat_alignment(qmodel) == [] and check_dpu_shifts(qmodel) == []
    _exported_equals_fake_quant(qmodel, tmp_path)


def test_shift_enforcement_moves_a_concat_group_as_one(inception):
    _, _, qmodel = inception
    qmodel = convert(qmodel)
    group = concat_groups(qmodel)[0]
    before = _pos(qmodel, group.leader)
    fp_in = _pos(qmodel, "activation_quantizers.relu")
    qmodel.get_submodule("b3").weight_fake_quant.scale.fill_(2.0 ** -(before - fp_in - 2))  # fp_w + fp_in < fp_out
    assert any("shift_cut" in v and "outside [0, 16]" in v for v in check_dpu_shifts(qmodel))
    moved = enforce_dpu_shifts(qmodel)
    assert {a.quantizer for a in moved} >= {group.leader, *group.members}
    assert any("shared through a concat with activation_quantizers.relu_2" in a.reason for a in moved)
    assert check_dpu_shifts(qmodel) == [] and check_concat_alignment(qmodel) == []
    assert _pos(qmodel, group.leader) < before


def test_align_reports_moves_and_export_aligns_its_copy(inception, tmp_path):
    _, _, qmodel = inception
    qmodel = convert(qmodel)
    member = qmodel.get_submodule("activation_quantizers.relu_1")
    member.follow(None)  # as a model quantized before the rule: its own position
    member.scale.fill_(2.0**-9)
    assert check_concat_alignment(qmodel)[0].startswith("activation_quantizers.relu_1: fix position 9 differs")
    with pytest.warns(UserWarning, match="export_xmodel moved 1 fix position.*align concat inputs"):
        _exported_equals_fake_quant(convert(qmodel), tmp_path)
    [move] = align_concat_positions(qmodel)
    assert (move.quantizer, move.leader, move.old_fix_pos) == (
        "activation_quantizers.relu_1",
        "activation_quantizers.cat",
        9,
    )
    assert move.new_fix_pos == _pos(qmodel, "activation_quantizers.cat") and align_concat_positions(qmodel) == []
    assert member.leader is qmodel.get_submodule("activation_quantizers.cat")
    copy = convert(qmodel)  # the links survive a deep copy, pointing into the copy
    assert copy.get_submodule("activation_quantizers.relu_1").leader is copy.get_submodule("activation_quantizers.cat")


def test_qat_keeps_concat_inputs_at_the_output_position(tmp_path):
    # Vitis-style positions per batch (the QAT default averages ranges slowly): a position can move in a few steps
    scheme = scheme_for_target("dpu", mode="qat", activation_observer="dpu_pot")
    qmodel = prepare(Inception(), scheme, mode="qat")
    set_observers(qmodel, True)
    set_fake_quant(qmodel, True)
    qmodel.train()
    [group] = concat_groups(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    seen = []
    for step, x in enumerate(_batches(n=4, seed=3)):
        qmodel(x * 4**step).sum().backward()  # the ranges grow: the concat's position must be free to follow
        optimizer.step()
        seen.append(_pos(qmodel, group.leader))
        assert check_concat_alignment(qmodel) == []
    assert seen == sorted(seen, reverse=True) and seen[-1] < seen[0]
    assert {_own(qmodel, m) for m in group.members} != {seen[-1]}  # the members alone would sit elsewhere
    set_observers(qmodel, False)  # frozen, as QuantCallback does: the members fix their values at the shared position
    qmodel.eval()
    member = qmodel.get_submodule(group.members[0])
    out = member(torch.linspace(-1, 1, 11))
    assert torch.equal(out * 2.0 ** seen[-1], (out * 2.0 ** seen[-1]).round())
    _exported_equals_fake_quant(qmodel, tmp_path)


def test_follow_rejects_what_cannot_share_a_scale():
    spec = scheme_for_target("dpu").activation
    a, b, c = (FakeQuantize(spec, name=n) for n in "abc")
    with pytest.raises(ValueError, match="'a' cannot follow 'a': it is this quantizer"):
        a.follow(a)
    b.follow(a)
    with pytest.raises(ValueError, match="'c' cannot follow 'b': chains are not supported"):
        c.follow(b)
    with pytest.raises(ValueError, match="'a' cannot follow 'c': chains are not supported"):
        a.follow(c)  # a has a follower itself
    with pytest.raises(ValueError, match="the specs differ in bits, signed"):
        FakeQuantize(QuantSpec(bits=4, signed=False, scale_type="power_of_two"), name="d").follow(c)
    with pytest.raises(ValueError, match="a learnable"):
        FakeQuantize(QuantSpec(learnable=True), name="e").follow(FakeQuantize(QuantSpec(), name="f"))
    b.follow(None)
    assert b.leader is None
    c.follow(a)  # c had no follower, and follows the first quantizer now
    a.follow(None)  # a follows nothing: nothing to undo
    with pytest.raises(ValueError, match="'a' cannot follow 'b': chains are not supported"):
        a.follow(b)  # c follows a


@pytest.mark.parametrize(
    "build",
    [
        lambda: cifar_resnet(20, pretrained=False),
        lambda: mobilenet_v2(num_classes=10),
        lambda: resnet50(num_classes=10),
    ],
    ids=["resnet20", "mobilenet_v2", "resnet50"],
)
def test_the_offline_dpu_recipe_models_have_no_concat(build):
    """So the concat rule cannot move their accuracy (docs/dpu.md)."""
    qmodel = prepare(build().eval(), scheme_for_target("dpu"))
    cats = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.target in (torch.cat, torch.concat)]
    assert cats == [] and concat_groups(qmodel) == []


class _FlattenedBranches(nn.Module):
    """Two conv branches flattened and concatenated before a linear head (a 2-D concat of (C, H, W) rows), plus a
    pooled 1x1 branch whose flattened columns need no reordering."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.c = nn.Conv2d(3, 3, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * 6 * 6 + 2 * 3 * 3 + 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.relu(self.a(x)).flatten(1), F.relu(self.b(x)).flatten(1), self.pool(F.relu(self.c(x))).flatten(1)]
        return self.fc(torch.cat(parts, dim=1))


def test_a_linear_after_a_concat_of_flattened_maps_exports_bit_exactly(tmp_path):
    """The XModel flattens NHWC tensors: each concatenated part's columns are (H, W, C), and the matmul's weight must
    be permuted part by part (it was left in PyTorch's order, up to 0.87 off)."""
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    qmodel = quantize(_FlattenedBranches().eval(), data, target="dpu", progress=False)
    path = export_xmodel(qmodel, tmp_path / "net.xmodel", data[0][:1])
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    (got,) = run_xmodel(path, x.numpy())
    with torch.no_grad():
        expected = qmodel(x).numpy()
    np.testing.assert_array_equal(got, expected)
