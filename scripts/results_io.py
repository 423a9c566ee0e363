"""What every measurement script writes: a header (command, date, machine, versions, settings) and the results as
JSON plus a Markdown table beside it, under ``scripts/results/`` by default.

Example:
    >>> import argparse, tempfile
    >>> from pathlib import Path
    >>> args = argparse.Namespace(models=["resnet20"], out=Path(tempfile.mkdtemp()) / "demo.json")
    >>> header = run_header("scripts/demo.py", ["--models", "resnet20"], args)
    >>> header["command"], header["settings"]
    ('PYTHONPATH=. python scripts/demo.py --models resnet20', {'models': ['resnet20']})
    >>> write_results(args.out, {**header, "rows": []}, "| a |")
    >>> args.out.with_suffix(".md").read_text().splitlines()
    ['| a |']
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import lightning_quant

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS_DIR.parents[1]


def repo_relative(text: str) -> str:
    """``text`` with this checkout's absolute path removed (interpreter paths, tracebacks): results stay portable."""
    return text.replace(f"{REPO_ROOT}/", "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere, ``"unknown"`` if that is
    empty): timings from two machines are not comparable, and the platform string does not tell them apart."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_header(script: str, argv: list[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    """``script``, the exact ``command`` (``argv``, or the process arguments when None), UTC ``date``, ``machine``
    (CPU model, CPUs, platform, load average), torch / lightning_quant ``versions`` and the parsed ``settings``
    (less ``out``)."""
    return {
        "script": script,
        "command": " ".join([f"PYTHONPATH=. python {script}", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "lightning_quant": lightning_quant.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }


def write_results(out: Path, payload: dict[str, Any], table: str, footer: str = "") -> None:
    """Write ``payload`` to ``out`` (JSON) and ``table`` (+ ``footer``) to the ``.md`` file beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(repo_relative(json.dumps(payload, indent=2)) + "\n")
    out.with_suffix(".md").write_text(repo_relative(table + "\n" + footer))
