"""Cross-layer equalization (CLE) with bias absorption (Nagel et al. 2019, "Data-Free Quantization").

For consecutive layers ``conv1 -> [BatchNorm] -> (ReLU | nothing) -> [max pooling] -> conv2`` found on the torch.fx
graph (max pooling commutes with positive per-channel scales, so LeNet/VGG-style pairs count too), output
channel ``i`` of ``conv1`` is divided by ``s_i = sqrt(r1_i * r2_i) / r2_i`` and input channel ``i`` of ``conv2`` is
multiplied by it (``r1_i``, ``r2_i``: largest ``|w|`` of the channel), which makes both ranges ``sqrt(r1_i r2_i)``:
ReLU commutes with positive scaling, so the float function is unchanged while per-channel weight ranges get
more uniform (what per-tensor quantization needs). Depthwise-separable chains (``conv -> depthwise -> conv``, as in
MobileNetV2) are two overlapping pairs, equalized in turn for ``iterations`` sweeps or until the scales settle.

* BatchNorm after a conv of a pair stays, and takes the first layer's share of the scaling in its affine weight and
  bias: its output, ``gamma * (x - mean) / std + beta``, divides by ``s`` exactly whether ``mean`` and ``std`` are
  the running statistics (eval) or the batch's (training), so an equalized model fine-tunes as before (QAT), keeps
  its class and state-dict keys, and ``prepare()`` folds it as any BatchNorm. The ranges that set ``s`` are those
  of the folded weights (``w * |gamma| / std``), the weights that get quantized. A BatchNorm without affine
  parameters is folded into the conv (:func:`~lightning_quant.capture.bn_fold.fold_bn_into`) and left as an
  identity, listed in ``CLEReport.folded_bn``: such a model is for inference (PTQ) only.
* ReLU6 does not commute with scaling. Pairs through a ReLU6 are skipped and reported, unless
  ``replace_relu6=True``, which swaps those ``nn.ReLU6`` modules for ``nn.ReLU`` (the paper's choice for
  MobileNetV2; it changes the function wherever an activation exceeds 6).
* Bias absorption (``absorb_bias=True``): with the folded BatchNorm's statistics (``beta``, ``gamma``) the
  pre-activation of channel ``i`` is assumed ``N(beta_i, gamma_i^2)``; ``c_i = max(0, beta_i - 3 gamma_i)`` moves
  from ``conv1``'s bias into ``conv2``'s (``b2 += W2 c``). It needs BatchNorm statistics and a ReLU between the
  layers, and is skipped when ``conv2`` zero-pads (border outputs would change).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> x = torch.randn(2, 3, 5, 5)
    >>> before = model(x)
    >>> report = equalize(model)
    >>> report.pairs, torch.allclose(model(x), before, atol=1e-5)
    ([('0', '2')], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_quant.capture.bn_fold import fold_bn_into, set_submodule
from lightning_quant.capture.trace import capture

__all__ = ["CLEReport", "equalization_pairs", "equalize", "relu6_to_relu"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RELU_FUNCS = {F.relu, torch.relu}
_RELU6_FUNCS = {F.relu6}
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_MAX_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d}


@dataclass
class CLEReport:
    """What :func:`equalize` did. Pair and layer names are the model's qualified module names."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    replaced_relu6: list[str] = field(default_factory=list)
    absorbed_bias: list[tuple[str, str]] = field(default_factory=list)
    iterations: int = 0


@dataclass
class _Pair:
    conv1: str
    conv2: str
    bn1: str | None
    bn2: str | None
    act: str  # "none", "relu", "relu6" or "relu6_module"
    act_target: str | None


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    module = _module(gm, node)
    if isinstance(module, nn.ReLU6):
        return "relu6_module"
    if isinstance(module, nn.ReLU) or (node.op in ("call_function", "call_method") and node.target in ("relu",)):
        return "relu"
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return "relu"
    if node.op == "call_function" and (
        node.target in _RELU6_FUNCS or (node.target is F.hardtanh and node.args[1:3] == (0.0, 6.0))
    ):
        return "relu6"
    return None


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), _MAX_POOLS) or (node.op == "call_function" and node.target in _MAX_POOL_FUNCS)


def _skip_max_pools(gm: fx.GraphModule, node: fx.Node | None) -> fx.Node | None:
    """Max pooling commutes with a positive per-channel scale (and with ReLU): step over it."""
    while node is not None and _is_max_pool(gm, node):
        node = _single_user(node)
    return node


