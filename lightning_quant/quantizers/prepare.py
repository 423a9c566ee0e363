"""Graph transforms: ``prepare()`` inserts fake-quant into a float model, ``convert()`` freezes it for export.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant.config import scheme_for_target
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    >>> _ = model(torch.randn(1, 3, 6, 6)); model = model.eval()
    >>> qmodel = prepare(model, scheme_for_target("x86"))
    >>> [name for name, _ in iter_quantizers(qmodel)]  # doctest: +NORMALIZE_WHITESPACE
    ['0.weight_fake_quant', '4.weight_fake_quant',
     'activation_quantizers.input_1', 'activation_quantizers._2', 'activation_quantizers._4']
    >>> prepare_info(qmodel).folded_bn
    ['1']
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_quant.capture.bn_fold import fold_batchnorm, foldable_pairs, set_submodule
from lightning_quant.capture.patterns import activation_quant_points, shared_quant_points
from lightning_quant.capture.trace import capture, is_traceable_leaf
from lightning_quant.config import QuantMode, QuantScheme, Target, _coerce_enum
from lightning_quant.errors import CheckpointMismatchError, NotCalibratedError, NothingToQuantizeError
from lightning_quant.quantizers.config_record import (
    RECORD_ATTR,
    attach_config_record,
    config_record,
    decode_config,
    write_config_record,
)
from lightning_quant.quantizers.dpu_activations import use_dpu_activations
from lightning_quant.quantizers.dpu_concat import align_concat_positions
from lightning_quant.quantizers.dpu_pool import use_dpu_avgpool
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.modules import (
    QUANTIZABLE_LAYERS,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvBn,
    QuantLinear,
    _WeightQuantMixin,
    quantized_layer_from_float,
)
from lightning_quant.quantizers.observers import input_spec
from lightning_quant.quantizers.state_checks import check_quant_state_keys, check_saved_config

__all__ = [
    "PrepareInfo",
    "convert",
    "exclude_entries",
    "freeze_bn",
    "is_excluded",
    "iter_quantizers",
    "prepare",
    "prepare_info",
    "warn_degenerate_ranges",
    "require_calibrated",
    "set_fake_quant",
    "set_observers",
]

_INFO_ATTR = "_lightning_quant_info"
_FX_PRESERVED_ATTRIBUTES = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
_ACT_DICT = "activation_quantizers"
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


@dataclass
class PrepareInfo:
    """What ``prepare`` did: which layers are quantized, which stay float and why, how the graph was captured."""

    scheme: QuantScheme
    mode: QuantMode
    quantized_layers: list[str] = field(default_factory=list)
    float_layers: dict[str, str] = field(default_factory=dict)
    untraced: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)
    folded_bn: list[str] = field(default_factory=list)
    module_level: list[str] = field(default_factory=list)
    refinements: list[str] = field(default_factory=list)  # post-calibration steps that ran (refine_calibrated)
    layer_weight_bits: dict[str, int] = field(default_factory=dict)  # the prepare() argument: pattern -> bits
    weight_bits: dict[str, int] = field(default_factory=dict)  # layers whose weights use other bits than the scheme
    range_search: Any = None  # the RangeSearchReport of search_activation_ranges, when it ran
    restored: bool = False  # a saved state was loaded into the network (load_state_dict, a checkpoint)
    # a checkpoint of an earlier release (no config record) is checked against its QuantCallback state instead
    legacy_state_checked: bool = False

    def layer_scheme(self, name: str) -> QuantScheme:
        """The scheme of layer ``name``: ``scheme`` with the weight bits of the first matching
        ``layer_weight_bits`` pattern, if any (recorded in ``weight_bits``)."""
        for pattern, bits in self.layer_weight_bits.items():
            if fnmatch.fnmatchcase(name, pattern):
                if bits != self.scheme.weight.bits:
                    self.weight_bits[name] = bits
                return dataclasses.replace(self.scheme, weight=dataclasses.replace(self.scheme.weight, bits=bits))
        return self.scheme


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


ExcludeEntry = str | type[nn.Module]


def exclude_entries(exclude: ExcludeEntry | Iterable[ExcludeEntry] | None) -> tuple[ExcludeEntry, ...]:
    """``exclude=`` as a tuple of glob patterns of layer names and ``nn.Module`` types, checked.

    A single pattern or type counts as a list of one (``exclude="head.*"`` is ``exclude=["head.*"]``).

    Example:
        >>> exclude_entries(["classifier.*", nn.Linear])
        ('classifier.*', <class 'torch.nn.modules.linear.Linear'>)
        >>> exclude_entries(nn.Conv2d)
        (<class 'torch.nn.modules.conv.Conv2d'>,)

    Raises:
        TypeError: an entry that is neither a string nor an ``nn.Module`` subclass (e.g. a module instance).
    """
    if exclude is None:
        return ()
    if isinstance(exclude, (str, type)):
        exclude = [exclude]
    entries = tuple(exclude)
    for entry in entries:
        if isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module)):
            continue
        if isinstance(entry, nn.Module):  # an instance: its repr is the whole module
            got = f"an instance of {type(entry).__name__} (pass the type, exclude=[{type(entry).__name__}])"
        else:
            got = f"{entry!r} ({type(entry).__name__})"
        raise TypeError(
            f"exclude entries are glob patterns of layer names or nn.Module types, got {got}; pass e.g. "
            "exclude=['classifier.*', nn.Linear]."
        )
    return entries


def is_excluded(name: str, patterns: Iterable[ExcludeEntry], module: nn.Module | None = None) -> bool:
    """True when layer ``name`` matches one of the ``exclude=`` glob patterns, or ``module`` is an instance of one
    of its ``nn.Module`` types.

    Example:
        >>> is_excluded("head.fc", ["head.*"]), is_excluded("fc", [nn.Linear], nn.Linear(2, 2))
        (True, True)
    """
    for entry in patterns:
        if isinstance(entry, str):
            if fnmatch.fnmatchcase(name, entry):
                return True
        elif module is not None and isinstance(module, entry):
            return True
    return False


def _swap_weight_layers(gm: fx.GraphModule, path: str, scheme: QuantScheme, mode: QuantMode, exclude, info) -> None:
    """Replace conv/linear (and, in QAT, conv+bn) call sites by their fake-quant twins."""
    if mode is QuantMode.QAT:
        for layer_node, bn_node in foldable_pairs(gm):
            name = _join(path, layer_node.target)
            conv, bn = gm.get_submodule(layer_node.target), gm.get_submodule(bn_node.target)
            if is_excluded(name, exclude, conv):
                continue
            fused = QuantConvBn(conv, bn, info.layer_scheme(name), name)
            set_submodule(gm, layer_node.target, fused)
            bn_node.replace_all_uses_with(layer_node)
            gm.graph.erase_node(bn_node)
            # the BN now lives in the fused module only; a stale top-level reference would survive convert()
            # (delete_all_unused_submodules skips it, as named_modules() visits the shared module only once)
            gm.delete_submodule(bn_node.target)
            info.quantized_layers.append(name)
    else:
        info.folded_bn.extend(_join(path, n) for n in fold_batchnorm(gm))
    done: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in done:
            continue
        module = gm.get_submodule(node.target)
        name = _join(path, node.target)
        if type(module) in QUANTIZABLE_LAYERS:
            if is_excluded(name, exclude, module):
                info.float_layers[name] = "excluded (exclude=...: a user pattern or an accuracy-control choice)"
                continue
            set_submodule(gm, node.target, quantized_layer_from_float(module, info.layer_scheme(name), name))
            info.quantized_layers.append(name)
            done.add(node.target)


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (QuantConvBn, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear))


def _record_float_ops(gm: fx.GraphModule, path: str, info: PrepareInfo) -> None:
    for node in gm.graph.nodes:
        name = _join(path, str(node.target))
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if _is_weight_layer(module) or isinstance(module, FakeQuantize) or name in info.float_layers:
                continue
            if isinstance(module, _NORMS):
                info.float_layers[name] = f"{type(module).__name__} with no conv/linear right before it to fold into"
            elif any(True for _ in module.parameters(recurse=False)) or isinstance(module, nn.ConvTranspose2d):
                info.float_layers[name] = f"{type(module).__name__} has no INT8 kernel in this library yet"
        elif node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear):
            info.float_layers[_join(path, node.name)] = (
                f"functional {node.target.__name__} call; use an nn.{'Linear' if node.target is F.linear else 'ConvNd'}"
                " module so its weight can be quantized"
            )


def _insert_activation_quantizers(gm: fx.GraphModule, path: str, scheme: QuantScheme) -> int:
    points = activation_quant_points(gm, _is_weight_layer)
    if not points:
        return 0
    shared = shared_quant_points(gm)  # before the inserted quantizers change what the pools read
    quantizers = nn.ModuleDict()
    gm.add_module(_ACT_DICT, quantizers)
    for node in points:
        spec = input_spec(scheme.activation) if node.op == "placeholder" else scheme.activation
        key = _quantizer_key(node.name)
        quantizers[key] = FakeQuantize(spec, name=_join(path, key))
        _quantize_output(gm, node, key, {})
    for pool, source in shared.items():  # already on the source's grid: fake-quantize again, observe nothing
        if _quantizer_key(source.name) in quantizers:
            _quantize_output(gm, pool, _quantizer_key(source.name), {"observe": False})
    return len(points)


def _quantizer_key(node_name: str) -> str:
    """The quantizer's name in ``activation_quantizers``: the node's name, unless that is an attribute of the
    ModuleDict itself (a ``.to(dtype)`` call is a node named ``to``, a ``.float()`` one ``float``).

    Example:
        >>> _quantizer_key("conv1"), _quantizer_key("to"), _quantizer_key("float_1")
        ('conv1', 'to_out', 'float_1')
    """
    return f"{node_name}_out" if hasattr(nn.ModuleDict, node_name) else node_name


def _quantize_output(gm: fx.GraphModule, node: fx.Node, quantizer: str, kwargs: dict) -> None:
    """Route every user of ``node`` through ``activation_quantizers.<quantizer>``."""
    with gm.graph.inserting_after(node):
        qnode = gm.graph.call_module(f"{_ACT_DICT}.{quantizer}", (node,), kwargs)
    node.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)


def _prepare_graph(gm: fx.GraphModule, path: str, scheme, mode, exclude, info) -> fx.GraphModule | None:
    before = len(info.quantized_layers)
    _swap_weight_layers(gm, path, scheme, mode, exclude, info)
    if len(info.quantized_layers) == before:
        _record_float_ops(gm, path, info)
        return None
    _detach_metadata_reads(gm)
    _insert_activation_quantizers(gm, path, scheme)
    if scheme.target is Target.DPU:
        use_dpu_avgpool(gm)  # the DPU averages with a dyadic reciprocal: model it in the fake-quant graph
        align_concat_positions(gm)  # Vitis AI: inputs read by a concat alone share its output's fix position
        use_dpu_activations(gm)  # the DPU's Hard-Sigmoid/Hard-Swish divide by 6 as * 2731 / 2**14
    _record_float_ops(gm, path, info)
    gm.delete_all_unused_submodules()
    gm.recompile()
    info.traced.append(path or "<model>")
    return gm


_METADATA_ATTRS = ("device", "dtype", "is_cuda")


def _detach_metadata_reads(gm: fx.GraphModule) -> None:
    """Graph reads of a quantized layer's ``weight``/``bias`` whose only use is ``.device``/``.dtype`` (timm's
    positional encodings build their coordinate grid that way) read a tiny buffer with the same device and dtype
    instead: the exported model stores int8 codes, not the float parameter, so nothing may depend on it by name.
    The buffer is not persistent (checkpoints do not change) and follows ``.to()`` like the weight."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not str(node.target).endswith((".weight", ".bias")):
            continue
        owner_path, _, attr = str(node.target).rpartition(".")
        try:
            owner = gm.get_submodule(owner_path)
        except AttributeError:
            continue
        users = list(node.users)
        metadata_only = users and all(
            u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in _METADATA_ATTRS
            for u in users
        )
        if not isinstance(owner, (_WeightQuantMixin, QuantConvBn)) or not metadata_only:
            continue
        tensor = getattr(owner, attr)
        probe = f"_lq_probe_{owner_path.replace('.', '_')}_{attr}"
        if not hasattr(gm, probe):
            gm.register_buffer(probe, torch.empty(0, dtype=tensor.dtype, device=tensor.device), persistent=False)
        node.target = probe


