"""Vitis AI's concat rule on the DPU target: a concat's inputs take the fix position of its output.

The rule followed is vai_q_pytorch's default in Vitis AI 3.5 (github.com/Xilinx/Vitis-AI, tag v3.5, under
``src/vai_quantizer/vai_q_pytorch/``):

- ``nndct_shared/nndct_graph/nndctgraph_holder.py``, ``NndctGraphHolder.is_concat_input`` and ``quant_output``: a
  node whose only child is a concat is quantized through the concat's entry ("only output tensor to concat":
  ``quant_output`` returns the concat node), so the inputs and the output of the concat share one fix position,
  the one calibrated on the concat's output. A node read by the concat *and* by anything else keeps its own entry
  and position; the concat's output fix then re-quantizes it.
- ``pytorch_binding/pytorch_nndct/quantization/torchquantizer.py``, ``TORCHQuantizer._node_relative_fix_pos_check``
  reads a layer's output position through the same ``quant_output``: when the shift check coarsens the output of a
  layer that feeds a concat, it moves the shared entry, so the concat stays aligned.
- ``QuantizeFixPosChecker.align_inputs_to_output`` (same file) also moves inputs read elsewhere to the concat's
  position, but only with the ``change_concat_input_fix`` option, off by default
  (``nndct_shared/utils/option_list.py``); this module does not offer it.

Here, per ``torch.cat``/``torch.concat`` node of a prepared graph: its output quantizer (after a fused ReLU, if
one follows) is the *leader*; an input quantizer whose values (looked at through shape-only ops such as flatten or
dropout) are read by that concat alone is a *member*: it takes the leader's position
(:meth:`~lightning_quant.quantizers.fake_quant.FakeQuantize.follow`, which also lets the leader see the inputs'
whole range while it observes, in calibration and QAT alike); an input quantizer read elsewhere too is *kept* at
its own position. A concat whose output is a member of another concat (nested concats) joins that concat's group:
one position for all, the outer concat's. A max pool's output reuses its input's quantizer here
(:func:`~lightning_quant.capture.patterns.shared_quant_points`), so a max pool feeding a concat keeps its input's
position when that input is read elsewhere too, where vai_q_pytorch gives the pool's output the concat's.

:func:`align_concat_positions` makes the links and copies the positions: ``prepare()`` calls it on the DPU target
(the links keep the positions aligned through calibration, the refinements and QAT), ``quantize()`` again before
the DPU shift constraints, and ``export_xmodel`` on its copy.
:func:`~lightning_quant.quantizers.dpu_shifts.enforce_dpu_shifts` moves a group as one.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> class Branches(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         return torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)
    >>> q = quantize(Branches().eval(), [torch.randn(2, 3, 8, 8)], target="dpu", progress=False)
    >>> [group] = concat_groups(q)
    >>> group.leader, group.members, group.kept
    ('activation_quantizers.cat', ('activation_quantizers.a', 'activation_quantizers.relu'), ())
    >>> len({q.get_submodule(name).scale.item() for name in (group.leader, *group.members)})  # one fix position
    1
    >>> check_concat_alignment(q)
    []
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from lightning_quant.capture.patterns import (
    consumers_through_passthrough,
    is_fused_activation,
    source_through_passthrough,
)
from lightning_quant.quantizers.dpu import fix_pos_from_scale
from lightning_quant.quantizers.fake_quant import FakeQuantize

__all__ = ["ConcatAlignment", "ConcatGroup", "align_concat_positions", "check_concat_alignment", "concat_groups"]

_CAT_FUNCS = (torch.cat, torch.concat)


@dataclass(frozen=True)
class ConcatGroup:
    """Concats and the quantizers that share one fix position (names of quantizers are module paths).

    Attributes:
        concats: the ``torch.cat`` nodes (fx node names, prefixed with their graph module's path when nested).
        leader: the output quantizer of the last concat: its calibrated position is the group's.
        members: the quantizers that take the leader's position: concat inputs read by the concat only, and the
            output quantizers of inner concats.
        kept: concat inputs read elsewhere too: they keep their own position and the concat re-fixes them.
    """

    concats: tuple[str, ...]
    leader: str
    members: tuple[str, ...]
    kept: tuple[str, ...]


@dataclass(frozen=True)
class ConcatAlignment:
    """One position :func:`align_concat_positions` moved (``old_fix_pos`` None: the member was not calibrated)."""

    quantizer: str
    leader: str
    old_fix_pos: int | None
    new_fix_pos: int


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _quantizer_target(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize):
        return str(node.target)
    return None


def _output_quantizer(gm: fx.GraphModule, cat: fx.Node) -> str | None:
    """The quantizer right after ``cat`` (after its fused ReLU/ReLU6, when one follows), as ``prepare()`` puts it."""
    users = list(cat.users)
    if len(users) == 1 and is_fused_activation(gm, users[0]):
        users = list(users[0].users)
    found = [t for u in users if u.kwargs.get("observe") is not False and (t := _quantizer_target(gm, u))]
    return found[0] if len(found) == 1 else None


def _cat_inputs(cat: fx.Node) -> list[fx.Node]:
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
    return [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) else []


def _graph_groups(gm: fx.GraphModule, prefix: str) -> list[ConcatGroup]:
    calls: dict[str, list[fx.Node]] = {}  # quantizer -> the nodes that call it (a max pool's output reuses one)
    for node in gm.graph.nodes:
        if (target := _quantizer_target(gm, node)) is not None:
            calls.setdefault(target, []).append(node)
    parent: dict[str, str] = {}  # member -> the leader it takes its position from
    per_cat: list[tuple[fx.Node, str, list[str]]] = []
    for cat in gm.graph.nodes:
        if cat.op != "call_function" or cat.target not in _CAT_FUNCS:
            continue
        leader = _output_quantizer(gm, cat)
        if leader is None:
            continue
        kept: list[str] = []
        for arg in _cat_inputs(cat):
            source = _quantizer_target(gm, source_through_passthrough(gm, arg))
            if source is None or source == leader or source in parent or source in kept:
                continue
            if all(consumers_through_passthrough(gm, call) == [cat] for call in calls[source]):
                parent[source] = leader
            else:
                kept.append(source)
        per_cat.append((cat, leader, kept))

    def root(name: str) -> str:
        while name in parent:
            name = parent[name]
        return name

    found: dict[str, tuple[list[str], list[str]]] = {}  # root leader -> its concats, its kept inputs
    for cat, leader, kept in per_cat:
        concats, kept_inputs = found.setdefault(root(leader), ([], []))
        concats.append(_join(prefix, cat.name))
        kept_inputs.extend(_join(prefix, k) for k in kept if _join(prefix, k) not in kept_inputs)
    return [
        ConcatGroup(
            concats=tuple(concats),
            leader=_join(prefix, top),
            members=tuple(_join(prefix, m) for m in calls if m in parent and root(m) == top),
            kept=tuple(kept_inputs),
        )
        for top, (concats, kept_inputs) in found.items()
    ]


def concat_groups(model: nn.Module) -> list[ConcatGroup]:
    """Every concat of ``model``'s prepared graphs with the quantizers that share its position (see the module
    docstring for the rule), in graph order; a model with no traced graph or no concat has none.

    Example:
        >>> concat_groups(nn.Linear(2, 2))
        []
    """
    groups: list[ConcatGroup] = []
    for path, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            groups.extend(_graph_groups(module, path))
    return groups


def align_concat_positions(model: nn.Module) -> list[ConcatAlignment]:
    """Give every concat group of ``model`` its leader's fix position, in place, and make the members follow the
    leader (:meth:`~lightning_quant.quantizers.fake_quant.FakeQuantize.follow`), so that they keep it whenever
    positions are estimated again (QAT, a new calibration, range search).

    Members of a group whose leader is not calibrated yet are only linked (``prepare()`` links them before any
    data is seen). Running it again is harmless.

    Example:
        >>> from lightning_quant import quantize
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
        ...     def forward(self, x):
        ...         return torch.cat([self.a(x), self.b(x)], 1)
        >>> q = quantize(Net().eval(), [torch.randn(2, 3, 4, 4)], target="dpu", progress=False)
        >>> align_concat_positions(q)  # quantize() aligned it already
        []
        >>> a = q.get_submodule("activation_quantizers.a")
        >>> a.follow(None); _ = a.scale.fill_(2.0**-12)  # unlinked and moved, as in a model from an earlier release
        >>> [(m.quantizer, m.old_fix_pos) for m in align_concat_positions(q)], a.leader is q.activation_quantizers.cat
        ([('activation_quantizers.a', 12)], True)

    Returns:
        The positions that moved, in group order (empty when the model was already aligned).

    Raises:
        ValueError: a calibrated quantizer of a group whose scale is not a power of two (not a DPU model).
    """
    groups = concat_groups(model)
    for group in groups:  # drop earlier links first: a graph changed since may have left chains
        for name in (group.leader, *group.members):
            model.get_submodule(name).follow(None)
    moved: list[ConcatAlignment] = []
    for group in groups:
        leader = model.get_submodule(group.leader)
        for name in group.members:
            member = model.get_submodule(name)
            old = fix_pos_from_scale(member.scale) if member.calibrated.item() else None
            member.follow(leader)
            if not leader.calibrated.item():
                continue
            new = fix_pos_from_scale(leader.scale)
            if old != new:
                moved.append(ConcatAlignment(name, group.leader, old, new))
    return moved


def check_concat_alignment(model: nn.Module) -> list[str]:
    """Every concat member whose fix position differs from its leader's, as readable lines (empty when aligned)."""
    found = []
    for group in concat_groups(model):
        leader = model.get_submodule(group.leader)
        if not leader.calibrated.item():
            continue
        want = fix_pos_from_scale(leader.scale)
        for name in group.members:
            member = model.get_submodule(name)
            have = fix_pos_from_scale(member.scale) if member.calibrated.item() else None
            if have != want:
                found.append(
                    f"{name}: fix position {have} differs from {want}, the position of concat output {group.leader} "
                    f"({', '.join(group.concats)}); call align_concat_positions(model)."
                )
    return found
