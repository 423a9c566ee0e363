"""Vitis AI XModel export: an uncompiled XIR graph of a DPU-quantized model, plus its Vitis-style quant_info JSON.

The file is what Vitis AI's own quantizer writes as ``<Model>_int.xmodel``: an **uncompiled XIR graph** (NHWC,
float32 ``const`` ops already on their ``2**-fix_point`` grid, each followed by a ``fix`` op). It does not run
on a board as is: compile it with ``vai_c_xir`` for your DPU arch (``vai_c_xir -x model.xmodel -a arch.json
-o out/``). :mod:`lightning_quant.export.xmodel_interpreter` runs it in numpy to check it.

The fix positions go beside it in a file named after it (``model.xmodel`` -> ``model.quant_info.json``, Vitis AI's
``quant_info.json`` layout), so two exports into one folder keep their own pairs; :func:`read_quant_info` reads
a pair back (and the plain ``quant_info.json`` earlier versions wrote, when it belongs to that XModel).

Example:
    >>> import tempfile, pathlib, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize, export_xmodel
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    >>> q = quantize(model, [torch.randn(2, 3, 8, 8)], target="dpu", progress=False)
    >>> path = export_xmodel(q, pathlib.Path(tempfile.mkdtemp()) / "net.xmodel", torch.randn(1, 3, 8, 8))
    >>> sorted(p.name for p in path.parent.iterdir())
    ['net.quant_info.json', 'net.xmodel']
    >>> read_quant_info(path)["graph_md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_quant._version import __version__
from lightning_quant.capture.patterns import shared_quantizer_calls
from lightning_quant.config import ScaleType
from lightning_quant.export._atomic import atomic_path, atomic_paths, check_output_path
from lightning_quant.export.xir_builder import XIRBuilder, sanitize
from lightning_quant.export.xmodel_lowering import UnsupportedOpError, lower_graph
from lightning_quant.quantizers.dpu import fix_pos_from_scale
from lightning_quant.quantizers.dpu_concat import align_concat_positions
from lightning_quant.quantizers.dpu_shifts import enforce_dpu_shifts
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.modules import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from lightning_quant.quantizers.prepare import convert, iter_quantizers, prepare_info

__all__ = [
    "LEGACY_QUANT_INFO_NAME",
    "XMODEL_LABEL",
    "UnsupportedOpError",
    "export_xmodel",
    "quant_info",
    "quant_info_path_for",
    "read_quant_info",
    "untraced_parts",
]

XMODEL_LABEL = "uncompiled XIR graph; compile with vai_c_xir for your DPU arch"
_LAYERS = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)
LEGACY_QUANT_INFO_NAME = "quant_info.json"  # what earlier versions (and Vitis AI) wrote beside every XModel


def quant_info_path_for(xmodel_path: str | os.PathLike) -> Path:
    """The quant_info file :func:`export_xmodel` writes beside ``xmodel_path``: ``model.xmodel`` ->
    ``model.quant_info.json``.

    Example:
        >>> quant_info_path_for("out/model_int8.xmodel").as_posix()
        'out/model_int8.quant_info.json'
    """
    path = Path(xmodel_path)
    return path.with_name(f"{path.stem}.quant_info.json")


def read_quant_info(xmodel_path: str | os.PathLike) -> dict[str, Any]:
    """The quant_info of an exported XModel: its pair file (:func:`quant_info_path_for`), or else the plain
    ``quant_info.json`` beside it that earlier versions wrote, when that file's ``graph_md5`` is this XModel's.

    Raises:
        FileNotFoundError: neither file exists (export with ``quant_info_path=True``, the default).
        ValueError: the file's ``graph_md5`` is not the XModel's: it belongs to another export (re-export both).
    """
    path = Path(xmodel_path)
    paired, legacy = quant_info_path_for(path), path.with_name(LEGACY_QUANT_INFO_NAME)
    info_path = paired if paired.is_file() else legacy
    if not info_path.is_file():
        raise FileNotFoundError(
            f"no quant_info beside {str(path)!r}: looked for {paired.name} and {legacy.name}. Export again with "
            "export_xmodel(qmodel, path, example_input) (it writes the pair)."
        )
    info = json.loads(info_path.read_text())
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if info.get("graph_md5") != digest:
        raise ValueError(
            f"{str(info_path)!r} belongs to another export: its graph_md5 {info.get('graph_md5')!r} is not the md5 "
            f"of {path.name} ({digest}). Export the model again to write a matching pair."
        )
    return info


def _check_dpu_model(qmodel: nn.Module) -> None:
    """Raise unless every quantizer is a signed symmetric per-tensor 8-bit power-of-two one (the DPU scheme)."""
    try:
        info = prepare_info(qmodel)
    except ValueError:
        raise ValueError(
            "export_xmodel needs a model from lightning_quant.quantize(model, data, target='dpu'); this one was "
            "not prepared by lightning_quant."
        ) from None
    for name, fq in iter_quantizers(qmodel):
        s = fq.spec
        if s.scale_type is not ScaleType.POWER_OF_TWO or s.per_channel or not (s.symmetric and s.signed) or s.bits != 8:
            raise ValueError(
                f"export_xmodel: quantizer {name!r} is not a DPU quantizer (int8, symmetric, per-tensor, power-of-two "
                f"scale); the model was quantized for {getattr(info.scheme.target, 'value', 'a custom scheme')!s}. "
                "Quantize with quantize(model, data, target='dpu')."
            )
    untraced = untraced_parts(qmodel)
    if untraced:
        raise ValueError(
            f"export_xmodel needs a model torch.fx traced whole; these parts were not ({untraced}). Make the forward "
            "traceable (no data-dependent Python control flow) or export the traceable submodule."
        )


def untraced_parts(qmodel: nn.Module) -> str | None:
    """The parts of a prepared model that torch.fx did not trace, with the reasons, or None when it is one graph
    (what the XModel export and the DPU inspector need)."""
    info = prepare_info(qmodel)
    if info.untraced or not isinstance(qmodel, fx.GraphModule):
        return ", ".join(f"{k}: {v}" for k, v in info.untraced.items()) or "the model is not one traced graph"
    return None


def _example_tuple(example_input: Any) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, tuple) and all(isinstance(t, torch.Tensor) for t in example_input):
        return example_input
    raise TypeError(
        f"example_input must be a tensor or a tuple of tensors (got {type(example_input).__name__}); pass e.g. "
        "torch.randn(1, 3, 224, 224)."
    )


def build_xir_graph(qmodel: nn.Module, example_input: Any, graph_name: str | None = None):
    """The XIR ``Graph`` message of a calibrated DPU model, and the frozen model it was built from.

    Raises:
        ValueError: not a traced DPU model (see :func:`export_xmodel`).
        UnsupportedOpError: an op with no XIR lowering.
    """
    _check_dpu_model(qmodel)
    inputs = _example_tuple(example_input)
    frozen = convert(qmodel).cpu()
    moved = [*align_concat_positions(frozen), *enforce_dpu_shifts(frozen)]  # concat rule first, then the shifts
    if moved:
        warnings.warn(
            f"export_xmodel moved {len(moved)} fix position(s) to align concat inputs and meet the DPU's shift "
            "constraints, so the file differs from qmodel; call align_concat_positions(qmodel) (in "
            "lightning_quant.quantizers.dpu_concat), then lightning_quant.quantizers.dpu_shifts.enforce_dpu_shifts("
            "qmodel) first.",
            stacklevel=3,
        )
    with torch.no_grad():
        ShapeProp(frozen).propagate(*(t.cpu() for t in inputs))
    builder = XIRBuilder(graph_name or type(qmodel).__name__)
    lower_graph(frozen, builder)
    builder.graph.attr["lightning_quant"].string_value = XMODEL_LABEL
    return builder.graph, frozen


def quant_info(qmodel: nn.Module, graph_name: str | None = None) -> dict[str, Any]:
    """Vitis-style fix positions: ``{"param": {"Net::conv1.weight": [[8, fp]]}, "output": {...}, ...}``.

    Parameters are keyed ``<Net>::<layer>.weight`` / ``.bias``; outputs ``<Net>::<node>`` with the fx node whose
    output the quantizer holds (the network input included, as Vitis AI does).
    """
    prefix = sanitize(graph_name or type(qmodel).__name__)
    param: dict[str, list[list[int]]] = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, _LAYERS):
            param[f"{prefix}::{name}.weight"] = [[8, fix_pos_from_scale(module.weight_fake_quant.scale)]]
            if getattr(module, "bias_fake_quant", None) is not None:
                param[f"{prefix}::{name}.bias"] = [[8, fix_pos_from_scale(module.bias_fake_quant.scale)]]
    output: dict[str, list[list[int]]] = {}
    for name, fq in iter_quantizers(qmodel):
        if isinstance(fq, FakeQuantize) and not name.endswith(("weight_fake_quant", "bias_fake_quant")):
            output[f"{prefix}::{name.rpartition('.')[2]}"] = [[fq.spec.bits, fix_pos_from_scale(fq.scale)]]
    # a max pool reuses its input's quantizer (called again with observe=False); Vitis AI lists its output too
    for _, gm, node in shared_quantizer_calls(qmodel):
        fq = gm.get_submodule(node.target)
        output[f"{prefix}::{node.args[0].name}"] = [[fq.spec.bits, fix_pos_from_scale(fq.scale)]]

    steps = prepare_info(qmodel).refinements
    tuned, corrected = "fast_finetune" in steps, "bias_correction" in steps
    return {"param": param, "output": output, "input": {}, "fast_finetuned": tuned, "bias_corrected": corrected,
            "version": f"lightning_quant {__version__}", "graph_md5": ""}  # fmt: skip


def format_quant_info(info: dict[str, Any]) -> str:
    """The JSON text in Vitis AI's layout (sections opened on their own line, one ``"name":[[8,fp]]`` per line)."""
    lines = ["{"]
    items = list(info.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, dict):
            entries = [f"    {json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in value.items()]
            body = ",\n".join(entries) if entries else ""
            lines += [f"  {json.dumps(key)}:", "  {", body, f"  }}{comma}"]
        else:
            lines.append(f"  {json.dumps(key)}:{json.dumps(value)}{comma}")
    return "\n".join(lines) + "\n}"


def export_xmodel(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    *,
    quant_info_path: str | os.PathLike | None | bool = True,
    graph_name: str | None = None,
) -> Path:
    """Write a DPU-quantized model as an **uncompiled XIR graph** (``.xmodel``) and its quant_info JSON.

    Compile the file with ``vai_c_xir`` for your DPU arch before deployment. The two files are a pair named
    after ``path`` (``model.xmodel`` + ``model.quant_info.json``), so exports into one folder do not overwrite
    each other's, and they are replaced together: on any error neither is left behind and an earlier pair
    stays as it was, its ``graph_md5`` still the md5 of its own XModel.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from torch import nn
        >>> from lightning_quant import quantize
        >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)],
        ...              target="dpu", progress=False)
        >>> p = export_xmodel(q, pathlib.Path(tempfile.mkdtemp()) / "m.xmodel", torch.randn(1, 3, 8, 8))
        >>> p.suffix, p.stat().st_size > 0
        ('.xmodel', True)

    Args:
        qmodel: a calibrated model from ``quantize(model, data, target="dpu")`` (or QAT with the DPU scheme).
        path: destination ``*.xmodel``.
        example_input: a tensor (or tuple of tensors) of the shape the DPU will see; batch size 1 is typical.
        quant_info_path: where to write the Vitis-style quant_info JSON (Vitis AI's ``quant_info.json``
            layout); True (default) writes ``<stem>.quant_info.json`` beside ``path``
            (:func:`quant_info_path_for`); None or False writes none and removes a ``<stem>.quant_info.json``
            an earlier export left beside ``path`` (it would describe another graph).
        graph_name: the XIR graph name (default: the model's class name).

    Returns:
        The path of the written XModel.

    Raises:
        ValueError: a bad path (a directory, not ``.xmodel``; a ``quant_info_path`` not ``.json``), a model not
            quantized with the DPU scheme, or one not traced whole.
        PermissionError: the destination folder is read-only.
        UnsupportedOpError: (a ValueError) an op with no XIR lowering; the message names it.
        TypeError: ``example_input`` is not a tensor or tuple of tensors.
        NotCalibratedError: some quantizer never saw data.
        OSError: the folder does not accept the files (full); the earlier pair is then left as it was.
    """
    path = check_output_path(path, (".xmodel",))
    info_path = quant_info_path_for(path) if quant_info_path is True else quant_info_path or None
    if info_path is not None:
        info_path = check_output_path(info_path, (".json",))
    graph, frozen = build_xir_graph(qmodel, example_input, graph_name)
    data = graph.SerializeToString()
    if info_path is None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        quant_info_path_for(path).unlink(missing_ok=True)  # an earlier pair's file would describe another graph
        return path
    info = quant_info(frozen, graph_name or type(qmodel).__name__)
    info["graph_md5"] = hashlib.md5(data).hexdigest()
    with atomic_paths(path, info_path) as (tmp, tmp_info):
        tmp.write_bytes(data)
        tmp_info.write_text(format_quant_info(info))
    return path