def _prepare_tree(module: nn.Module, path: str, scheme, mode, exclude, info) -> nn.Module:
    """Trace ``module``; when that fails, recurse into children; quantize leaf conv/linear on their own."""
    if type(module) in QUANTIZABLE_LAYERS:
        if is_excluded(path, exclude, module):
            info.float_layers[path] = "excluded (exclude=...: a user pattern or an accuracy-control choice)"
            return module
        info.quantized_layers.append(path)
        info.module_level.append(path)
        return quantized_layer_from_float(module, info.layer_scheme(path), path, quantize_input=True)
    if not any(True for _ in module.children()):
        return module
    gm, reason = capture(module)
    if gm is not None:
        prepared = _prepare_graph(gm, path, scheme, mode, exclude, info)
        return prepared if prepared is not None else module
    info.untraced[path or "<model>"] = reason or "unknown tracing error"
    for name, child in list(module.named_children()):
        new_child = _prepare_tree(child, _join(path, name), scheme, mode, exclude, info)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def prepare(
    model: nn.Module,
    scheme: QuantScheme,
    *,
    mode: QuantMode | str = QuantMode.PTQ,
    exclude: ExcludeEntry | Iterable[ExcludeEntry] = (),
    inplace: bool = False,
    layer_weight_bits: Mapping[str, int] | None = None,
) -> nn.Module:
    """Insert weight and activation fake-quant into ``model`` (BatchNorm folded for PTQ, kept for QAT).

    Observers start enabled and fake-quant applies once a quantizer has seen data. The model is traced
    with torch.fx; parts that do not trace are handled submodule by submodule (see :func:`prepare_info`).

    Args:
        model: float model.
        scheme: weight/activation specs, e.g. ``scheme_for_target("x86")``.
        mode: ``ptq`` or ``qat``.
        exclude: layers to keep in float: glob patterns of layer names (``"classifier.*"``) and/or ``nn.Module``
            types (``nn.Linear``: every layer of that type or a subclass), e.g. ``["features.0.*", nn.Linear]``.
        inplace: modify ``model`` instead of a deep copy.
        layer_weight_bits: ``{glob pattern: bits}``: weight bit width of the matching layers (first match wins),
            e.g. ``{"features.0.*": 8}`` keeps the stem at 8 bits in a W4A8 model (mixed precision; accuracy control
            chooses these with ``fallback_weight_bits``). Every pattern must match a quantized layer.

    Raises:
        NothingToQuantizeError: the model has no Conv1d/2d/3d or Linear layer that can be quantized.
        TypeError: an ``exclude`` entry that is neither a string nor an ``nn.Module`` type.
        ValueError: unknown mode; a ``layer_weight_bits`` pattern that matches no quantized layer, bits outside
            2..8, or any other width than 8 for the DPU scheme.
    """
    mode = _coerce_enum(QuantMode, mode, "mode")  # type: ignore[assignment]
    exclude = exclude_entries(exclude)
    bits_by_pattern = _check_layer_weight_bits(layer_weight_bits, scheme, model)
    model = model if inplace else copy.deepcopy(model)
    info = PrepareInfo(scheme=scheme, mode=mode, layer_weight_bits=bits_by_pattern)
    prepared = _prepare_tree(model, "", scheme, mode, exclude, info)
    _note_unreached_layers(prepared, info)
    if not info.quantized_layers:
        found = ", ".join(f"{k}: {v}" for k, v in list(info.float_layers.items())[:5]) or "no Conv/Linear layers"
        raise NothingToQuantizeError(
            f"nothing to quantize in {type(model).__name__} ({found}). lightning_quant quantizes nn.Conv1d/2d/3d and "
            "nn.Linear layers; check `exclude=` patterns, or pass the submodule that holds the network."
        )
    _warn_mostly_float(prepared, info)
    _attach_info(prepared, info)
    attach_config_record(prepared, mode=mode, scheme=scheme, exclude=exclude, layer_weight_bits=bits_by_pattern)
    prepared.register_load_state_dict_pre_hook(_check_loaded_state)
    return prepared


