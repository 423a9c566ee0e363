"""Our DPU quantization of the reference LeNet against Vitis AI 3.5's own files (shared/reference/vitis_lenet).

Bit-exact: fc1/fc2/fc3 weights and every parameter position Vitis AI did not change by cross-layer
equalization; the input position. Not determinable here: conv1/conv2 (Vitis AI equalizes them), bias values
(Vitis AI corrects biases: within one code) and the activation positions after conv1 (they depend on Vitis AI's
calibration images and on CLE).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightning_quant.export.xmodel import read_quant_info
from lightning_quant.export.xmodel_interpreter import attr_value, load_xmodel
from tests.dpu.models import reference_dir


def _ops(path):
    return {op.name: op for op in load_xmodel(path).op_node}


def _data(op) -> np.ndarray:
    return np.frombuffer(attr_value(op.attr["data"]), "<f4").reshape(attr_value(op.attr["shape"]))


def _fp(ops, name) -> int:
    return ops[f"{name}_fix"].attr["fix_point"].int32_value


@pytest.mark.parametrize("layer", ["fc1", "fc2", "fc3"])
def test_fc_weights_match_vitis_bit_for_bit(lenet_export, layer):
    _, path = lenet_export
    ours, ref = _ops(path), _ops(reference_dir() / "LeNet_int.xmodel")
    a, b = _data(ours[f"LeNet__{layer}_weight"]), _data(ref[f"LeNet__{layer}_weight"])
    assert a.shape == b.shape and np.array_equal(a, b)  # fc1 columns in NHWC (H, W, C) flatten order
    assert _fp(ours, f"LeNet__{layer}_weight") == _fp(ref, f"LeNet__{layer}_weight") == 8


def test_parameter_positions_match_quant_info(lenet_export):
    _, path = lenet_export
    ref = json.loads((reference_dir() / "quant_info.json").read_text())["param"]
    ours = read_quant_info(path)["param"]
    assert set(ours) == set(ref)
    differ = {k for k in ref if ours[k] != ref[k]}
    assert differ <= {"LeNet::conv1.weight"}  # conv1's weights are rescaled by Vitis AI's CLE: 9 here, 8 there
    assert ours["LeNet::conv1.weight"] == [[8, 9]]


def test_biases_within_one_code_of_vitis(lenet_export):
    _, path = lenet_export
    ours, ref = _ops(path), _ops(reference_dir() / "LeNet_int.xmodel")
    for layer in ("conv2", "fc1", "fc2", "fc3"):  # Vitis AI's bias correction moves some by one code
        fp = _fp(ref, f"LeNet__{layer}_bias")
        diff = np.abs(_data(ours[f"LeNet__{layer}_bias"]) - _data(ref[f"LeNet__{layer}_bias"])) * 2**fp
        assert diff.max() <= 1.0, layer


def test_input_position_matches_vitis(lenet_export):
    qmodel, path = lenet_export  # calibrated on inputs spanning [-1, 1]: the overflow-safe position is 6
    ours = read_quant_info(path)["output"]
    ref = json.loads((reference_dir() / "quant_info.json").read_text())["output"]
    assert ours["LeNet::x"] == ref["LeNet::nndct_input_0"] == [[8, 6]]
    assert len(ours) == len(ref) == 8


def test_graph_mirrors_the_vitis_op_sequence(lenet_export):
    _, path = lenet_export
    skip = {"const", "fix", "stack"}  # Vitis AI feeds reshape a stacked shape; we give it the shape attribute
    ours = [op.type for op in load_xmodel(path).op_node if op.type not in skip]
    ref = [op.type for op in load_xmodel(reference_dir() / "LeNet_int.xmodel").op_node if op.type not in skip]
    assert ours == ref


def test_with_cross_layer_equalization_conv_weights_come_within_one_code():
    """Vitis AI equalizes conv1 -> ReLU -> MaxPool -> conv2 by default; with our CLE the codes land next to its."""
    import torch

    from lightning_quant import QuantOptions, quantize
    from tests.dpu.conftest import _batches
    from tests.dpu.models import reference_lenet

    cle = QuantOptions(cross_layer_equalization=True)
    qmodel = quantize(reference_lenet(), _batches((3, 32, 32), seed=1), target="dpu", progress=False, options=cle)
    ref = _ops(reference_dir() / "LeNet_int.xmodel")
    for layer, limit in (("conv1", 0.1), ("conv2", 0.1)):
        module = getattr(qmodel, layer)
        fp = _fp(ref, f"LeNet__{layer}_weight")
        assert round(-np.log2(float(module.weight_fake_quant.scale))) == fp == 8  # 9 without CLE for conv1
        with torch.no_grad():
            ours = module.weight_fake_quant(module.weight).permute(0, 2, 3, 1).numpy()  # OIHW -> OHWI
        codes = np.abs(ours - _data(ref[f"LeNet__{layer}_weight"])) * 2**fp
        assert codes.max() <= 1.0 and np.mean(codes > 0.5) < limit, layer  # measured: 21/450 and 87/2400 differ
