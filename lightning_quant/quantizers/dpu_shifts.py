"""The DPU's shift constraints on conv/linear fix positions, checked and enforced on a calibrated model.

For a layer with input, weight, bias and output positions ``fp_in, fp_w, fp_b, fp_out`` the DPU shifts its
accumulator right by ``shift_cut = fp_w + fp_in - fp_out`` (must lie in ``[0, 16]``) and the bias left by
``shift_bias = fp_w + fp_in - fp_b`` (must lie in ``[min(0, -(24 - (8 + shift_cut))), 16]``).
:func:`enforce_dpu_shifts` moves positions until both hold, always in the direction that cannot overflow
where there is one: a too-large ``shift_cut`` lowers ``fp_w``, a negative one lowers ``fp_out``; a too-small
``shift_bias`` lowers ``fp_b``; only a too-large ``shift_bias`` must raise ``fp_b`` (the bias may then clip). An
output that shares a concat's position (:mod:`~lightning_quant.quantizers.dpu_concat`) moves with its whole group,
as vai_q_pytorch moves the concat's shared entry, so the concat stays aligned.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)], target="dpu",
    ...              progress=False)
    >>> [v for v in check_dpu_shifts(q)]  # quantize() already enforced them
    []
    >>> sorted(layer_fix_positions(q)["0"])
    ['bias', 'input', 'output', 'weight']
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from lightning_quant.capture.patterns import is_fused_activation, source_through_passthrough
from lightning_quant.quantizers.dpu import fix_pos_from_scale
from lightning_quant.quantizers.dpu_concat import concat_groups
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.modules import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear

__all__ = ["ShiftAdjustment", "check_dpu_shifts", "enforce_dpu_shifts", "layer_fix_positions"]

_LAYERS = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)
SHIFT_MAX = 16


@dataclass
class ShiftAdjustment:
    """One position moved by :func:`enforce_dpu_shifts`."""

    layer: str
    quantizer: str
    old_fix_pos: int
    new_fix_pos: int
    reason: str


def _quantizer_of(gm: fx.GraphModule, node: fx.Node | None) -> tuple[str, FakeQuantize] | None:
    if node is not None and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, FakeQuantize):
            return str(node.target), module
    return None


def _output_quantizer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, FakeQuantize] | None:
    users = list(node.users)
    if len(users) == 1 and is_fused_activation(gm, users[0]):
        users = list(users[0].users)
    return _quantizer_of(gm, users[0]) if len(users) == 1 else None


def layer_fix_positions(model: nn.Module) -> dict[str, dict[str, tuple[str, FakeQuantize]]]:
    """Per conv/linear call site of a traced prepared model: its ``input``/``weight``/``bias``/``output`` quantizers.

    Layers whose input or output has no quantizer (a float neighbour) are left out; ``bias`` is missing when
    the bias is not quantized.
    """
    if not isinstance(model, fx.GraphModule):
        return {}
    found: dict[str, dict[str, tuple[str, FakeQuantize]]] = {}
    for node in model.graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _LAYERS):
            continue
        layer = model.get_submodule(node.target)
        source = source_through_passthrough(model, node.args[0]) if node.args else None
        entry = {"input": _quantizer_of(model, source), "output": _output_quantizer(model, node)}
        if entry["input"] is None or entry["output"] is None:
            continue
        entry["weight"] = (f"{node.target}.weight_fake_quant", layer.weight_fake_quant)
        if getattr(layer, "bias_fake_quant", None) is not None:
            entry["bias"] = (f"{node.target}.bias_fake_quant", layer.bias_fake_quant)
        found[str(node.target)] = entry  # type: ignore[assignment]
    return found


def _pos(entry: dict, key: str) -> int:
    return fix_pos_from_scale(entry[key][1].scale)


def _violations(name: str, entry: dict) -> list[str]:
    fi, fw, fo = _pos(entry, "input"), _pos(entry, "weight"), _pos(entry, "output")
    cut = fw + fi - fo
    found = []
    if not 0 <= cut <= SHIFT_MAX:
        found.append(f"{name}: shift_cut = fp_w {fw} + fp_in {fi} - fp_out {fo} = {cut} is outside [0, {SHIFT_MAX}]")
    if "bias" in entry:
        fb = _pos(entry, "bias")
        shift_bias, low = fw + fi - fb, min(0, -(24 - (8 + cut)))
        if not low <= shift_bias <= SHIFT_MAX:
            found.append(
                f"{name}: shift_bias = fp_w {fw} + fp_in {fi} - fp_b {fb} = {shift_bias} "
                f"is outside [{low}, {SHIFT_MAX}]"
            )
    return found


def check_dpu_shifts(model: nn.Module) -> list[str]:
    """Every violated shift constraint of a calibrated DPU model, as readable lines (empty when all hold)."""
    return [v for name, entry in layer_fix_positions(model).items() for v in _violations(name, entry)]


_Linked = dict[int, list[tuple[str, FakeQuantize]]]


def _concat_links(model: nn.Module) -> _Linked:
    """``id(quantizer)`` -> every quantizer of its concat group (leader first), for the quantizers in one."""
    links: _Linked = {}
    for group in concat_groups(model):
        members = [(name, model.get_submodule(name)) for name in (group.leader, *group.members)]
        links.update({id(fq): members for _, fq in members})
    return links


def _set(entry: dict, key: str, pos: int, layer: str, reason: str, log: list[ShiftAdjustment], links: _Linked) -> None:
    qname, fq = entry[key]
    for name, moved in links.get(id(fq), [(qname, fq)]):
        why = reason if moved is fq else f"{reason}, shared through a concat with {qname}"
        log.append(ShiftAdjustment(layer, name, fix_pos_from_scale(moved.scale), pos, why))
        moved.scale.fill_(2.0**-pos)


def _enforce_layer(name: str, entry: dict, log: list[ShiftAdjustment], links: _Linked) -> bool:
    fi, fw, fo = _pos(entry, "input"), _pos(entry, "weight"), _pos(entry, "output")
    if fw + fi - fo > SHIFT_MAX:
        _set(entry, "weight", fo + SHIFT_MAX - fi, name, "shift_cut > 16: coarser weights", log, links)
        return True
    if fw + fi - fo < 0:
        _set(entry, "output", fw + fi, name, "shift_cut < 0: coarser output", log, links)
        return True
    if "bias" not in entry:
        return False
    fb, cut = _pos(entry, "bias"), fw + fi - fo
    if fw + fi - fb > SHIFT_MAX:
        _set(
            entry, "bias", fw + fi - SHIFT_MAX, name, "shift_bias > 16: finer bias (large values may clip)", log, links
        )
        return True
    if fw + fi - fb < min(0, cut - 16):
        _set(entry, "bias", fw + fi - min(0, cut - 16), name, "shift_bias too small: coarser bias", log, links)
        return True
    return False


def enforce_dpu_shifts(model: nn.Module, max_rounds: int = 32) -> list[ShiftAdjustment]:
    """Move fix positions of a calibrated DPU model in place until every layer's shift constraints hold.

    An output position is shared with the next layer's input, so layers are revisited until nothing moves. An
    output that shares a concat's fix position moves with its whole group (every quantizer of the group gets the
    new position), so an aligned concat stays aligned: align first
    (:func:`~lightning_quant.quantizers.dpu_concat.align_concat_positions`), then enforce.

    Returns:
        The adjustments made, in order (empty when the model already complied).

    Raises:
        RuntimeError: the constraints still conflict after ``max_rounds`` passes (the message lists them).
    """
    log: list[ShiftAdjustment] = []
    layers = layer_fix_positions(model)
    links = _concat_links(model) if layers else {}
    for _ in range(max_rounds):
        changed = [_enforce_layer(name, entry, log, links) for name, entry in layers.items()]
        if not any(changed):
            return log
    raise RuntimeError(
        "DPU shift constraints could not be met: " + "; ".join(check_dpu_shifts(model)) + ". Recalibrate with "
        "more representative data or keep the offending layers in float (exclude=...)."
    )
