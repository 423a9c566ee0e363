"""The torchvision zoo on the Vitis AI DPU target: inspect_dpu -> quantize(target="dpu") -> export_xmodel -> the XModel
interpreter against the fake-quant model.

Each model is built with random weights (nothing is downloaded), made numerically lively as in
:mod:`lightning_quant.evaluation.zoo_sweep` (BatchNorm statistics re-estimated on the calibration batches), inspected
for the DPU, quantized, exported, and, when the export succeeds, run by
:func:`~lightning_quant.export.xmodel_interpreter.run_xmodel` on held-out batches: the XModel must reproduce the
fake-quant output bit for bit. Every model ends in a :class:`DPUZooResult` with a status:

* ``all DPU, bit-exact``: one DPU subgraph, and the XModel equals the fake-quant model;
* ``CPU ops``: the inspector puts ops on the CPU and ``export_xmodel`` refuses the first of them (``export_error``);
* ``failed: <stage>``: a stage raised, the XModel differs, or the inspector and the export disagree (``error``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), nn.Flatten(), nn.Linear(288, 4))
    >>> result = check_dpu_model(net, "tiny", image_size=8)
    >>> result.status, result.dpu_ops, result.cpu_ops, result.partitions, result.max_code_diff
    ('all DPU, bit-exact', 4, 0, 1, 0.0)
    >>> net[2] = nn.SiLU()
    >>> result = check_dpu_model(net, "tiny_silu", image_size=8)
    >>> result.status, result.export_node, result.cpu_reasons
    ('CPU ops', '_2', {'activation SiLU': 1})
"""

from __future__ import annotations

import re
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_quant.api import quantize
from lightning_quant.evaluation.zoo_sweep import build_zoo_model, liven_random_model
from lightning_quant.export.dpu_inspector import inspect_dpu
from lightning_quant.export.xmodel import export_xmodel
from lightning_quant.export.xmodel_interpreter import attr_value, load_xmodel, run_xmodel
from lightning_quant.export.xmodel_lowering import UnsupportedOpError

__all__ = ["DPU_SWEEP_SIZES", "DPUZooResult", "check_dpu_model", "check_dpu_zoo_model", "dpu_zoo_table"]

#: Input sizes for models that do not run (or do not pool on fixed DPU windows) at the sweep's small default.
DPU_SWEEP_SIZES = {
    "alexnet": 224,  # AdaptiveAvgPool2d(6) needs a 6x6 (or 12x12, ...) feature map: 223 px and up
    "inception_v3": 75,  # the smallest input its stem accepts (its training-only auxiliary head is dropped)
    "vit_b_16": 224,  # fixed by the position embedding
    "vit_b_32": 224,
    "maxvit_t": 224,  # fixed by its relative-position tables
}
_UNSUPPORTED = re.compile(r"cannot lower (?P<reason>.*?) \(node '(?P<node>[^']+)'", re.S)


@dataclass
class DPUZooResult:
    """One model's trip through inspect_dpu -> quantize -> export_xmodel -> interpreter vs fake-quant."""

    model: str
    status: str
    params_m: float = 0.0
    image_size: int = 0
    ops: int = 0
    dpu_ops: int = 0
    cpu_ops: int = 0
    partitions: int = 0
    cpu_reasons: dict[str, int] = field(default_factory=dict)  # reason (up to its first parenthesis) -> count
    first_cpu_node: str | None = None
    exported: bool = False
    export_node: str | None = None  # the node export_xmodel refused
    export_error: str | None = None
    samples: int = 0
    max_abs_diff: float | None = None
    max_code_diff: float | None = None  # in steps of the output's fix position
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short_reason(reason: str) -> str:
    return reason.split(" (")[0]


def _output_fix_point(path: Path) -> int | None:
    """The fix position of the XModel's (first) output, when that output is a ``fix`` op."""
    graph = load_xmodel(path)
    consumed = {name for op in graph.op_node for arg in op.args for name in arg.ops}
    outputs = [op for op in graph.op_node if op.name not in consumed and op.type != "const"]
    if outputs and outputs[0].type == "fix":
        return int(attr_value(outputs[0].attr["fix_point"]))
    return None