def _pair_from(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]) -> _Pair | None:
    """Follow ``node`` (a conv) through an optional BN, activation and max pooling to the next conv."""
    nxt, bn1, act, act_target = _single_user(node), None, "none", None
    if nxt is not None and isinstance(_module(gm, nxt), _BNS):
        bn1, nxt = nxt.target, _single_user(nxt)
    nxt = _skip_max_pools(gm, nxt)
    if nxt is not None and _activation(gm, nxt) is not None:
        act, act_target = _activation(gm, nxt), (nxt.target if nxt.op == "call_module" else None)
        nxt = _skip_max_pools(gm, _single_user(nxt))
    if nxt is None or type(_module(gm, nxt)) not in _LAYERS:
        return None
    # a module called more than once cannot be rescaled for one call site; a shared ReLU module (torchvision's
    # ResNet blocks call one self.relu three times) commutes with the scaling and stays untouched, a shared ReLU6
    # module would be swapped for ReLU at every call site
    shared = (node.target, nxt.target, bn1, act_target if act == "relu6_module" else None)
    if any(calls.get(t, 0) > 1 for t in shared if t is not None):
        return None
    users = _single_user(nxt)
    bn2 = users.target if users is not None and isinstance(_module(gm, users), _BNS) else None
    if bn2 is not None and calls.get(bn2, 0) > 1:
        bn2 = None
    return _Pair(node.target, nxt.target, bn1, bn2, act, act_target)


def equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv1, conv2)`` names of every layer pair CLE can rescale (ReLU6 pairs included).

    Example:
        >>> equalization_pairs(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8)))
        [('0', '2')]

    Raises:
        ValueError: the model cannot be traced with torch.fx.
    """
    return [(p.conv1, p.conv2) for p in _find_pairs(_trace(model))]


def _trace(model: nn.Module) -> fx.GraphModule:
    gm, reason = capture(model)
    if gm is None:
        raise ValueError(
            f"cross-layer equalization needs a torch.fx graph of {type(model).__name__}, but tracing failed: {reason}. "
            "Call equalize() on the traceable submodule (e.g. model.features) instead."
        )
    return gm


def _find_pairs(gm: fx.GraphModule) -> list[_Pair]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if type(_module(gm, node)) in _LAYERS:
            pair = _pair_from(gm, node, calls)
            if pair is not None and _channels_match(gm.get_submodule(pair.conv1), gm.get_submodule(pair.conv2)):
                pairs.append(pair)
    return pairs


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _channels_match(m1: nn.Module, m2: nn.Module) -> bool:
    return _out_channels(m1) == _in_channels(m2)


def _grouped(layer: nn.Module) -> torch.Tensor:
    """Weight viewed as ``(groups, out/groups, in/groups, k)``."""
    groups = 1 if isinstance(layer, nn.Linear) else layer.groups
    w = layer.weight
    return w.view(groups, w.shape[0] // groups, w.shape[1], -1)


def _bn_factor(bn: nn.Module | None) -> torch.Tensor | float:
    """Per output channel, what folding ``bn`` multiplies the weights by, in magnitude: ``|gamma| / std``."""
    return 1.0 if bn is None else bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)


def _input_ranges(layer: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    grouped = _grouped(layer).abs()
    factor = _bn_factor(bn)
    if isinstance(factor, torch.Tensor):
        grouped = grouped * factor.view(grouped.shape[0], grouped.shape[1], 1, 1)
    return grouped.amax(dim=(1, 3)).reshape(-1)


def _output_ranges(layer: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    return layer.weight.abs().reshape(layer.weight.shape[0], -1).amax(dim=1) * _bn_factor(bn)


@torch.no_grad()
def _equalize_pair(m1: nn.Module, bn1: nn.Module | None, m2: nn.Module, bn2: nn.Module | None) -> torch.Tensor:
    """Rescale one pair in place (``bn1``, ``bn2``: the affine BatchNorm after each layer, or None); returns the
    scales ``s`` (1 where a channel is all zero)."""
    r1, r2 = _output_ranges(m1, bn1).double(), _input_ranges(m2, bn2).double()
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, 1.0), 1.0)
    if bn1 is not None:  # the BatchNorm's output is the pair's first output: scale it, not the conv under it
        bn1.weight.div_(s.to(bn1.weight.dtype))
        bn1.bias.div_(s.to(bn1.bias.dtype))
    else:
        shape1 = [-1] + [1] * (m1.weight.dim() - 1)
        m1.weight.div_(s.to(m1.weight.dtype).reshape(shape1))
        if m1.bias is not None:
            m1.bias.div_(s.to(m1.bias.dtype))
    grouped = _grouped(m2)
    grouped.mul_(s.to(grouped.dtype).reshape(grouped.shape[0], 1, grouped.shape[2], 1))
    return s


def _fold_in_place(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``bn`` (one without affine parameters) into ``layer``'s own parameters, make ``bn`` an identity;
    returns BN's ``(beta, |gamma|)``."""
    fused = fold_bn_into(layer, bn)
    with torch.no_grad():
        layer.weight.copy_(fused.weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(fused.bias.detach().clone())
        else:
            layer.bias.copy_(fused.bias)
        beta = bn.bias.detach().clone() if bn.affine else torch.zeros_like(bn.running_mean)
        gamma = bn.weight.detach().abs().clone() if bn.affine else torch.ones_like(bn.running_mean)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        if bn.affine:
            bn.weight.fill_(1.0)
            bn.bias.zero_()
    return beta, gamma


def _check(model: nn.Module, iterations: int, tolerance: float) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be an integer >= 1; 20 is the default.")
    if not tolerance > 0.0:
        raise ValueError(f"tolerance={tolerance!r} must be > 0; 1e-6 is the default.")
    training = [name for name, m in model.named_modules() if isinstance(m, _BNS) and m.training]
    if training:
        raise ValueError(
            f"BatchNorm layers in training mode ({', '.join(training[:3])}): equalization reads their running "
            "statistics, so call model.eval() first (model.train() afterwards is fine)."
        )


def _select(model: nn.Module, pairs: list[_Pair], replace_relu6: bool, report: CLEReport) -> list[_Pair]:
    """Drop pairs through a ReLU6 (or swap the ReLU6 module for a ReLU when allowed); record why."""
    kept = []
    for pair in pairs:
        name = f"{pair.conv1} -> {pair.conv2}"
        if pair.act == "relu6" or (pair.act == "relu6_module" and not replace_relu6):
            how = "pass replace_relu6=True to swap it for ReLU" if pair.act == "relu6_module" else "use nn.ReLU6"
            report.skipped[name] = f"ReLU6 between the layers does not commute with scaling ({how})"
            continue
        if pair.act == "relu6_module":
            set_submodule(model, pair.act_target, nn.ReLU())
            report.replaced_relu6.append(pair.act_target)
            pair.act = "relu"
        kept.append(pair)
    return kept


def relu6_to_relu(model: nn.Module) -> list[str]:
    """Swap every ``nn.ReLU6`` module of ``model`` for ``nn.ReLU`` in place; returns the swapped names.

    ReLU6 does not commute with per-channel scaling (so CLE skips pairs through it) and the DPU prefers ReLU.
    The function changes only where an activation exceeds 6.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 1), nn.ReLU6())
        >>> relu6_to_relu(model), type(model[1]).__name__
        (['1', '3'], 'ReLU')
    """
    names = [name for name, module in model.named_modules() if type(module) is nn.ReLU6]
    for name in names:
        set_submodule(model, name, nn.ReLU(inplace=False))
    return names


@torch.no_grad()
def _absorb(m1: nn.Module, m2: nn.Module, beta: torch.Tensor, gamma: torch.Tensor) -> None:
    """Move ``c = max(0, beta - 3 gamma)`` from ``m1``'s bias (the first layer's or its BatchNorm's) into ``m2``'s
    (``b2 += W2 c``; a BatchNorm after ``m2`` sees the same input either way)."""
    c = torch.clamp(beta - 3.0 * gamma, min=0.0)
    m1.bias.sub_(c)
    grouped = _grouped(m2)  # (groups, out/groups, in/groups, k)
    shift = (grouped.sum(dim=3) * c.view(grouped.shape[0], 1, grouped.shape[2])).sum(dim=2).reshape(-1)
    if m2.bias is None:
        m2.bias = nn.Parameter(shift.to(m2.weight.dtype))
    else:
        m2.bias.add_(shift)


def _absorb_all(model: nn.Module, pairs: list[_Pair], bns: dict, stats: dict, report: CLEReport) -> None:
    for pair in pairs:
        name = f"{pair.conv1} -> {pair.conv2}"
        m2 = model.get_submodule(pair.conv2)
        if pair.conv1 not in stats and pair.conv1 not in bns:
            report.skipped[f"bias absorption {name}"] = "no BatchNorm statistics after the first layer"
        elif pair.act != "relu":
            report.skipped[f"bias absorption {name}"] = "no ReLU between the layers"
        elif not isinstance(m2, nn.Linear) and (m2.padding == "same" or any(p != 0 for p in _tuple(m2.padding))):
            report.skipped[f"bias absorption {name}"] = "the second layer zero-pads (border outputs would change)"
        elif pair.conv1 in bns:
            bn = bns[pair.conv1]
            _absorb(bn, m2, bn.bias.detach().clone(), bn.weight.detach().abs())
            report.absorbed_bias.append((pair.conv1, pair.conv2))
        else:
            _absorb(model.get_submodule(pair.conv1), m2, *stats[pair.conv1])
            report.absorbed_bias.append((pair.conv1, pair.conv2))


def _tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def equalize(
    model: nn.Module,
    *,
    iterations: int = 20,
    absorb_bias: bool = True,
    replace_relu6: bool = False,
    tolerance: float = 1e-6,
) -> CLEReport:
    """Cross-layer equalization of ``model`` in place (BatchNorms kept, see the module docs), then optional bias
    absorption.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
        >>> report = equalize(model)
        >>> report.pairs, list(report.skipped)
        ([], ['0 -> 3'])
        >>> report = equalize(model, replace_relu6=True)
        >>> report.pairs, report.replaced_relu6, report.folded_bn
        ([('0', '3')], ['2'], [])

    Args:
        model: float model in eval mode; modified in place (deep-copy it first to keep the original).
        iterations: at most this many sweeps over all pairs (chains such as conv -> depthwise -> conv need several).
        absorb_bias: move the expected positive part of ReLU inputs from the first layer's bias into the second's.
        replace_relu6: swap ``nn.ReLU6`` modules between paired layers for ``nn.ReLU`` (changes the function where
            activations exceed 6); otherwise those pairs are skipped and listed in ``report.skipped``.
        tolerance: stop once every scale of a sweep is within this of 1.

    Returns:
        A :class:`CLEReport`: equalized pairs, skipped pairs with the reason, folded BatchNorms, replaced ReLU6
        modules, pairs whose bias was absorbed and the sweeps run.

    Raises:
        ValueError: ``iterations`` < 1, ``tolerance`` <= 0, a BatchNorm in training mode, a BatchNorm without
            running statistics, or a model torch.fx cannot trace.
    """
    _check(model, iterations, tolerance)
    gm = _trace(model)
    report = CLEReport()
    pairs = _select(model, _find_pairs(gm), replace_relu6, report)
    bns: dict[str, nn.Module] = {}  # layer -> its affine BatchNorm, which takes the layer's output scaling
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (beta, |gamma|) of a folded BatchNorm
    for layer_name, bn_name in {(p.conv1, p.bn1) for p in pairs} | {(p.conv2, p.bn2) for p in pairs}:
        if bn_name is None:
            continue
        bn = model.get_submodule(bn_name)
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError(
                f"BatchNorm {bn_name!r} tracks no running statistics (track_running_stats=False): equalization needs "
                "them to know the folded weights' ranges; leave cross_layer_equalization off for this model."
            )
        if bn.affine:
            bns[layer_name] = bn
            layer = model.get_submodule(layer_name)
            if layer.bias is None:  # a zero bias (a no-op before BatchNorm) keeps the state-dict keys 0.1 wrote
                layer.bias = nn.Parameter(torch.zeros_like(bn.running_mean, dtype=layer.weight.dtype))
        else:
            stats[layer_name] = _fold_in_place(model.get_submodule(layer_name), bn)
            report.folded_bn.append(bn_name)
    report.folded_bn.sort()
    report.pairs = [(p.conv1, p.conv2) for p in pairs]
    for sweep in range(1, iterations + 1 if pairs else 1):
        report.iterations = sweep
        change = 0.0
        for pair in pairs:
            s = _equalize_pair(
                model.get_submodule(pair.conv1),
                bns.get(pair.conv1),
                model.get_submodule(pair.conv2),
                bns.get(pair.conv2),
            )
            if pair.conv1 in stats:
                beta, gamma = stats[pair.conv1]
                stats[pair.conv1] = (beta / s.to(beta.dtype), gamma / s.to(gamma.dtype))
            change = max(change, (s - 1.0).abs().max().item())
        if change < tolerance:
            break
    if absorb_bias:
        _absorb_all(model, pairs, bns, stats, report)
    return report
