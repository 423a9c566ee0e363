"""The project's XIR schema reads real Vitis AI xmodels completely, and our files re-parse with it."""

from __future__ import annotations

import pytest

from lightning_quant.export.xir_schema import message_class, unknown_field_paths
from tests.dpu.models import reference_dir

Graph = message_class("Graph")


@pytest.mark.parametrize("name", ["LeNet_int.xmodel", "LeNet_compiled.xmodel"])
def test_reference_xmodels_parse_with_no_unknown_fields(name):
    data = (reference_dir() / name).read_bytes()
    graph = Graph.FromString(data)
    assert unknown_field_paths(graph) == []
    assert graph.ByteSize() == len(data)  # nothing dropped, nothing re-encoded differently
    stripped = Graph.FromString(data)
    stripped.DiscardUnknownFields()
    assert stripped == graph and len(stripped.SerializeToString()) == len(data)
    assert graph.name == "LeNet" and graph.subg_root.name == "root" and len(graph.op_defs) > 100


def test_reference_values_decode_as_expected():
    graph = Graph.FromString((reference_dir() / "LeNet_int.xmodel").read_bytes())
    ops = {op.name: op for op in graph.op_node}
    fix = ops["LeNet__input_0_fix"]
    assert fix.type == "fix" and fix.attr["fix_point"].int32_value == 6 and fix.attr["if_signed"].bool_value
    assert fix.attr["round_mode"].string_value == "DPU_ROUND" and fix.attr["bit_width"].int32_value == 8
    assert list(ops["LeNet__input_0"].output_tensor.dim) == [1, 32, 32, 3]
    assert list(ops["LeNet__conv1_weight"].attr["shape"].int32_vec.value) == [6, 5, 5, 3]  # OHWI
    compiled = Graph.FromString((reference_dir() / "LeNet_compiled.xmodel").read_bytes())
    dpu = [c for c in compiled.subg_root.children if c.attr["device"].string_value == "DPU"]
    assert len(dpu) == 1 and dpu[0].attr["dpu_name"].string_value.startswith("DPU")


def test_unknown_fields_are_detected():
    data = (reference_dir() / "LeNet_int.xmodel").read_bytes()
    assert unknown_field_paths(Graph.FromString(data + bytes([0xA8, 0x1F, 0x01]))) == ["<root>"]  # field 501


def test_our_xmodels_reparse_completely(exported):
    _, _, _, path = exported
    data = path.read_bytes()
    graph = Graph.FromString(data)
    assert unknown_field_paths(graph) == [] and graph.ByteSize() == len(data)
    assert Graph.FromString(graph.SerializeToString()) == graph  # (map entries may be re-ordered)
    assert "uncompiled XIR graph" in graph.attr["lightning_quant"].string_value


def test_message_class_rejects_unknown_names():
    with pytest.raises(KeyError, match="'Node' is not an XIR message of this schema; use one of Bytes"):
        message_class("Node")