def check_dpu_model(
    model: nn.Module,
    name: str,
    *,
    image_size: int = 64,
    batch_size: int = 2,
    batches: int = 2,
    seed: int = 0,
    workdir: str | Path | None = None,
) -> DPUZooResult:
    """Inspect, quantize for the DPU, export and check one (random-weight) model; failures are recorded, not raised.

    Args:
        model: the float model (its BatchNorm statistics are re-estimated in place on the calibration batches).
        name: the name the result carries.
        image_size: input height and width.
        batch_size: images per batch.
        batches: calibration batches; as many different ones check the XModel against the fake-quant model.
        seed: seeds the random inputs.
        workdir: where the XModel is written (a temporary folder by default, removed afterwards).

    Returns:
        A :class:`DPUZooResult`.
    """
    start = time.perf_counter()
    result = DPUZooResult(model=name, status="failed: build", image_size=image_size)
    result.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    stage = "build"
    try:
        generator = torch.Generator().manual_seed(seed + 1)
        data = [torch.randn(batch_size, 3, image_size, image_size, generator=generator) for _ in range(2 * batches)]
        calibration, held_out = data[:batches], data[batches:]
        liven_random_model(model, calibration, seed)
        stage = "inspect"
        report = inspect_dpu(model, calibration[0][:1])
        result.ops, result.dpu_ops, result.cpu_ops = len(report.ops), len(report.dpu_ops), len(report.cpu_ops)
        result.partitions = report.partitions
        result.cpu_reasons = dict(Counter(_short_reason(op.reason) for op in report.cpu_ops).most_common())
        result.first_cpu_node = report.cpu_ops[0].node if report.cpu_ops else None
        stage = "quantize"
        qmodel = quantize(model, calibration, target="dpu", progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(workdir or tmp) / f"{name}.xmodel"
            path.parent.mkdir(parents=True, exist_ok=True)
            stage = "export"
            try:
                export_xmodel(qmodel, path, calibration[0][:1])
            except UnsupportedOpError as err:
                match = _UNSUPPORTED.search(str(err))
                result.export_node = match["node"] if match else None
                result.export_error = match["reason"] if match else str(err)[:300]
                agree = result.export_node == result.first_cpu_node
                result.status = "CPU ops" if agree else "failed: inspector and export disagree"
                if not agree:
                    first, refused = result.first_cpu_node, result.export_node
                    result.error = f"the inspector's first CPU op is {first}, export_xmodel refused {refused}"
                return result
            result.exported = True
            stage = "interpreter"
            x = torch.cat(held_out)
            (got,) = run_xmodel(path, x.numpy())
            with torch.no_grad():
                expected = qmodel(x).double().numpy()
            fix_point = _output_fix_point(path)
        diff = float(np.abs(got - expected).max())
        result.samples, result.max_abs_diff = len(x), diff
        result.max_code_diff = diff * 2.0**fix_point if fix_point is not None else None
        if diff != 0.0:
            result.status = "failed: XModel differs"
        elif result.cpu_ops or result.partitions != 1:
            result.status = "failed: exported with CPU ops"  # the export should have refused the inspector's CPU op
        else:
            result.status = "all DPU, bit-exact"
    except Exception as err:  # noqa: BLE001 - the sweep records every failure and goes on
        result.status = f"failed: {stage}"
        result.error = f"{type(err).__name__}: {err}".strip()[:600] + "\n" + traceback.format_exc(limit=-3)
    finally:
        result.seconds = round(time.perf_counter() - start, 1)
    return result


def check_dpu_zoo_model(name: str, *, image_size: int = 64, seed: int = 0, **kwargs: Any) -> DPUZooResult:
    """:func:`check_dpu_model` on torchvision's ``name`` with random weights (seeded), at ``image_size`` or the size
    :data:`DPU_SWEEP_SIZES` gives it.

    Example:
        >>> check_dpu_zoo_model("mobilenet_v3_small").status  # doctest: +SKIP
        'all DPU, bit-exact'
    """
    torch.manual_seed(seed)
    try:
        model = build_zoo_model(name).eval()
    except Exception as err:  # noqa: BLE001 - recorded like every other failure
        return DPUZooResult(model=name, status="failed: build", error=f"{type(err).__name__}: {err}"[:600])
    if getattr(model, "aux_logits", False):  # GoogLeNet, Inception v3: auxiliary heads run in training mode only, and
        model.aux_logits = False  # re-estimating BatchNorm runs the model in training mode (Inception's head needs
        for head in ("aux1", "aux2", "AuxLogits"):  # 299 px); the eval graph, the one deployed, never reads them
            if hasattr(model, head):
                setattr(model, head, None)
    return check_dpu_model(model, name, image_size=DPU_SWEEP_SIZES.get(name, image_size), seed=seed, **kwargs)


def dpu_zoo_table(results: list[DPUZooResult]) -> str:
    """Markdown table: model, size, DPU/CPU ops, DPU subgraphs, export (the refused node and its reason, up to its
    first parenthesis), XModel vs fake-quant, the four most frequent CPU op kinds."""
    lines = [
        "| model | params (M) | input | ops DPU / CPU | DPU subgraphs | export_xmodel | XModel vs fake-quant | "
        "CPU ops (kind: count) | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status.startswith("skipped") or r.status == "timeout" or r.status == "failed: build":
            note = r.status if not r.error else f"{r.status}: {r.error.splitlines()[0][:100]}"
            lines.append(f"| {r.model} | {r.params_m:g} | - | - | - | - | - | {note} | {r.seconds:g} |")
            continue
        if r.exported:
            export = "ok"
        elif r.export_node:
            export = f"refused at `{r.export_node}`: {_short_reason(r.export_error or '')}"
        else:
            export = r.status if not r.error else f"{r.status} ({r.error.splitlines()[0][:100]})"
        if r.max_abs_diff is None:
            parity = "-"
        elif r.max_abs_diff == 0.0:
            parity = f"bit-exact ({r.samples} images)"
        else:
            codes = "" if r.max_code_diff is None else f", {r.max_code_diff:g} codes"
            parity = f"max diff {r.max_abs_diff:.3g}{codes}"
        kinds = "; ".join(f"{reason}: {count}" for reason, count in list(r.cpu_reasons.items())[:4]) or "-"
        if len(r.cpu_reasons) > 4:
            kinds += f"; {len(r.cpu_reasons) - 4} more kinds"
        lines.append(
            f"| {r.model} | {r.params_m:g} | {r.image_size} | {r.dpu_ops} / {r.cpu_ops} | {r.partitions} | {export} "
            f"| {parity} | {kinds} | {r.seconds:g} |"
        )
    return "\n".join(lines)