def _note_unreached_layers(prepared: nn.Module, info: PrepareInfo) -> None:
    """Every Conv/Linear that neither got a quantizer nor a reason yet gets one, with the fix (no layer stays float
    without saying so): layers inside torch.nn blocks that run as one opaque module, attention projections read
    through ``F.linear``, layers whose weight is used without calling them."""
    inserted = (_WeightQuantMixin, QuantConvBn, FakeQuantize)
    known = set(info.quantized_layers) | set(info.float_layers)
    blocks = {
        name: m
        for name, m in prepared.named_modules()
        if name and is_traceable_leaf(m) and not isinstance(m, (*QUANTIZABLE_LAYERS, *inserted))
    }
    for name, module in prepared.named_modules():
        if not isinstance(module, QUANTIZABLE_LAYERS) or isinstance(module, inserted):
            continue
        if name in known or any(name.startswith(k + ".") for k in known):
            continue
        parent = max((b for b in blocks if name.startswith(b + ".")), key=len, default=None)
        info.float_layers[name] = _unreached_reason(name, parent, blocks.get(parent) if parent else None)


def _unreached_reason(name: str, parent: str | None, block: nn.Module | None) -> str:
    if isinstance(block, nn.MultiheadAttention):
        return (
            f"read through F.linear inside nn.MultiheadAttention '{parent}' (F.multi_head_attention_forward uses "
            "in_proj_weight and out_proj.weight directly; the module is never called). Fix: write the attention from "
            "nn.Linear q/k/v/out layers and F.scaled_dot_product_attention to quantize it"
        )
    if block is not None:
        return (
            f"inside {type(block).__name__} '{parent}', a torch.nn block that runs as one opaque module (fused fast "
            "path / functional calls on its float weights), so no quantizer can wrap this layer. Fix: build the block "
            f"from nn.Linear/nn.Conv layers, or exclude=['{parent}*'] to keep it float knowingly"
        )
    return (
        "never called as a module in forward (its weight is used directly, e.g. through F.linear or weight tying); "
        "call the layer itself so its weight can be quantized"
    )


