"""The Vitis AI DPU inspector: which ops of a model the DPU runs and which fall back to the CPU, before calibration.

:func:`inspect_dpu` prepares a copy of the model for the DPU exactly as ``quantize(..., target="dpu")`` does (the same
torch.fx capture, BatchNorm folding and DPU average pools), runs one example input through it for the shapes, and
judges every op with :func:`~lightning_quant.export.dpu_rules.dpu_verdict`: the rules ``export_xmodel`` lowers by, so
an op reported as CPU is one ``export_xmodel`` refuses, with the same reason. Nothing is calibrated and the model is
not changed. Quantizers (``fix``), no-ops (dropout, identity) and arithmetic on sizes are not listed.

The partition count is the number of maximal connected DPU subgraphs: 1 when the whole network runs on the DPU, and
one more each time execution must leave the DPU for the CPU and come back (a DPU op that waits for a CPU result
starts a new subgraph, also when it reads an earlier DPU op, as the add after a residual around a CPU op does).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 1))
    >>> report = inspect_dpu(net.eval(), torch.randn(1, 3, 16, 16))
    >>> report.partitions, [op.node for op in report.cpu_ops]
    (2, ['_3'])
    >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
    DPU inspection for DPUCZDX8G_ISA1_B4096, input 1x3x16x16: 5 ops, 4 on the DPU, 1 on the CPU; 2 DPU subgraphs
    node  op      target  reason
    _0    conv2d  DPU
    _1    relu    DPU
    _2    conv2d  DPU
    _3    SiLU    CPU     activation SiLU (export_xmodel lowers ReLU, ReLU6, and Hard-Sigmoid/Hard-Swish right after
                          a conv or linear layer)
    _4    conv2d  DPU
"""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_quant.capture.bn_fold import set_submodule
from lightning_quant.config import Target, scheme_for_target
from lightning_quant.export.dpu_rules import DPU_ARCH, DPUVerdict, dpu_verdict
from lightning_quant.export.xmodel import _example_tuple, untraced_parts
from lightning_quant.quantizers.modules import QuantConvBn
from lightning_quant.quantizers.prepare import ExcludeEntry, prepare, prepare_info, set_observers

__all__ = ["DPUInspection", "InspectedOp", "inspect_dpu"]

_HIDDEN = {"data", "output", "fix", "identity", "shape"}  # not ops of their own on either side
_TRANSPARENT = {"fix", "identity"}  # values pass through them: their producer is the op that feeds their users
_REASON_WIDTH = 90


@dataclass(frozen=True)
class InspectedOp:
    """One op of the inspected graph: where it runs and why.

    Attributes:
        node: the fx node's name (what ``export_xmodel``'s errors name).
        op: its XIR op type (``conv2d``, ``depthwise-conv2d``, ``matmul``, ...) or, for an op with none, its PyTorch
            name.
        target: ``"DPU"`` or ``"CPU"``.
        reason: why it cannot run on the DPU ("" on the DPU).
        layer: the module path of a layer (``features.3.conv.1``), else "".
        subgraph: the index of its connected DPU (or CPU) subgraph, in graph order.
    """

    node: str
    op: str
    target: str
    reason: str
    layer: str
    subgraph: int


