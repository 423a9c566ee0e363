"""Per-layer dump of a DPU model and of its XModel for one input, and where the two first differ ("deploy_check").

Vitis AI's quantizer (vai_q_pytorch) writes, with ``export_xmodel(deploy_check=True)``, the int8 codes of every
quantized tensor of its fake-quant model into ``deploy_check_data_int/<Model>/``, one file per tensor, so that a
board's per-layer dump can be checked against them. This module writes the same kind of folder for both sides:

- :func:`dump_fake_quant`: every FakeQuantize output of the fake-quant model (the network input, every activation,
  and the weights and bias of each quantized layer) as integer codes with its fix position (``x = q * 2**-fix_pos``),
- :func:`dump_xmodel`: every op output of an ``.xmodel`` run by the numpy XIR interpreter (codes for ``fix`` ops,
  float32 for the others: any XModel the interpreter runs, Vitis AI's own ``LeNet_int.xmodel`` included),

both keyed by **XIR op name**: a FakeQuantize node is named after the ``fix`` op the XModel lowering makes of it
(:func:`~lightning_quant.export.xmodel_lowering.lower_graph` reports the node -> op mapping), a weight or bias after
the ``fix`` op of its constant. :func:`compare_dumps` then lists, op by op in graph order, the largest code
difference and the number of differing values, and names the first op that differs by more than a tolerance.

A dump folder (``out_dir``)::

    out_dir/
      dump.npz        every tensor by op name: integer codes (int8 for 8 bits) for fixed ops, float32 for others
      dump.json       {"side", "graph", "order": [op names in graph order], "fix_pos": {op: position}, ...}
      <Graph>/        the per-tensor files, as vai_q_pytorch's deploy_check_data_int/<Model>/:
        <op>.bin      the tensor flattened in C order (NHWC activations, OHWI weights): int8 codes or float32
        shape.txt     one "[1, 28, 28, 6]: <op>" line per tensor

What follows vai_q_pytorch (``DeployChecker`` in ``nndct_shared/compile/deploy_checker.py`` of Vitis AI 3.5): one
``<name>.bin`` per tensor in the ``<Model>/`` folder, the name with every character outside ``[0-9A-Za-z]`` made
``_`` and quantized tensors suffixed ``_fix`` (our op names already are: ``Net__conv1_weight_fix``, the name of
the XModel's ``fix`` op, as in Vitis AI's own XModels), raw int8 codes for quantized tensors and float32 values
for float ones, ``data_format="txt"`` for one value per line instead, ``shape.txt`` with ``<shape>: <name>`` lines,
and the XIR layout (vai_q_pytorch permutes activations to NHWC and weights to OHWI before dumping). What is ours:
``out_dir`` stands for ``deploy_check_data_int``; the fake-quant side holds the quantized tensors only (Vitis AI also
writes every node's float output); ``dump.npz`` + ``dump.json`` hold the whole dump for :func:`compare_dumps`. A dump
replaces ``out_dir`` whole and atomically: a failed dump leaves an earlier one as it was.

Example:
    >>> import tempfile, pathlib, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize, export_xmodel
    >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)],
    ...              target="dpu", progress=False)
    >>> x, out = torch.randn(1, 3, 8, 8), pathlib.Path(tempfile.mkdtemp())
    >>> path = export_xmodel(q, out / "m.xmodel", x)
    >>> report = compare_dumps(dump_fake_quant(q, x, out / "fake_quant"), dump_xmodel(path, x, out / "xmodel"))
    >>> report.ok, report.first_difference, [op.name for op in report.ops][:3]
    (True, None, ['Sequential__input_1_fix', 'Sequential__0_weight_fix', 'Sequential__0_bias_fix'])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_quant._version import __version__
from lightning_quant.export._atomic import atomic_dir
from lightning_quant.export.xir_builder import XIRBuilder
from lightning_quant.export.xmodel import _check_dpu_model, _example_tuple
from lightning_quant.export.xmodel_interpreter import XModelInterpreter, attr_value, load_xmodel
from lightning_quant.export.xmodel_lowering import Value, lower_graph
from lightning_quant.quantizers.dpu_activations import DPUHardswish, dpu_hardswish_factor
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.prepare import convert

__all__ = [
    "DATA_FORMATS",
    "DeployCheckError",
    "DeployCheckReport",
    "Dump",
    "OpComparison",
    "compare_dumps",
    "dump_fake_quant",
    "dump_xmodel",
    "read_dump",
]

DATA_FORMATS = ("bin", "txt")  # vai_q_pytorch's DeployChecker formats
DUMP_NPZ, DUMP_JSON, SHAPE_FILE = "dump.npz", "dump.json", "shape.txt"
_FORMAT_NAME = "lightning_quant deploy_check dump"


class DeployCheckError(RuntimeError):
    """The XModel and the fake-quant model differ beyond the tolerance; the message names the first differing op."""


# -- dumping -------------------------------------------------------------------------------------------------------
def _check_out_dir(out_dir: str | os.PathLike, data_format: str) -> Path:
    """Validate a dump destination before any work: a dump replaces its folder whole, so only a new folder, an
    empty one or an earlier dump may be replaced."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format={data_format!r} is not allowed; use one of {', '.join(DATA_FORMATS)}.")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; a dump is a folder: pass a new folder such as {f'{path}_dump'!r}.")
    if path.is_dir() and any(path.iterdir()) and not (path / DUMP_JSON).is_file():
        raise ValueError(
            f"{str(path)!r} holds other files and no earlier dump ({DUMP_JSON}); a dump replaces its folder whole, so "
            "it is not written there. Pass a new or empty folder, or the folder of an earlier dump."
        )
    return path


