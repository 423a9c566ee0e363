"""The numpy XIR interpreter reproduces the PyTorch DPU fake-quant model bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_quant.export.xmodel_interpreter import XModelInterpreter, load_xmodel, run_xmodel


def test_interpreter_is_bit_exact(exported):
    name, qmodel, shape, path = exported
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.rand(3, *shape, generator=g) * 2 - 1, torch.randn(3, *shape, generator=g) * 3])
    with torch.no_grad():
        expected = qmodel(x).numpy()
    (out,) = run_xmodel(path, x.numpy())
    assert out.shape == expected.shape
    assert np.array_equal(out, expected), f"{name}: max diff {np.abs(out - expected).max()}"


def test_interpreter_drops_each_value_after_its_last_consumer(exported):
    """Only the outputs stay alive at the end (every activation kept in float64 took 9 GB on ResNet50)."""
    _, _, shape, path = exported
    interpreter = XModelInterpreter(load_xmodel(path))
    feeds = {name: np.zeros((2, *shape[1:], shape[0])) for name in interpreter.inputs}  # NHWC
    outputs = interpreter.run(feeds)
    assert sorted(interpreter.values) == sorted(outputs) == sorted(interpreter.outputs)


def test_global_pool_multiply_is_in_the_graph(exported):
    name, _, _, path = exported
    types = [op.type for op in load_xmodel(path).op_node]
    if name == "depthwise":  # 7x7 global pool: avgpool2d then mul by 49 * 21 / 1024
        i = types.index("mul")
        assert types[i - 2 : i + 1] == ["avgpool2d", "const", "mul"] and "depthwise-conv2d" in types
    elif name == "tiny":  # 16x16 window: a power of two, no multiply needed
        assert "avgpool2d" in types and "mul" not in types


def test_interpreter_errors(exported):
    _, _, shape, path = exported
    graph = load_xmodel(path)
    with pytest.raises(ValueError, match="the graph has 1 input"):
        run_xmodel(graph)
    with pytest.raises(KeyError, match="no input fed for data op"):
        XModelInterpreter(graph).run({})
    graph.op_node[-1].type = "softmax"
    with pytest.raises(KeyError, match="has type 'softmax', which this interpreter does not run"):
        run_xmodel(graph, np.zeros((1, *shape), np.float32))
