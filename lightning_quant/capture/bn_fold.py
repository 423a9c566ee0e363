"""BatchNorm folding: merge ``conv -> bn`` (and ``linear -> bn``) into one layer, on tensors and on fx graphs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
    >>> _ = bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(fold_bn_into(conv, bn)(x), bn(conv(x)), atol=1e-5)
    True
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

__all__ = [
    "FOLDABLE_PAIRS",
    "bn_fold_factor",
    "bn_folded_bias",
    "fold_batchnorm",
    "fold_bn_into",
    "foldable_pairs",
    "set_submodule",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDABLE_PAIRS = (_CONVS, _BNS)


def bn_fold_factor(bn: nn.Module) -> torch.Tensor:
    """What folding ``bn`` multiplies each output channel's weights by: ``gamma / sqrt(running_var + eps)`` (``1 / std``
    without affine parameters).

    Example:
        >>> bn = nn.BatchNorm1d(2, eps=0.0).eval()
        >>> _ = bn.running_var.fill_(4.0)
        >>> bn_fold_factor(bn).tolist()
        [0.5, 0.5]
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    return bn.weight / std if bn.affine else 1.0 / std


def bn_folded_bias(layer_bias: torch.Tensor | None, bn: nn.Module, factor: torch.Tensor) -> torch.Tensor:
    """The bias of ``layer`` with ``bn`` folded in: ``beta + (bias - running_mean) * factor``, where ``factor`` is
    what folding multiplies the weights by (``gamma / std``, or ``1 / std`` without affine parameters).

    Example:
        >>> bn = nn.BatchNorm1d(2).eval()
        >>> _ = bn.running_mean.fill_(1.0)
        >>> bn_folded_bias(None, bn, torch.tensor([2.0, 0.5])).tolist()
        [-2.0, -0.5]
    """
    centred = -bn.running_mean if layer_bias is None else layer_bias - bn.running_mean
    return bn.bias + centred * factor if bn.affine else centred * factor


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a copy of ``layer`` whose output equals ``bn(layer(x))`` with ``bn`` in eval mode.

    Raises:
        ValueError: ``bn`` tracks no running statistics (nothing to fold).
    """
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False).")
    fused = copy.deepcopy(layer)
    factor = bn_fold_factor(bn)
    shape = [-1] + [1] * (fused.weight.dim() - 1)
    fused.weight.copy_(fused.weight * factor.reshape(shape))
    new_bias = bn_folded_bias(layer.bias, bn, factor)
    if fused.bias is None:
        fused.bias = nn.Parameter(new_bias.to(fused.weight.dtype))
    else:
        fused.bias.copy_(new_bias)
    return fused


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def foldable_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """``(layer_node, bn_node)`` pairs where the layer's only user is a BatchNorm of matching size.

    Layers or BatchNorms reached through more than one call are left out: folding (or fusing them for QAT)
    would change the other calls too.
    """
    call_counts = _call_counts(gm)
    pairs = []
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        if not isinstance(bn, _BNS) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        producer = node.args[0]
        layer = _module(gm, producer)
        if type(layer) not in _CONVS or len(producer.users) != 1:
            continue
        if call_counts[producer.target] > 1 or call_counts[node.target] > 1:
            continue
        out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if bn.num_features == out_features and bn.track_running_stats:
            pairs.append((producer, node))
    return pairs


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every foldable ``layer -> bn`` pair of ``gm`` in place; returns the folded BatchNorm names.

    Layers reached through more than one call are left as they are, since folding would change the others.
    """
    folded = []
    for layer_node, bn_node in foldable_pairs(gm):
        fused = fold_bn_into(gm.get_submodule(layer_node.target), gm.get_submodule(bn_node.target))
        set_submodule(gm, layer_node.target, fused)
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        folded.append(bn_node.target)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``target`` of ``root`` (ModuleDict entries included).

    Example:
        >>> model = nn.Sequential(nn.Sequential(nn.ReLU()))
        >>> set_submodule(model, "0.0", nn.Identity()); type(model[0][0]).__name__
        'Identity'
    """
    parent_name, _, attr = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)