def _code_dtype(bit_width: int, signed: bool) -> np.dtype:
    bits = next(b for b in (8, 16, 32, 64) if bit_width <= b)
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def _codes(values: np.ndarray, fix_pos: int, bit_width: int = 8, signed: bool = True) -> np.ndarray:
    """Integer codes of values on the ``2**-fix_pos`` grid (exact: ``values * 2**fix_pos`` is an integer)."""
    return np.rint(np.asarray(values, np.float64) * 2.0**fix_pos).astype(_code_dtype(bit_width, signed))


def _file_stem(name: str, taken: set[str]) -> str:
    """vai_q_pytorch's file name of a tensor: every character outside [0-9A-Za-z] becomes ``_`` (made unique)."""
    stem = re.sub(r"[^0-9A-Za-z]", "_", name)
    candidate, i = stem, 1
    while candidate in taken:
        candidate, i = f"{stem}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _write_dump(
    out_dir: Path,
    *,
    side: str,
    graph: str,
    tensors: dict[str, np.ndarray],
    fix_pos: dict[str, int],
    data_format: str,
    extra: dict[str, Any],
) -> Path:
    """Write ``tensors`` (graph order) into ``out_dir`` atomically: per-tensor files, ``dump.npz``, ``dump.json``."""
    with atomic_dir(out_dir) as tmp:
        folder = tmp / _file_stem(graph, set())
        folder.mkdir()
        taken: set[str] = set()
        files, shapes = {}, []
        for name, data in tensors.items():
            stem = _file_stem(name, taken)
            files[name] = f"{folder.name}/{stem}.{data_format}"
            flat = data.reshape(-1)
            if data_format == "bin":
                flat.tofile(folder / f"{stem}.bin")
            else:
                flat.tofile(folder / f"{stem}.txt", sep="\n", format="%d" if name in fix_pos else "%12g")
            shapes.append(f"{list(data.shape)}: {name}\n")
        (folder / SHAPE_FILE).write_text("".join(shapes))
        np.savez(tmp / DUMP_NPZ, **tensors)
        meta = {"format": _FORMAT_NAME, "version": f"lightning_quant {__version__}", "side": side, "graph": graph,
                "layout": "XIR: NHWC activations, OHWI conv weights, [1, kh, kw, C] depthwise weights",
                "order": list(tensors), "fix_pos": fix_pos, "files": files, **extra}  # fmt: skip
        (tmp / DUMP_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


class _Recorder(ShapeProp):
    """Shape propagation (which the lowering needs) that also keeps every FakeQuantize node's output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.recorded: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, FakeQuantize):
            self.recorded[n.name] = out.detach().clone()
        elif isinstance(module, DPUHardswish):  # its 8-bit factor is a fix op of the XModel (lower_graph's values)
            self.recorded[f"{n.name}.hsigmoid"] = dpu_hardswish_factor(self.fetch_args_kwargs_from_env(n)[0][0])
        return out


def _xir_layout(tensor: torch.Tensor, value: Value) -> np.ndarray:
    """A PyTorch activation in the layout of the XIR op holding it: NCHW -> NHWC; a flattened (C, H, W) row (or a
    concat of such rows) as the XModel lays it out, (H, W, C) part by part."""
    x = tensor.detach().double().numpy()
    if x.ndim == 4:
        return x.transpose(0, 2, 3, 1)
    columns = value.nhwc_columns() if x.ndim == 2 else None
    return x if columns is None else x[:, columns]


def _const_data(op: Any) -> np.ndarray:
    return np.frombuffer(attr_value(op.attr["data"]), "<f4").astype(np.float64).reshape(attr_value(op.attr["shape"]))


def dump_fake_quant(
    qmodel: nn.Module,
    example_input: Any,
    out_dir: str | os.PathLike,
    *,
    graph_name: str | None = None,
    data_format: str = "bin",
) -> Path:
    """Dump every quantized tensor of a DPU fake-quant model for one input, keyed by the XModel's op names.

    The model is run as :func:`~lightning_quant.quantizers.prepare.convert` freezes it for export (QAT conv+BN
    folded), with its own fix positions: a position that ``export_xmodel`` moved to meet the DPU's shift limits shows
    up in :func:`compare_dumps` as a differing op. Activations (the network input included) are the FakeQuantize
    outputs; weights and biases are the quantized constants the XModel lowering makes of them (OHWI, linear columns
    in NHWC order), so the two dumps of one export have the same ops.

    Example:
        >>> import json, tempfile, pathlib, torch
        >>> from torch import nn
        >>> from lightning_quant import quantize
        >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)],
        ...              target="dpu", progress=False)
        >>> out = dump_fake_quant(q, torch.randn(1, 3, 8, 8), pathlib.Path(tempfile.mkdtemp()) / "fq", graph_name="Net")
        >>> sorted(p.name for p in out.iterdir()), json.loads((out / "dump.json").read_text())["order"]
        (['Net', 'dump.json', 'dump.npz'], ['Net__input_1_fix', 'Net__0_weight_fix', 'Net__0_bias_fix', 'Net___1_fix'])
        >>> read_dump(out).tensors["Net___1_fix"].dtype, (out / "Net" / "Net___1_fix.bin").stat().st_size  # 1x6x6x4
        (dtype('int8'), 144)

    Args:
        qmodel: a calibrated model from ``quantize(model, data, target="dpu")`` (or QAT with the DPU scheme).
        example_input: a tensor (or tuple of tensors) in PyTorch layout; batch 1 is typical.
        out_dir: the dump folder (see the module docs); replaced whole, so a new one or an earlier dump.
        graph_name: the XIR graph name the XModel was exported with (``export_xmodel``'s default: the model's class
            name); op names start with it.
        data_format: ``bin`` (raw values) or ``txt`` (one value per line) for the per-tensor files.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``out_dir`` is a file or a folder holding other files; an unknown ``data_format``; a model not
            quantized with the DPU scheme or not traced whole (as ``export_xmodel``).
        UnsupportedOpError: (a ValueError) an op with no XIR lowering; the message names it.
        TypeError: ``example_input`` is not a tensor or tuple of tensors.
        NotCalibratedError: some quantizer never saw data.
        OSError: the folder cannot be written; an earlier dump there is then left as it was.
    """
    out = _check_out_dir(out_dir, data_format)
    _check_dpu_model(qmodel)
    inputs = tuple(t.detach().cpu() for t in _example_tuple(example_input))
    frozen = convert(qmodel).cpu()
    recorder = _Recorder(frozen)
    with torch.no_grad():
        recorder.propagate(*inputs)
    builder = XIRBuilder(graph_name or type(qmodel).__name__)
    values: dict[str, Value] = {}
    lower_graph(frozen, builder, values=values)
    node_of_fix = {values[name].op: name for name in recorder.recorded}
    ops = {op.name: op for op in builder.graph.op_node}
    tensors: dict[str, np.ndarray] = {}
    fix_pos: dict[str, int] = {}
    for op in builder.graph.op_node:
        if op.type != "fix":
            continue
        attrs = {k: attr_value(v) for k, v in op.attr.items()}
        source = ops[op.args[0].ops[0]]
        if op.name in node_of_fix:
            node = node_of_fix[op.name]
            data = _xir_layout(recorder.recorded[node], values[node])
        elif source.type == "const":
            data = _const_data(source)
        else:  # the lowering made a fix op of something else: name it rather than dump a wrong tensor
            raise RuntimeError(
                f"dump_fake_quant: fix op {op.name!r} follows neither a FakeQuantize node nor a constant; this "
                "lowering is not supported by the dump (please report it with the model)."
            )
        fix_pos[op.name] = int(attrs["fix_point"])
        tensors[op.name] = _codes(data, fix_pos[op.name], attrs["bit_width"], attrs["if_signed"])
    extra = {"model": type(qmodel).__name__, "input_shapes": [list(t.shape) for t in inputs]}
    return _write_dump(out, side="fake_quant", graph=builder.prefix, tensors=tensors, fix_pos=fix_pos,
                       data_format=data_format, extra=extra)  # fmt: skip


def dump_xmodel(
    xmodel_path: str | os.PathLike,
    example_input: Any,
    out_dir: str | os.PathLike,
    *,
    nchw: bool = True,
    data_format: str = "bin",
) -> Path:
    """Dump every op output of an XModel run by the numpy XIR interpreter for one input, keyed by op name.

    ``fix`` ops are written as integer codes with their fix position, every other op (``data``, ``const``, ``conv2d``
    before its ``fix``, ...) as float32 values.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from torch import nn
        >>> from lightning_quant import quantize, export_xmodel
        >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)],
        ...              target="dpu", progress=False)
        >>> x, out = torch.randn(1, 3, 8, 8), pathlib.Path(tempfile.mkdtemp())
        >>> dump = read_dump(dump_xmodel(export_xmodel(q, out / "m.xmodel", x, graph_name="Net"), x, out / "xm"))
        >>> [(name, str(dump.tensors[name].dtype)) for name in dump.order[:3]]
        [('Net__input_1', 'float32'), ('Net__input_1_fix', 'int8'), ('Net__0_weight', 'float32')]

    Args:
        xmodel_path: the ``.xmodel`` file (an uncompiled XIR graph).
        example_input: a tensor or array (or a tuple, one per ``data`` op in graph order).
        out_dir: the dump folder (see the module docs); replaced whole, so a new one or an earlier dump.
        nchw: the inputs are in PyTorch's NCHW layout (default) and are fed as NHWC; False feeds them as given.
        data_format: ``bin`` (raw values) or ``txt`` (one value per line) for the per-tensor files.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``out_dir`` is a file or a folder holding other files; an unknown ``data_format``; the number
            of inputs is not the graph's.
        FileNotFoundError: no such XModel.
        KeyError: an op type the interpreter does not run (named).
        OSError: the folder cannot be written; an earlier dump there is then left as it was.
    """
    out = _check_out_dir(out_dir, data_format)
    path = Path(xmodel_path)
    if not path.is_file():
        raise FileNotFoundError(f"no XModel at {str(path)!r}; write one with export_xmodel(qmodel, path, example).")
    raw = path.read_bytes()
    graph = load_xmodel(path)
    interpreter = XModelInterpreter(graph)
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in inputs]
    if len(arrays) != len(interpreter.inputs):
        raise ValueError(
            f"the graph has {len(interpreter.inputs)} input(s) ({interpreter.inputs}); {len(arrays)} given."
        )
    feeds = {
        name: x.transpose(0, 2, 3, 1) if nchw and x.ndim == 4 else x
        for name, x in zip(interpreter.inputs, arrays, strict=True)
    }
    outputs = interpreter.run(feeds, keep_all=True)
    tensors: dict[str, np.ndarray] = {}
    fix_pos: dict[str, int] = {}
    for op in graph.op_node:
        if op.type == "fix":
            attrs = {k: attr_value(v) for k, v in op.attr.items()}
            fix_pos[op.name] = int(attrs["fix_point"])
            tensors[op.name] = _codes(outputs[op.name], fix_pos[op.name], attrs["bit_width"], attrs["if_signed"])
        else:
            tensors[op.name] = np.asarray(outputs[op.name], np.float32)
    extra = {"xmodel_md5": hashlib.md5(raw).hexdigest(), "input_shapes": [list(x.shape) for x in arrays]}
    return _write_dump(out, side="xmodel", graph=graph.name, tensors=tensors, fix_pos=fix_pos,
                       data_format=data_format, extra=extra)  # fmt: skip


@dataclass(frozen=True)
class Dump:
    """A dump folder read back: its tensors by op name (graph order), fix positions and metadata."""

    path: Path
    side: str
    graph: str
    order: list[str]
    tensors: dict[str, np.ndarray]
    fix_pos: dict[str, int]
    meta: dict[str, Any] = field(repr=False)


def read_dump(folder: str | os.PathLike) -> Dump:
    """Read a folder written by :func:`dump_fake_quant` or :func:`dump_xmodel`.

    Raises:
        FileNotFoundError: the folder has no ``dump.json`` + ``dump.npz`` (the message says how to write them).
        ValueError: ``dump.json`` is not a dump's, or it and ``dump.npz`` do not list the same tensors.
    """
    path = Path(folder)
    meta_path, npz_path = path / DUMP_JSON, path / DUMP_NPZ
    if not meta_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} holds no dump ({DUMP_JSON} + {DUMP_NPZ}); write one with dump_fake_quant(qmodel, x, "
            "folder) or dump_xmodel(path, x, folder)."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT_NAME:
        raise ValueError(f"{str(meta_path)!r} is not a deploy_check dump's metadata (format {meta.get('format')!r}).")
    with np.load(npz_path, allow_pickle=False) as npz:
        tensors = {name: npz[name] for name in meta["order"] if name in npz.files}
        if len(tensors) != len(meta["order"]) or len(npz.files) != len(tensors):
            raise ValueError(f"{str(path)!r}: {DUMP_NPZ} and {DUMP_JSON} list different tensors; dump again.")
    fix_pos = {name: int(v) for name, v in meta["fix_pos"].items()}
    return Dump(path, meta["side"], meta["graph"], list(meta["order"]), tensors, fix_pos, meta)


# -- comparing -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpComparison:
    """One quantized op of both dumps: fix positions, the largest code difference and how many values differ.

    Codes are compared on the finer of the two fix positions (the codes themselves when the positions agree).
    """

    name: str
    shape: tuple[int, ...]
    fix_pos: tuple[int | None, int | None]  # (fake-quant, xmodel); None: not a fixed tensor on that side
    max_abs_diff: int | None  # None when the shapes (or kinds) differ
    num_differing: int | None
    num_elements: int
    status: str  # equal | within tolerance | differs | fix position differs | shape differs | not fixed on one side

    @property
    def differs(self) -> bool:
        return self.status not in ("equal", "within tolerance")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "fix_pos_fake_quant": self.fix_pos[0],
                "fix_pos_xmodel": self.fix_pos[1], "max_abs_diff": self.max_abs_diff, "status": self.status,
                "num_differing": self.num_differing, "num_elements": self.num_elements}  # fmt: skip


@dataclass(frozen=True)
class DeployCheckReport:
    """:func:`compare_dumps`'s result: ``ops`` in graph order, the first differing op and the one-sided ops."""

    fake_quant_dir: str
    xmodel_dir: str
    tolerance: int
    ops: list[OpComparison]
    only_fake_quant: list[str]
    only_xmodel: list[str]
    not_compared: list[str]  # float ops (the XModel dump's; the fake-quant dump holds quantized tensors only)

    @property
    def first_difference(self) -> str | None:
        """The first op, in graph order, whose codes differ by more than ``tolerance`` (or whose fix position or
        shape differs); None when every op both dumps hold agrees."""
        return next((op.name for op in self.ops if op.differs), None)

    @property
    def ok(self) -> bool:
        """Every quantized op is in both dumps and agrees within the tolerance."""
        return self.first_difference is None and not self.only_fake_quant and not self.only_xmodel

    def summary(self) -> str:
        """One line: agree, or the first differing op and how."""
        head = f"deploy check ({len(self.ops)} quantized ops, tolerance {self.tolerance} code(s)): "
        first = self.first_difference
        if first is not None:
            op = next(o for o in self.ops if o.name == first)
            return head + f"DIFFER, first at {first}: {_how(op)}"
        if not self.ok:
            return head + f"DIFFER, ops in one dump only: {_listing(self.only_fake_quant + self.only_xmodel)}"
        within = sum(op.status == "within tolerance" for op in self.ops)
        return head + ("agree" if not within else f"agree ({within} op(s) within the tolerance, not bit-exact)")

    def check(self) -> None:
        """Raise :class:`DeployCheckError` (naming the first differing op) unless :attr:`ok`."""
        if not self.ok:
            raise DeployCheckError(
                f"{self.summary()}. Per-op table: str(report); dumps: {self.fake_quant_dir} and {self.xmodel_dir}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "first_difference": self.first_difference, "tolerance": self.tolerance,
                "fake_quant_dir": self.fake_quant_dir, "xmodel_dir": self.xmodel_dir,
                "ops": [op.to_dict() for op in self.ops], "only_fake_quant": self.only_fake_quant,
                "only_xmodel": self.only_xmodel, "not_compared": self.not_compared}  # fmt: skip

    def __str__(self) -> str:
        width = max([len(op.name) for op in self.ops] + [2]) + 2
        lines = [self.summary(), f"fake-quant dump: {self.fake_quant_dir}", f"XModel dump:     {self.xmodel_dir}", ""]
        lines.append(f"{'op':<{width}}{'fix pos':<10}{'max |diff|':>11}{'differing':>20}  status")
        first = self.first_difference
        for op in self.ops:
            pos = "/".join("-" if p is None else str(p) for p in op.fix_pos)
            diff = "-" if op.max_abs_diff is None else str(op.max_abs_diff)
            count = "-" if op.num_differing is None else f"{op.num_differing}/{op.num_elements}"
            mark = "   <- first difference" if op.name == first else ""
            lines.append(f"{op.name:<{width}}{pos:<10}{diff:>11}{count:>20}  {op.status}{mark}")
        lines += ["", f"only in the fake-quant dump: {_listing(self.only_fake_quant)}"]
        lines.append(f"only in the XModel dump: {_listing(self.only_xmodel)}")
        if self.not_compared:
            lines.append(f"not compared: {len(self.not_compared)} float op(s) (the fake-quant dump holds quantized "
                         "tensors only)")  # fmt: skip
        return "\n".join(lines)