def _warn_mostly_float(prepared: nn.Module, info: PrepareInfo) -> None:
    """Warn when more than a quarter of the Conv/Linear weights stay float for reasons other than ``exclude=``."""
    sizes = {name: m.weight.numel() for name, m in prepared.named_modules() if isinstance(m, QUANTIZABLE_LAYERS)}
    total = sum(sizes.values())
    unplanned = {n: r for n, r in info.float_layers.items() if n in sizes and not r.startswith("excluded")}
    share = sum(sizes[n] for n in unplanned) / total if total else 0.0
    if share > 0.25:
        first, reason = next(iter(unplanned.items()))
        others = f" and {len(unplanned) - 1} more" if len(unplanned) > 1 else ""
        warnings.warn(
            f"{share:.0%} of the model's Conv/Linear weights stay float ({first}{others}), so the quantized model will "
            f"be barely smaller or faster. {first}: {reason}. prepare_info(model).float_layers and the quantization "
            "report give every layer's reason and fix.",
            UserWarning,
            stacklevel=3,
        )


def _check_loaded_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a prepared network: the saved state must belong to it (see
    :mod:`~lightning_quant.quantizers.state_checks`). A saved record that matches then replaces the network's own (its
    length may differ), and the refinements that produced the loaded weights become this network's (exporters report
    them); a non-strict load of a record for another configuration keeps the network's own record.
    """
    for key in [k for k in state_dict if k.startswith(f"{prefix}_lq_probe_")]:
        del state_dict[key]  # device/dtype probes are not state (older torch kept them through a deepcopy)
    info = module.__dict__.get(_INFO_ATTR)
    strict = bool(args[1]) if len(args) > 1 else True
    legacy = info is not None and info.legacy_state_checked
    if legacy and f"{prefix}{RECORD_ATTR}" not in state_dict:
        state_dict[f"{prefix}{RECORD_ATTR}"] = module._buffers[RECORD_ATTR].clone()  # checked by the callback
    check_quant_state_keys(module, state_dict, prefix, *args)
    saved = state_dict.get(f"{prefix}{RECORD_ATTR}")
    own = config_record(module)
    if saved is None or own is None:
        return
    config = decode_config(saved)
    if not strict:
        try:
            check_saved_config(own, config)
        except CheckpointMismatchError:
            state_dict[f"{prefix}{RECORD_ATTR}"] = module._buffers[RECORD_ATTR].clone()
            return
    write_config_record(module, config)
    if info is not None:
        info.refinements[:] = list(config.get("refinements", []))
        info.restored = True


def _attach_info(model: nn.Module, info: PrepareInfo) -> None:
    """Keep ``info`` on ``model``, also through ``copy.deepcopy``: fx rebuilds a copied GraphModule from its code and
    keeps only the attributes listed in its ``meta`` (a plain module copies its ``__dict__``)."""
    model.__dict__[_INFO_ATTR] = info
    if isinstance(model, fx.GraphModule):
        model.meta.setdefault(_FX_PRESERVED_ATTRIBUTES, {})[_INFO_ATTR] = info


def _check_layer_weight_bits(
    layer_weight_bits: Mapping[str, int] | None, scheme: QuantScheme, model: nn.Module
) -> dict[str, int]:
    """Validate ``prepare(layer_weight_bits=...)`` before the model is touched."""
    bits_by_pattern = dict(layer_weight_bits or {})
    layers = [name for name, m in model.named_modules() if type(m) in QUANTIZABLE_LAYERS]
    for pattern, bits in bits_by_pattern.items():
        dataclasses.replace(scheme.weight, bits=bits)  # QuantSpec names a bad width
        if scheme.target is Target.DPU and bits != 8:
            raise ValueError(
                f"layer_weight_bits={{{pattern!r}: {bits}}}: the DPU runs 8-bit weights only; drop the override or "
                "quantize for another target."
            )
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            raise ValueError(
                f"layer_weight_bits pattern {pattern!r} matches no Conv/Linear layer; layer names look like "
                f"{', '.join(layers[:3])}, ..., {layers[-1] if layers else ''} (dotted module paths, glob patterns)."
            )
    return bits_by_pattern


def prepare_info(model: nn.Module) -> PrepareInfo:
    """The :class:`PrepareInfo` recorded by :func:`prepare`.

    Raises:
        ValueError: ``model`` was not produced by :func:`prepare`.
    """
    info = model.__dict__.get(_INFO_ATTR)
    if info is None:
        raise ValueError("this model was not prepared by lightning_quant; call prepare()/quantize() first.")
    return info


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """All fake-quant modules of ``model`` with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            yield name, module


