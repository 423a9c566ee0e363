"""Structural checks of our XModels: names and attributes as in Vitis AI's files, shapes, grids, shifts."""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from lightning_quant import QuantOptions, export_xmodel, quantize
from lightning_quant.algorithms.post_calibration import record_refinements
from lightning_quant.export.xmodel import quant_info, quant_info_path_for, read_quant_info
from lightning_quant.export.xmodel_interpreter import attr_value, load_xmodel
from lightning_quant.quantizers.dpu_shifts import check_dpu_shifts
from lightning_quant.quantizers.prepare import prepare_info
from tests.dpu.models import reference_dir
from tests.helpers.models import TinyConvBN, warm_bn


def _ref_graph():
    return load_xmodel(reference_dir() / "LeNet_int.xmodel")


def test_attrs_and_args_follow_xir_definitions(exported):
    _, _, _, path = exported
    ref = _ref_graph()
    defs = {d.name: d for d in ref.op_defs}
    seen = {}
    for op in ref.op_node:
        seen.setdefault(op.type, (set(op.attr), {a.name for a in op.args}))
    for op in load_xmodel(path).op_node:
        d = defs[op.type]
        required = {a.name for a in d.attrs if a.occur_type == 0}
        assert required <= set(op.attr), (op.name, required - set(op.attr))
        assert {a.name for a in op.args} <= {a.name for a in d.input_args}, op.name
        for a in d.attrs:  # every attribute has the type XIR defines
            if a.name in op.attr:
                assert op.attr[a.name].WhichOneof("value") == a.default_value.WhichOneof("value"), (op.name, a.name)
        if op.type in seen and op.type != "reshape":  # LeNet's own ops: exactly the same attribute and arg names
            assert (set(op.attr), {a.name for a in op.args}) == seen[op.type], op.name
        assert re.fullmatch(r"[A-Za-z0-9_]+", op.name)


def test_consts_are_on_their_grid_and_fixed(exported):
    _, _, _, path = exported
    graph = load_xmodel(path)
    users = {}
    for op in graph.op_node:
        for arg in op.args:
            for name in arg.ops:
                users.setdefault(name, []).append(op)
    for op in graph.op_node:
        if op.type != "const" or op.name.endswith("_dpu_scale"):
            continue
        (fix,) = users[op.name]
        assert fix.type == "fix"
        fp = fix.attr["fix_point"].int32_value
        codes = np.frombuffer(attr_value(op.attr["data"]), "<f4").astype(np.float64) * 2.0**fp
        assert np.array_equal(codes, np.round(codes)) and codes.min() >= -128 and codes.max() <= 127


def test_shapes_are_nhwc_and_match_torch(exported):
    _, qmodel, shape, path = exported
    ops = {op.name: op for op in load_xmodel(path).op_node}
    outputs: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, []).append(o.shape))
             for n, m in qmodel.named_modules() if n and "." not in n and not n.startswith("activation")]  # fmt: skip
    with torch.no_grad():
        qmodel(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    for name, (torch_shape, *more) in outputs.items():
        if more:  # a module called twice (LeNet's pool): its two ops are named pool and pool_1
            continue
        key = f"{load_xmodel(path).name}__{name}"
        if key in ops and ops[key].type in ("conv2d", "depthwise-conv2d", "matmul", "maxpool2d", "avgpool2d"):
            s = list(torch_shape)
            expected = [s[0], s[2], s[3], s[1]] if len(s) == 4 else s
            assert list(ops[key].output_tensor.dim) == expected, name
            if ops[key].type == "conv2d":
                w = ops[[a for a in ops[key].args if a.name == "weights"][0].ops[0].removesuffix("_fix")]
                layer = qmodel.get_submodule(name)
                kh, kw = layer.kernel_size
                assert attr_value(w.attr["shape"]) == [layer.out_channels, kh, kw, layer.in_channels]  # OHWI


def test_shift_constraints_hold_in_the_file(exported):
    _, qmodel, _, path = exported
    assert check_dpu_shifts(qmodel) == []
    ops = {op.name: op for op in load_xmodel(path).op_node}
    consumers = {}
    for op in ops.values():
        for arg in op.args:
            for n in arg.ops:
                consumers.setdefault(n, []).append(op)
    fp = lambda name: ops[name].attr["fix_point"].int32_value  # noqa: E731
    for op in ops.values():
        if op.type not in ("conv2d", "depthwise-conv2d", "matmul"):
            continue
        args = {a.name: list(a.ops) for a in op.args}
        src = args["input"][0]
        while ops[src].type == "reshape":  # a flatten passes its input's position through
            src = ops[src].args[0].ops[0]
        fp_in, fp_w = fp(src), fp(args["weights"][0] if "weights" in args else args["input"][1])
        nxt = consumers[op.name][0]
        fp_out = fp(nxt.name) if nxt.type == "fix" else fp(consumers[nxt.name][0].name)  # through a fused relu
        cut = fp_w + fp_in - fp_out
        assert 0 <= cut <= 16, op.name
        if "bias" in args:
            assert min(0, -(24 - (8 + cut))) <= fp_w + fp_in - fp(args["bias"][0]) <= 16, op.name


def test_quant_info_layout_matches_vitis(exported):
    _, _, _, path = exported
    text = quant_info_path_for(path).read_text()  # model.xmodel -> model.quant_info.json
    ref_text = (reference_dir() / "quant_info.json").read_text()
    ours, ref = json.loads(text), json.loads(ref_text)
    assert list(ours) == list(ref)
    assert all(re.fullmatch(r"\[\[8,-?\d+\]\]", json.dumps(v, separators=(",", ":"))) for v in ours["param"].values())
    line = re.compile(r'^    "[^"]+::[^"]+":\[\[8,-?\d+\]\],?$')
    assert all(line.match(s) for s in text.splitlines() if "::" in s)
    assert text.startswith('{\n  "param":\n  {\n') and text.endswith('"\n}') and ref_text.endswith('"\n}')
    assert ours["graph_md5"] == __import__("hashlib").md5(path.read_bytes()).hexdigest()


def test_quant_info_records_bias_correction(tmp_path):
    """``bias_corrected`` / ``fast_finetuned`` say what ran, as Vitis AI's file does (and survive a state reload)."""
    data = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    plain = quantize(warm_bn(TinyConvBN()), data, target="dpu", progress=False)
    bc = QuantOptions(bias_correction=True)
    corrected = quantize(warm_bn(TinyConvBN()), data, target="dpu", options=bc, progress=False)
    assert (quant_info(plain)["bias_corrected"], quant_info(corrected)["bias_corrected"]) == (False, True)
    assert quant_info(corrected)["fast_finetuned"] is False
    path = export_xmodel(corrected, tmp_path / "m.xmodel", data[0][:1])
    assert read_quant_info(path)["bias_corrected"] is True
    record_refinements(plain, ["fast_finetune", "fast_finetune"])
    assert quant_info(plain)["fast_finetuned"] is True
    assert prepare_info(plain).refinements == ["dpu_shifts", "fast_finetune"]