def _listing(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _how(op: OpComparison) -> str:
    if op.status == "fix position differs":
        return f"fix position {op.fix_pos[0]} (fake-quant) vs {op.fix_pos[1]} (XModel)"
    if op.max_abs_diff is None:
        return op.status
    return f"{op.num_differing} of {op.num_elements} values differ, by up to {op.max_abs_diff} code(s)"


def _compare_op(name: str, a: np.ndarray, b: np.ndarray, fa: int | None, fb: int | None, tol: int) -> OpComparison:
    def result(diff: int | None, count: int | None, status: str) -> OpComparison:
        return OpComparison(name, tuple(a.shape), (fa, fb), diff, count, int(a.size), status)

    if fa is None or fb is None:
        return result(None, None, "not fixed on one side")
    if a.shape != b.shape:
        return result(None, None, f"shape differs ({list(a.shape)} vs {list(b.shape)})")
    fine = max(fa, fb)  # codes on the finer grid: exact integers
    diff = np.abs(a.astype(np.int64) * 2 ** (fine - fa) - b.astype(np.int64) * 2 ** (fine - fb))
    largest, count = int(diff.max(initial=0)), int(np.count_nonzero(diff))
    if fa != fb:
        return result(largest, count, "fix position differs")
    if largest == 0:
        return result(0, 0, "equal")
    return result(largest, count, "within tolerance" if largest <= tol else "differs")


def compare_dumps(
    fake_quant_dir: str | os.PathLike, xmodel_dir: str | os.PathLike, *, tolerance: int = 1
) -> DeployCheckReport:
    """Compare a fake-quant dump with an XModel dump op by op (every op either dump holds with a fix position).

    ``tolerance`` is the largest code difference that still agrees: 1 (default) lets values on a rounding tie go
    either way, 0 asks for bit-exact codes. A fix position that differs always counts as a difference.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from torch import nn
        >>> from lightning_quant import quantize, export_xmodel
        >>> q = quantize(nn.Sequential(nn.Linear(4, 3)).eval(), [torch.randn(8, 4)], target="dpu", progress=False)
        >>> x, out = torch.randn(1, 4), pathlib.Path(tempfile.mkdtemp())
        >>> xm = dump_xmodel(export_xmodel(q, out / "m.xmodel", x, graph_name="Net"), x, out / "xm")
        >>> report = compare_dumps(dump_fake_quant(q, x, out / "fq", graph_name="Net"), xm, tolerance=0)
        >>> print(report.summary())
        deploy check (4 quantized ops, tolerance 0 code(s)): agree
        >>> report.to_dict()["ops"][0]["name"], report.ok, len(report.not_compared)
        ('Net__input_1_fix', True, 4)

    Raises:
        ValueError: a negative ``tolerance``; a folder whose ``dump.json`` is not a dump's.
        FileNotFoundError: a folder holding no dump (the message says how to write one).
    """
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r} must be a whole number of codes >= 0 (0: bit-exact, 1: ties).")
    fq, xm = read_dump(fake_quant_dir), read_dump(xmodel_dir)
    fixed = set(fq.fix_pos) | set(xm.fix_pos)
    order = [n for n in xm.order if n in fixed] + [n for n in fq.order if n in fixed and n not in xm.tensors]
    ops = [
        _compare_op(n, fq.tensors[n], xm.tensors[n], fq.fix_pos.get(n), xm.fix_pos.get(n), tolerance)
        for n in order
        if n in fq.tensors and n in xm.tensors
    ]
    return DeployCheckReport(
        fake_quant_dir=str(fq.path),
        xmodel_dir=str(xm.path),
        tolerance=tolerance,
        ops=ops,
        only_fake_quant=[n for n in order if n not in xm.tensors],
        only_xmodel=[n for n in order if n not in fq.tensors],
        not_compared=[n for n in dict.fromkeys(xm.order + fq.order) if n not in fixed],
    )
