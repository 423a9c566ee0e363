"""The XModel interpreter against a graph it did not write: Vitis AI 3.5's own ``LeNet_int.xmodel`` (with its
``stack`` of shape constants and ``reshape`` by input) run beside Vitis AI's ``LeNet_int.onnx`` in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_quant.export.xmodel_interpreter import load_xmodel, run_xmodel
from lightning_quant.paths import shared_dir

SHARED = shared_dir()
pytestmark = pytest.mark.skipif(SHARED is None, reason="needs the shared reference folder (../shared); not found")


def test_vitis_lenet_xmodel_runs_and_agrees_with_vitis_onnx_within_one_code():
    ort = pytest.importorskip("onnxruntime")
    ref = SHARED / "reference" / "vitis_lenet"
    graph = load_xmodel(ref / "LeNet_int.xmodel")
    assert {"stack", "reshape"} <= {op.type for op in graph.op_node}
    output_fix = next(op for op in reversed(graph.op_node) if op.type == "fix")
    step = 2.0 ** -output_fix.attr["fix_point"].int32_value  # one output code
    session = ort.InferenceSession(str(ref / "LeNet_int.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    differing = total = 0
    for i in range(64):  # the ONNX file takes batch 1; inputs of several magnitudes, clipping included
        x = (rng.standard_normal((1, 3, 32, 32)) * (0.5 + i / 16)).astype(np.float32)
        ours = run_xmodel(graph, x)[0]
        theirs = session.run(None, {name: x})[0]
        assert ours.shape == theirs.shape == (1, 10)
        diff = np.abs(ours - theirs) / step
        assert diff.max() <= 1.0 + 1e-9, f"input {i}: {diff.max()} codes apart"
        differing += int((diff > 0).sum())
        total += diff.size
    assert differing <= 0.05 * total  # ties (DPU_ROUND vs ONNX's half-to-even) are rare