@dataclass
class DPUInspection:
    """What :func:`inspect_dpu` found: every op with its target and reason, and the DPU/CPU partitioning."""

    ops: list[InspectedOp]
    partitions: int  # maximal connected DPU subgraphs
    cpu_subgraphs: int
    input_shapes: list[list[int]]
    arch: str = DPU_ARCH

    @property
    def cpu_ops(self) -> list[InspectedOp]:
        return [op for op in self.ops if op.target == "CPU"]

    @property
    def dpu_ops(self) -> list[InspectedOp]:
        return [op for op in self.ops if op.target == "DPU"]

    @property
    def all_dpu(self) -> bool:
        """True when the whole network runs on the DPU as one subgraph."""
        return not self.cpu_ops and self.partitions == 1

    def summary(self) -> str:
        """One line: how many ops run where, and the number of DPU subgraphs."""
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        where = (
            "all on the DPU" if not self.cpu_ops else f"{len(self.dpu_ops)} on the DPU, {len(self.cpu_ops)} on the CPU"
        )
        plural = "" if self.partitions == 1 else "s"
        return (
            f"DPU inspection for {self.arch}, input {shapes}: {len(self.ops)} ops, {where}; {self.partitions} DPU "
            f"subgraph{plural}"
        )

    def __str__(self) -> str:
        header = ("node", "op", "target", "reason")
        widths = [max([len(header[i])] + [len(getattr(o, header[i])) for o in self.ops]) for i in (0, 1)] + [6]
        indent = sum(widths) + 2 * len(widths)
        lines = [self.summary(), _row(header, widths)]
        for op in self.ops:
            reason = textwrap.wrap(op.reason, _REASON_WIDTH) or [""]
            lines.append(_row((op.node, op.op, op.target, reason[0]), widths))
            lines += [" " * indent + more for more in reason[1:]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DPUInspection({len(self.ops)} ops, {len(self.cpu_ops)} on the CPU, partitions={self.partitions})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the summary numbers and one entry per op."""
        return {
            "arch": self.arch,
            "input_shapes": self.input_shapes,
            "partitions": self.partitions,
            "cpu_subgraphs": self.cpu_subgraphs,
            "dpu_ops": len(self.dpu_ops),
            "cpu_ops": len(self.cpu_ops),
            "all_dpu": self.all_dpu,
            "ops": [dataclasses.asdict(op) for op in self.ops],
        }


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, [*widths, 0], strict=True)).rstrip()


def inspect_dpu(
    model: nn.Module, example_input: Any, *, exclude: ExcludeEntry | Iterable[ExcludeEntry] = ()
) -> DPUInspection:
    """List every op of ``model`` with where the Vitis AI DPU would run it (DPU or CPU) and why, before calibration.

    The model is prepared for the DPU on a copy (the graph ``export_xmodel`` later lowers) and judged by the rules
    ``export_xmodel`` uses (:mod:`lightning_quant.export.dpu_rules`), so every CPU op is one the export would refuse,
    with the same reason; the partition count says into how many DPU subgraphs the network falls.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2)).eval()
        >>> report = inspect_dpu(net, torch.randn(1, 3, 8, 8))
        >>> report.all_dpu, [op.op for op in report.ops]
        (True, ['conv2d', 'relu', 'reshape', 'matmul'])
        >>> report.to_dict()["partitions"]
        1

    Args:
        model: a float model (eval mode), or one already prepared or quantized with ``target="dpu"``.
        example_input: a tensor (or tuple of tensors) of the shape the DPU will see; batch size 1 is enough.
        exclude: layers a float model will keep in float (``quantize(..., exclude=...)``); they show as CPU ops.

    Returns:
        A :class:`DPUInspection`: ``print()`` it for the table, ``.to_dict()`` for JSON.

    Raises:
        TypeError: ``example_input`` is not a tensor or tuple of tensors.
        ValueError: a model prepared for another target than the DPU, ``exclude`` with an already prepared model,
            a model torch.fx cannot trace whole (the message names the parts and why), a model that fails on
            ``example_input``, or (from ``prepare``) an average pool the DPU cannot compute.
        NothingToQuantizeError: the model has no Conv/Linear layer.
    """
    inputs = _example_tuple(example_input)
    gm = _dpu_graph(model, exclude)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure of the forward: name the input and the cause
        shapes = ", ".join(str(list(t.shape)) for t in inputs)
        raise ValueError(
            f"inspect_dpu: the model does not run on example_input of shape {shapes} ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}). Pass an input the model takes, e.g. "
            "one batch of size 1 from its data."
        ) from err
    verdicts = {node: dpu_verdict(gm, node) for node in gm.graph.nodes}
    return _report(gm, verdicts, [list(t.shape) for t in inputs])


def _dpu_graph(model: nn.Module, exclude: ExcludeEntry | Iterable[ExcludeEntry]) -> fx.GraphModule:
    """A DPU-prepared copy of ``model`` (``model`` itself is never changed), observers off, QAT conv+BN folded."""
    try:
        info = prepare_info(model)
    except ValueError:
        info = None
    if info is None:
        prepared = prepare(model, scheme_for_target("dpu"), exclude=exclude)
    else:
        if info.scheme.target is not Target.DPU:
            target = getattr(info.scheme.target, "value", info.scheme.target)
            raise ValueError(
                f"inspect_dpu: this model was prepared for target {target!s}, not the DPU; pass the float model "
                "(inspect_dpu prepares a copy for the DPU) or one quantized with target='dpu'."
            )
        if tuple(exclude):
            raise ValueError(
                "inspect_dpu: exclude= applies when a float model is prepared; this model was already prepared with "
                "its own exclude list. Pass the float model with exclude=..., or drop exclude."
            )
        prepared = copy.deepcopy(model)
        for name, module in list(prepared.named_modules()):
            if isinstance(module, QuantConvBn):  # as convert() does for export
                set_submodule(prepared, name, module.to_folded())
    untraced = untraced_parts(prepared)
    if untraced:
        raise ValueError(
            f"inspect_dpu needs the model torch.fx traced whole, as export_xmodel does; these parts were not "
            f"({untraced}). Make the forward traceable (no data-dependent Python control flow) or inspect the "
            "traceable submodule."
        )
    set_observers(prepared, False)
    return prepared.eval()  # type: ignore[return-value]


def _report(gm: fx.GraphModule, verdicts: dict[fx.Node, DPUVerdict], shapes: list[list[int]]) -> DPUInspection:
    rows = [n for n in gm.graph.nodes if verdicts[n].reason is not None or verdicts[n].op not in _HIDDEN]
    row_set = set(rows)
    parent = {n: n for n in rows}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    # stage: how many DPU <-> CPU hand-overs precede a node on its longest input path. Two connected ops on the same
    # side share a subgraph only at the same stage: a DPU op that waits for a CPU result starts a new DPU subgraph,
    # even when it also reads an earlier DPU op (a residual around a CPU op).
    stage: dict[fx.Node, int] = {}
    for node in rows:  # graph order is topological
        producers = _producers(node, verdicts, row_set)
        side = verdicts[node].on_dpu
        stage[node] = max((stage[p] + (verdicts[p].on_dpu != side) for p in producers), default=0)
        for producer in producers:
            if verdicts[producer].on_dpu == side and stage[producer] == stage[node]:
                parent[root(producer)] = root(node)
    index: dict[fx.Node, int] = {}
    counts = {True: 0, False: 0}
    ops = []
    for node in rows:
        verdict, top = verdicts[node], root(node)
        if top not in index:
            index[top] = counts[verdict.on_dpu]
            counts[verdict.on_dpu] += 1
        layer = str(node.target) if node.op == "call_module" else ""
        target = "DPU" if verdict.on_dpu else "CPU"
        ops.append(InspectedOp(node.name, verdict.op, target, verdict.reason or "", layer, index[top]))
    return DPUInspection(ops, counts[True], counts[False], shapes)


def _producers(node: fx.Node, verdicts: dict[fx.Node, DPUVerdict], rows: set[fx.Node]) -> set[fx.Node]:
    """The listed ops whose values ``node`` reads, looking through quantizers and no-ops."""
    found: set[fx.Node] = set()
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in rows:
            found.add(current)
        elif verdicts[current].op in _TRANSPARENT:
            stack.extend(current.all_input_nodes)
    return found
