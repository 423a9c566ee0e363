"""The ``deploy_check=true`` step of an app run: after the XModel export, dump the fake-quant model and the XModel
layer by layer for the first example input, compare them and fail the run when they disagree (Vitis AI's
``deploy_check``; :mod:`lightning_quant.export.deploy_check`).

Files, in the run directory::

    deploy_check/fake_quant/   dump of the fake-quant model (codes of every quantized tensor, by XIR op name)
    deploy_check/xmodel/       dump of the XModel run by the XIR interpreter (every op)
    deploy_check/report.txt    the per-op table (str of the report); report.json: the same as data

Example:
    >>> import tempfile, pathlib, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize, export_xmodel
    >>> q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), [torch.randn(2, 3, 8, 8)],
    ...              target="dpu", progress=False)
    >>> x, run = torch.randn(1, 3, 8, 8), pathlib.Path(tempfile.mkdtemp())
    >>> summary = run_deploy_check(q, export_xmodel(q, run / "model.xmodel", x), x, run)
    >>> summary["ok"], sorted(p.name for p in (run / "deploy_check").iterdir())
    (True, ['fake_quant', 'report.json', 'report.txt', 'xmodel'])
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEPLOY_CHECK_DIR", "run_deploy_check"]

DEPLOY_CHECK_DIR = "deploy_check"
log = logging.getLogger(__name__)


def run_deploy_check(network: torch.nn.Module, xmodel: Path, example: torch.Tensor, out_dir: Path) -> dict[str, Any]:
    """Dump both sides into ``<out_dir>/deploy_check/``, write ``report.txt`` + ``report.json`` and log the summary.

    Returns:
        ``{"ok", "first_difference", "ops", "report"}`` for ``metrics.json``.

    Raises:
        DeployCheckError: the two differ beyond one code (or a quantized op is on one side only); the message names
            the first differing op and the report; the dumps and the report are written first.
    """
    from lightning_quant.export._atomic import atomic_paths
    from lightning_quant.export.deploy_check import DeployCheckError, compare_dumps, dump_fake_quant, dump_xmodel

    folder = out_dir / DEPLOY_CHECK_DIR
    fake_quant = dump_fake_quant(network, example, folder / "fake_quant")
    dumped = dump_xmodel(xmodel, example, folder / "xmodel")
    report = compare_dumps(fake_quant, dumped)
    text, data = folder / "report.txt", folder / "report.json"
    with atomic_paths(text, data) as (tmp_text, tmp_data):
        tmp_text.write_text(str(report) + "\n")
        tmp_data.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    (log.info if report.ok else log.error)("%s (%s)", report.summary(), text)
    if not report.ok:
        moved = any(op.status == "fix position differs" for op in report.ops)
        hint = (
            " A fix position differs: if export_xmodel warned that it moved positions to meet the DPU's shift "
            "limits, apply lightning_quant.quantizers.dpu_shifts.enforce_dpu_shifts to the model before evaluating it."
            if moved
            else ""
        )
        raise DeployCheckError(
            f"deploy_check: the XModel does not reproduce the fake-quant model: {report.summary()}. The per-op table "
            f"is {text}; the dumps are in {folder}.{hint}"
        )
    return {"ok": True, "first_difference": None, "ops": len(report.ops), "report": str(text)}
