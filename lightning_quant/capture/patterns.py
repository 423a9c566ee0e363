"""Where a deployed INT8 backend quantizes activations, decided on an fx graph.

The rule follows what onnxruntime's QDQ fusion and TensorRT expect:
* inputs of quantized ops (conv, linear, matmul, add, mul, concat, pooling) are quantized;
* outputs of those ops are quantized, after a fused ReLU/ReLU6 when the op's only user is one (never
  between a conv and its ReLU);
* shape-only ops (flatten, reshape, dropout, ...) pass quantized values through, so no second quantizer;
* max pooling picks values of its quantized input, so its output is already on that grid: it reuses the input's
  quantizer (:func:`shared_quant_points`; the fake-quant graph calls it again without observing), which exports as
  a QuantizeLinear with the input's scale, the pattern onnxruntime runs as an integer max pool.

Example:
    >>> from torch import fx, nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)))
    >>> [n.name for n in activation_quant_points(gm, is_weight_layer=lambda m: isinstance(m, (nn.Conv2d, nn.Linear)))]
    ['input_1', '_1', '_3']
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "activation_quant_points",
    "consumers_through_passthrough",
    "is_quantized_op",
    "is_shape_value",
    "shared_quantizer_calls",
    "shared_quant_points",
    "source_through_passthrough",
]

_FUSED_ACT_MODULES = (nn.ReLU, nn.ReLU6)
_FUSED_ACT_FUNCS = {F.relu, F.relu6, torch.relu, torch.relu_, F.hardtanh}
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
)
_POOL_FUNCS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    torch.max_pool2d,
    torch.avg_pool1d,
}
_MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)
_MAX_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d}
_BINARY_FUNCS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul}
_CAT_FUNCS = {torch.cat, torch.concat}
_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
_PASSTHROUGH_MODULES = (nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d, nn.Identity)
_PASSTHROUGH_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, F.dropout}
_PASSTHROUGH_METHODS = {
    "flatten",
    "reshape",
    "view",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "contiguous",
    "view_as",
}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "item", "tolist", "nelement"}


def is_shape_value(node: fx.Node) -> bool:
    """True for nodes that compute Python scalars (``x.shape[0] // p``, ``h * w``, ``x.size(1)``, ``t.item()``), which
    are not activations and never get a quantizer.

    Example:
        >>> import torch
        >>> from torch import fx, nn
        >>> class Patches(nn.Module):
        ...     def forward(self, x):
        ...         n, c, h, w = x.shape
        ...         return x.reshape(n, c, (h // 2) * (w // 2), 4)
        >>> gm = fx.symbolic_trace(Patches())
        >>> [n.name for n in gm.graph.nodes if is_shape_value(n)][-1]
        'mul'
    """
    cached = node.meta.get("lightning_quant_shape_value")
    if cached is None:
        cached = _compute_shape_value(node)
        node.meta["lightning_quant_shape_value"] = cached
    return cached


def _compute_shape_value(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
    if node.op == "call_function" and node.target is len:
        return True
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op != "call_function" or getattr(node.target, "__module__", None) not in ("_operator", "operator"):
        return False
    sources = [a for a in node.args if isinstance(a, fx.Node)]
    return bool(sources) and all(is_shape_value(a) for a in sources)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """Node arguments that carry activations (lists flattened; constants, parameters and shape scalars dropped)."""
    args: list[fx.Node] = []
    for arg in node.args:
        items = arg if isinstance(arg, (list, tuple)) else [arg]
        args.extend(a for a in items if isinstance(a, fx.Node) and a.op != "get_attr" and not is_shape_value(a))
    return args


def is_fused_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _FUSED_ACT_MODULES)
    if node.op == "call_function" and node.target is F.hardtanh:
        return node.args[1:3] == (0.0, 6.0) or node.kwargs.get("min_val") == 0.0
    return node.op in ("call_function", "call_method") and (
        node.target in _FUSED_ACT_FUNCS or node.target in ("relu", "relu_")
    )


def is_quantized_op(gm: fx.GraphModule, node: fx.Node, is_weight_layer: Callable[[nn.Module], bool]) -> bool:
    """True when ``node`` runs as an integer kernel at deployment (its inputs and output are quantized)."""
    if node.op == "call_module":
        module = _module(gm, node)
        return is_weight_layer(module) or isinstance(module, _POOL_MODULES)
    if node.op == "call_function":
        if node.target in _POOL_FUNCS or node.target in _CAT_FUNCS:
            return True
        if node.target in _BINARY_FUNCS or node.target in _MATMUL_FUNCS:
            return len(_tensor_args(node)) >= 2
    if node.op == "call_method" and node.target in ("add", "mul", "matmul", "add_", "mul_"):
        return len(_tensor_args(node)) >= 2
    return False


def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCS
    return node.op == "call_method" and node.target in _PASSTHROUGH_METHODS


def source_through_passthrough(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back through shape-only ops to the node that produced the values."""
    while _is_passthrough(gm, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def consumers_through_passthrough(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s values, looking through shape-only ops (flatten, view, dropout, ...), in
    graph order and without duplicates. Reads of its size only (``x.shape``) do not count; the graph's ``output``
    node does.

    Example:
        >>> import torch
        >>> from torch import fx, nn
        >>> class Net(nn.Module):
        ...     def forward(self, x):
        ...         return torch.cat([x.flatten(1), x.view(x.shape[0], -1)], 1), x
        >>> gm = fx.symbolic_trace(Net())
        >>> [n.name for n in consumers_through_passthrough(gm, next(iter(gm.graph.nodes)))]
        ['cat', 'output']
    """
    found: dict[fx.Node, None] = {}
    values = [node]
    while values:
        value = values.pop()
        for user in value.users:
            if is_shape_value(user):
                continue
            if _is_passthrough(gm, user) and user.args and user.args[0] is value:
                values.append(user)
            else:
                found[user] = None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _reuses_input_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A max pool returning values only (no indices) whose output is not followed by a fused activation."""
    if node.op == "call_module":
        module = _module(gm, node)
        is_max = isinstance(module, _MAX_POOL_MODULES) and not getattr(module, "return_indices", False)
    else:
        is_max = node.op == "call_function" and node.target in _MAX_POOL_FUNCS and not node.kwargs.get("return_indices")
    users = list(node.users)
    return is_max and bool(node.args) and not (len(users) == 1 and is_fused_activation(gm, users[0]))


def shared_quant_points(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """``{max pool node: the quantization point of its input}``: outputs that reuse their input's quantizer.

    Example:
        >>> from torch import fx, nn
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)))
        >>> {pool.name: source.name for pool, source in shared_quant_points(gm).items()}
        {'_2': '_1'}
    """
    shared: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:  # graph order: a pool reading another pool resolves to that pool's source
        if _reuses_input_quantizer(gm, node) and isinstance(node.args[0], fx.Node):
            source = source_through_passthrough(gm, node.args[0])
            shared[node] = shared.get(source, source)
    return shared


def shared_quantizer_calls(model: nn.Module) -> Iterator[tuple[str, fx.GraphModule, fx.Node]]:
    """Every second call of a quantizer on a max pool's output (``observe=False``; see :func:`shared_quant_points`)
    in ``model``'s prepared graphs, as ``(graph module path, graph module, node)``; ``node.args[0]`` is the pool and
    ``node.target`` the quantizer."""
    for path, gm in model.named_modules():
        if isinstance(gm, fx.GraphModule):
            for node in gm.graph.nodes:
                if node.op == "call_module" and node.kwargs.get("observe") is False and node.args:
                    yield path, gm, node


def activation_quant_points(gm: fx.GraphModule, is_weight_layer: Callable[[nn.Module], bool]) -> list[fx.Node]:
    """Nodes whose output gets an activation fake-quant, in graph order, without duplicates."""
    points: dict[fx.Node, None] = {}
    shared = shared_quant_points(gm)
    for node in gm.graph.nodes:
        if not is_quantized_op(gm, node, is_weight_layer):
            continue
        for arg in _tensor_args(node):
            source = source_through_passthrough(gm, arg)
            if source not in shared:
                points[source] = None
        users = list(node.users)
        if len(users) == 1 and is_fused_activation(gm, users[0]):
            points[users[0]] = None
        elif node not in shared:
            points[node] = None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted((p for p in points if p.op != "output"), key=order.__getitem__)
