"""Helpers for the export tests: graph inspection, onnxruntime's optimized graph, float baselines."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from lightning_quant.calibration import call_model
from lightning_quant.export.onnx import export_float_onnx  # noqa: F401  (re-exported for the tests)

REPO_ROOT = Path(__file__).resolve().parents[2]
ACTIVATION_ZP_TYPES = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}
SCALE_MATH_OPS = {"Abs", "ReduceMax", "ReduceMin", "Div", "Mul", "Sub", "Round", "Floor", "Ceil", "Reciprocal"}


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = collections.defaultdict(list)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            found[name].append((node, index))
    return found


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def ort_optimized(path: str | os.PathLike, out_dir: Path) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider actually runs (``ORT_ENABLE_EXTENDED``: QDQ fusion, no NCHWc layout)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out_dir / f"{Path(path).stem}.ort_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def activation_zero_point_types(model: onnx.ModelProto) -> set[str]:
    """Element types of the zero points of every QuantizeLinear (activations only: weights are stored int8)."""
    inits = initializers(model)
    types = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = inits[node.input[2]]
            types.add(ACTIVATION_ZP_TYPES.get(zero_point.data_type, str(zero_point.data_type)))
    return types


def activation_zero_points(model: onnx.ModelProto) -> list[int]:
    inits = initializers(model)
    return [
        int(numpy_helper.to_array(inits[node.input[2]]))
        for node in model.graph.node
        if node.op_type == "QuantizeLinear"
    ]


def weight_dequantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """For every Conv/Gemm node name: the DequantizeLinear node producing its weight (KeyError if none)."""
    made_by = producers(model)
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            source = made_by.get(node.input[1])
            assert source is not None and source.op_type == "DequantizeLinear", (
                f"{node.op_type} {node.name} weight {node.input[1]!r} is not produced by DequantizeLinear"
            )
            found[node.name] = source
    return found


def run_ort(path: str | os.PathLike, feed: dict[str, np.ndarray], threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def fake_quant_output(qmodel: nn.Module, inputs: Any) -> np.ndarray:
    with torch.inference_mode():
        return call_model(qmodel.eval(), inputs).detach().numpy()


def export_float_torchscript(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    with torch.inference_mode():
        traced = torch.jit.trace(model.eval(), (example,), strict=False)
    torch.jit.save(traced, str(path))
    return path


# Runs in a fresh interpreter: lightning_quant cannot be imported there (a meta-path hook refuses it), PYTHONPATH is
# dropped and the working directory is not the repository, so the file must load with torch alone.
_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    class RefuseLightningQuant(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "lightning_quant":
                raise ImportError("lightning_quant must not be needed to load the TorchScript file")
            return None

    sys.meta_path.insert(0, RefuseLightningQuant())
    import torch

    model_path, inputs_path, output_path, repo, threads = sys.argv[1:6]
    torch.set_num_threads(int(threads))  # as in the parent: conv reductions differ in the last ulp across counts
    module = torch.jit.load(model_path, map_location="cpu").eval()
    args = torch.load(inputs_path, weights_only=True)
    with torch.inference_mode():
        out = module(*args)
    torch.save(out, output_path)
    buffers = dict(module.named_buffers())
    try:
        import lightning_quant  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    print(json.dumps({
        "lightning_quant_loaded": any(m.split(".")[0] == "lightning_quant" for m in sys.modules),
        "import_refused": blocked,
        "int8_elements": sum(b.numel() for b in buffers.values() if b.dtype == torch.int8),
        "float_weight_elements": sum(
            b.numel() for n, b in buffers.items() if b.is_floating_point() and b.dim() >= 2
        ) + sum(p.numel() for p in module.parameters() if p.dim() >= 2),
        "repo_on_sys_path": any(os.path.realpath(p or ".") == os.path.realpath(repo) for p in sys.path),
    }))
    """
)


def load_torchscript_elsewhere(path: Path, args: tuple, workdir: Path) -> tuple[torch.Tensor, dict]:
    """Load and run ``path`` in a subprocess without lightning_quant; returns its output and facts it reported."""
    import json

    script = workdir / "load_plain.py"
    script.write_text(_LOADER)
    inputs, output = workdir / "inputs.pt", workdir / "output.pt"
    torch.save(list(args), inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            str(path),
            str(inputs),
            str(output),
            str(REPO_ROOT),
            str(torch.get_num_threads()),
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    return torch.load(output, weights_only=True), facts