def set_observers(model: nn.Module, enabled: bool) -> None:
    for _, fq in iter_quantizers(model):
        fq.enable_observer(enabled)


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for _, fq in iter_quantizers(model):
        fq.enable_fake_quant(enabled)


def freeze_bn(model: nn.Module, frozen: bool = True) -> None:
    """Switch every QAT conv+BN to running statistics (``frozen=True``) or back to batch statistics."""
    for module in model.modules():
        if isinstance(module, QuantConvBn):
            module.freeze_bn(frozen)


def require_calibrated(model: nn.Module, action: str = "convert") -> None:
    """Raise when any quantizer has not seen data yet.

    Raises:
        NotCalibratedError: lists the uncalibrated quantizers and how to calibrate.
    """
    missing = [name for name, fq in iter_quantizers(model) if not fq.calibrated.item()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NotCalibratedError(
            f"cannot {action}: {len(missing)} quantizer(s) have not been calibrated ({shown}). Run calibration first: "
            "lightning_quant.quantize(model, data), trainer.validate with QuantCallback(mode='ptq'), or QAT training."
        )


def convert(model: nn.Module) -> nn.Module:
    """Frozen copy for export: QAT conv+BN folded into fake-quant convs, observers off, fake-quant on.

    Raises:
        NotCalibratedError: some quantizer never saw data.
    """
    require_calibrated(model, "convert")
    frozen = copy.deepcopy(model)
    for name, module in list(frozen.named_modules()):
        if isinstance(module, QuantConvBn):
            set_submodule(frozen, name, module.to_folded())
    set_observers(frozen, False)
    set_fake_quant(frozen, True)
    if _INFO_ATTR in model.__dict__:
        _attach_info(frozen, model.__dict__[_INFO_ATTR])  # the same record: steps noted later reach both
    return frozen.eval()


def warn_degenerate_ranges(model: nn.Module, *, stacklevel: int = 2) -> list[str]:
    """Warn about activation quantizers whose calibrated range has zero width, and return their names.

    A range of zero width (every observed value the same, e.g. all-zero calibration images) gives no usable
    scale: the quantizer then maps every other value onto the range's edge. It nearly always means the data
    loading or normalization is broken.

    Example:
        >>> import torch, warnings
        >>> from lightning_quant.calibration import calibrate
        >>> from lightning_quant.config import scheme_for_target
        >>> qmodel = prepare(nn.Sequential(nn.Linear(4, 2)), scheme_for_target("x86"))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = calibrate(qmodel, [torch.zeros(2, 4)], progress=False)
        >>> "range of zero width" in str(caught[-1].message)
        True
    """
    flat: list[tuple[str, float]] = []
    for name, fq in iter_quantizers(model):
        if name.endswith(("weight_fake_quant", "bias_fake_quant")) or not fq.calibrated.item():
            continue
        low, high = fq.observer.min_val.detach(), fq.observer.max_val.detach()
        if low.numel() and torch.isfinite(low).all() and torch.isfinite(high).all():
            if float(high.max()) == float(low.min()):
                flat.append((name, float(low.min())))
    if flat:
        listed = ", ".join(f"{name} (every value {value:g})" for name, value in flat[:5])
        more = f" and {len(flat) - 5} more" if len(flat) > 5 else ""
        warnings.warn(
            f"{len(flat)} quantizer(s) observed a range of zero width during calibration: {listed}{more}. Their "
            "scale is a placeholder and every other value is clipped to (almost) that one value. The calibration "
            "data is probably all zeros or constant: check the dataset path, the image decoding and the normalization.",
            UserWarning,
            stacklevel=stacklevel,
        )
    return [name for name, _ in flat]
