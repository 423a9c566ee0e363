"""Which nodes of a DPU-prepared fx graph the Vitis AI DPU runs, and why not: the one rule set that
:func:`~lightning_quant.export.xmodel.export_xmodel`'s lowering and :func:`~lightning_quant.inspect_dpu` share.

:func:`dpu_verdict` names what an fx node is (its XIR op, e.g. ``conv2d``, ``depthwise-conv2d``, ``matmul``) and,
when the DPU graph cannot hold it, the reason: an op with no DPU lowering here (sigmoid, gelu, a transposed or 1-D
conv, ...), a layer outside the DPU's limits (kernel, stride, padding, dilation, depthwise channel
multiplier), a tensor of the wrong rank, or a layer left in float. The lowering raises
:class:`~lightning_quant.export.xmodel_lowering.UnsupportedOpError` with that reason; the inspector lists it.
The graph is the one ``prepare(model, scheme_for_target("dpu"))`` builds (BatchNorm folded, average pools as
:class:`~lightning_quant.quantizers.dpu_pool.DPUAvgPool2d`, Hard-Sigmoid and Hard-Swish as
:class:`~lightning_quant.quantizers.dpu_activations.DPUHardsigmoid` /
:class:`~lightning_quant.quantizers.dpu_activations.DPUHardswish`), with shapes from ``ShapeProp``.

Limits: the DPUCZDX8G (Zynq UltraScale+ MPSoC DPU, ``DPUCZDX8G_ISA1_B4096`` on ZCU102/ZCU104: channel_parallel 16,
bank_depth 2048, bank_num 8), from the Vitis AI User Guide (UG1414), table "Currently Supported Operators":

* conv2d: kernel w, h in [1, 16]; stride w, h in [1, 8]; padding per side in [0, (kernel - 1) * dilation];
  ``dilation * input_channel <= 256 * channel_parallel``; ``kernel_w * kernel_h * ceil(input_channel /
  channel_parallel) <= bank_depth``; ``output_channel <= 256 * channel_parallel``; groups 1.
* depthwise-conv2d: channel multiplier 1 (groups = input channels = output channels); kernel w, h in [1, 256]
  (UG1414 3.0/3.5, ISA1); stride w, h in [1, 8] (the ISA0 column of UG1414 1.4.1, kept as the safe bound); padding
  and sizes as conv2d.
* max and average pooling: kernel w, h in [1, 256] with ``ceil(kernel_h / bank_num) * kernel_w <= bank_depth``;
  stride in [1, 8] (a global pool is one window: no stride); padding per side in [0, kernel - 1].
* activations: ReLU and ReLU6 anywhere; Hard-Sigmoid and Hard-Swish fused into the conv2d, depthwise-conv2d or
  linear layer right before them (UG1414 lists them among DPUCZDX8G_ISA1_B4096's conv activations; a standalone one
  needs the ALU engine of newer DPUs: vai_q_pytorch's ``pytorch_nndct/hardware/dpu_op_filter.py``). LeakyReLU is a
  DPU activation too, but this exporter does not lower it.
* element-wise multiply (``a * b``): two tensors of one shape, or an NCHW tensor times a per-channel ``[N, C, 1, 1]``
  one (squeeze-and-excitation), at most ``256 * channel_parallel`` channels.
* resize (``F.interpolate``, ``nn.Upsample``): nearest with integer scale factors; bilinear with
  ``align_corners=False`` and the same scale 2 or 4 on both sides (what vai_q_pytorch's ``dpu_op_filter.py`` lets
  the compiler turn into a depthwise transposed conv); the input quantized, at most ``256 * channel_parallel``
  channels.
* transposed convs stay on the CPU: lightning_quant does not quantize ``nn.ConvTranspose2d`` (it stays float).

Other DPU architectures (DPUCAHX8H, DPUCVDX8G, ...) have other limits; the vai_c_xir compiler has the last word.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> from lightning_quant import prepare, scheme_for_target
    >>> net = nn.Sequential(
    ...     nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 17, padding=8), nn.Sigmoid(), nn.Hardswish()
    ... ).eval()
    >>> gm = prepare(net, scheme_for_target("dpu"))
    >>> _ = ShapeProp(gm).propagate(torch.randn(1, 3, 20, 20))
    >>> for node in gm.graph.nodes:
    ...     verdict = dpu_verdict(gm, node)
    ...     if verdict.op not in ("data", "fix", "output"):
    ...         print(node.name, verdict.op, "|", verdict.reason)  # doctest: +ELLIPSIS
    _0 conv2d | None
    _1 hard-swish | None
    _2 conv2d | a conv2d with kernel 17x17 (DPUCZDX8G: kernel sides 1..16)
    _3 Sigmoid | activation Sigmoid (export_xmodel lowers ReLU, ReLU6, and Hard-Sigmoid/Hard-Swish right after a ...
    _4 hard-swish | a standalone hard-swish after the Sigmoid (DPUCZDX8G runs it fused into the conv2d, ...
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_quant.capture.patterns import is_fused_activation, is_shape_value
from lightning_quant.quantizers.dpu_activations import DPUHardsigmoid, DPUHardswish
from lightning_quant.quantizers.dpu_pool import DPUAvgPool2d
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.modules import QuantConv2d, QuantConvBn, QuantLinear

__all__ = [
    "DPU_ARCH",
    "SUPPORTED_SUMMARY",
    "DPUVerdict",
    "dpu_verdict",
    "flatten_dims",
    "is_depthwise",
    "is_flattened",
    "maxpool_of",
    "node_shape",
    "pad_arguments",
    "resize_arguments",
]

DPU_ARCH = "DPUCZDX8G_ISA1_B4096"
CHANNEL_PARALLEL = 16
BANK_DEPTH = 2048
BANK_NUM = 8
CONV_KERNEL = 16
CONV_STRIDE = 8
DEPTHWISE_KERNEL = 256
DEPTHWISE_STRIDE = 8
POOL_KERNEL = 256
POOL_STRIDE = 8

SUPPORTED_SUMMARY = (
    f"conv2d (kernel 1..{CONV_KERNEL}, stride 1..{CONV_STRIDE}), depthwise conv2d (channel multiplier 1), linear, "
    "add, element-wise mul, cat, relu/relu6, hardsigmoid/hardswish after a conv or linear, max/avg pooling, "
    "nearest/bilinear upsampling by integer scales, flatten, slicing, zero padding, dropout"
)
ELTWISE_CHANNELS = 256 * CHANNEL_PARALLEL  # element-wise, resize and pad engines: input_channel <= 256 * cp
BILINEAR_SCALES = (2, 4)  # align_corners=False (half-pixel centers): vai_q_pytorch's dpu_op_filter.py

_PASSTHROUGH_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity)
_PASSTHROUGH_CALLS = {F.dropout, "contiguous"}
_MUL_CALLS = {operator.mul, torch.mul, "mul"}
_RESIZE_CALLS = {F.interpolate, F.upsample}
_RELU_CALLS = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_ADD_CALLS = {operator.add, torch.add, "add"}
_CAT_CALLS = {torch.cat, torch.concat}
_FLATTEN_CALLS = {torch.flatten, "flatten", "view", "reshape"}
_ACTIVATION_MODULES = (
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU,
    nn.CELU, nn.LeakyReLU, nn.PReLU, nn.Softmax, nn.LogSoftmax, nn.Softplus,
)  # fmt: skip
_ACTIVATION_CALLS = {
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.gelu, F.silu, F.mish,
    F.elu, F.selu, F.celu, F.leaky_relu, F.prelu, F.softmax, torch.softmax, F.log_softmax, F.softplus,
    "sigmoid", "tanh", "softmax", "log_softmax",
}  # fmt: skip
_DPU_FUSABLE = {"leaky_relu", "leakyrelu"}  # the DPU has it; this exporter does not
_DPU_SWAPPED = {"hardswish", "hardsigmoid"}  # prepare(target="dpu") replaces them by the DPU's own computation
_FUSING_OPS = ("conv2d", "depthwise-conv2d", "matmul")  # what Hard-Sigmoid/Hard-Swish fuse into


@dataclass(frozen=True)
class DPUVerdict:
    """What an fx node is (``op``: its XIR op type, or the PyTorch name of an op with none) and why the DPU graph
    cannot hold it (``reason``; None when it can).

    Ops that vanish from the XModel or carry no activation have their own names: ``data`` (an input), ``fix`` (a
    quantizer), ``identity`` (dropout and other no-ops), ``shape`` (arithmetic on sizes), ``output``.
    """

    op: str
    reason: str | None = None

    @property
    def on_dpu(self) -> bool:
        return self.reason is None


def node_shape(node: fx.Node) -> list[int] | None:
    """The shape of the one tensor ``node`` produces (``ShapeProp`` metadata), or None (a tuple, a non-tensor)."""
    meta = node.meta.get("tensor_meta")
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _input_shape(node: fx.Node, i: int = 0) -> list[int] | None:
    arg = node.args[i] if len(node.args) > i else None
    return node_shape(arg) if isinstance(arg, fx.Node) else None


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _name(target) -> str:
    return str(getattr(target, "__name__", target))


def is_depthwise(conv: nn.Conv2d) -> bool:
    """A conv with one filter per channel (channel multiplier 1): the DPU's ``depthwise-conv2d``."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def flatten_dims(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    """``(start_dim, end_dim)`` of a flatten node (``nn.Flatten``, ``torch.flatten``; a view/reshape is 1..-1)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module.start_dim, module.end_dim
    if node.target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start, end
    return 1, -1


def maxpool_of(gm: fx.GraphModule, node: fx.Node) -> nn.MaxPool2d:
    """The ``nn.MaxPool2d`` a max-pool node computes (the module itself, or one built from ``F.max_pool2d``'s args)."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    return nn.MaxPool2d(**(dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)))


def _activation(name: str) -> DPUVerdict:
    lower = name.lower()
    lowered = "export_xmodel lowers ReLU, ReLU6, and Hard-Sigmoid/Hard-Swish right after a conv or linear layer"
    if lower in _DPU_FUSABLE:
        why = f"the DPU fuses it into a conv, but {lowered}"
    elif lower in _DPU_SWAPPED:
        why = (
            "left as PyTorch's float op: prepare(target='dpu') of this version swaps in the DPU's computation; "
            "quantize the float model again"
        )
    else:
        why = lowered
    return DPUVerdict(name, f"activation {name} ({why})")


def _through_fix(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, bool]:
    """The op whose value ``node``'s input is (looking through quantizers and no-ops), and whether every node on the way
    has that one reader (so the op can fuse with ``node``)."""
    current, single = node, True
    while current.args and isinstance(current.args[0], fx.Node):
        source = current.args[0]
        single = single and len(source.users) == 1
        if dpu_verdict(gm, source).op not in ("fix", "identity"):
            return source, single
        current = source
    return None, single


def _hard_activation(gm: fx.GraphModule, node: fx.Node, op: str) -> DPUVerdict:
    """Hard-Sigmoid / Hard-Swish: fused into the conv2d, depthwise-conv2d or matmul right before them."""
    source, single = _through_fix(gm, node)
    verdict = dpu_verdict(gm, source) if source is not None else None
    if verdict is None or not verdict.on_dpu or verdict.op not in _FUSING_OPS or not single:
        after = "" if verdict is None else f" after the {verdict.op}"
        why = "" if single or verdict is None else " that also feeds other ops"
        return DPUVerdict(
            op,
            f"a standalone {op}{after}{why} (DPUCZDX8G runs it fused into the conv2d, depthwise-conv2d or linear "
            "layer it directly follows; a standalone one needs the ALU engine of newer DPUs)",
        )
    if op == "hard-sigmoid" and not all(dpu_verdict(gm, user).op == "fix" for user in node.users):
        return DPUVerdict(
            op,
            "a hard-sigmoid whose output is not quantized (the DPU writes it as int8: feed it to a quantized op, "
            "such as the multiply of a squeeze-and-excitation block)",
        )
    return DPUVerdict(op)


def _range_problem(what: str, values: tuple[int, int], low: int, high: int) -> str | None:
    if all(low <= v <= high for v in values):
        return None
    return f"{what} {values[0]}x{values[1]} (DPUCZDX8G: {what} sides {low}..{high})"


def _window_problem(
    op: str, kernel: tuple[int, int], stride: tuple[int, int] | None, pad: tuple[int, int], dilation=(1, 1)
) -> str | None:
    """Kernel / stride / padding limits of a conv or pool window (``kernel``, ``stride``, ``pad`` as (h, w))."""
    k_max = {"conv2d": CONV_KERNEL, "depthwise-conv2d": DEPTHWISE_KERNEL}.get(op, POOL_KERNEL)
    s_max = {"conv2d": CONV_STRIDE, "depthwise-conv2d": DEPTHWISE_STRIDE}.get(op, POOL_STRIDE)
    problem = _range_problem("kernel", kernel, 1, k_max) or (stride and _range_problem("stride", stride, 1, s_max))
    if problem:
        return f"a {op} with {problem}"
    limits = tuple((k - 1) * d for k, d in zip(kernel, dilation, strict=True))
    if any(p < 0 or p > lim for p, lim in zip(pad, limits, strict=True)):
        return (
            f"a {op} with padding {pad[0]}x{pad[1]} (DPUCZDX8G: padding per side 0..(kernel - 1) * dilation = "
            f"{limits[0]}x{limits[1]})"
        )
    if op not in ("conv2d", "depthwise-conv2d") and math.ceil(kernel[0] / BANK_NUM) * kernel[1] > BANK_DEPTH:
        return f"a {op} with kernel {kernel[0]}x{kernel[1]} (DPUCZDX8G: ceil(kernel_h / 8) * kernel_w <= {BANK_DEPTH})"
    return None


def _conv(node: fx.Node, conv: QuantConv2d) -> DPUVerdict:
    depthwise = is_depthwise(conv)
    op = "depthwise-conv2d" if depthwise else "conv2d"
    if conv.groups > 1 and not depthwise:
        if conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0:
            return DPUVerdict(
                op,
                f"a depthwise conv with channel multiplier {conv.out_channels // conv.in_channels} (groups="
                f"{conv.groups}, {conv.in_channels} -> {conv.out_channels} channels; the DPU's depthwise-conv2d "
                "takes multiplier 1)",
            )
        return DPUVerdict(op, f"a grouped conv (groups={conv.groups}, not depthwise with multiplier 1)")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return DPUVerdict(op, f"a conv with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    shape = _input_shape(node)
    if shape is None or len(shape) != 4:
        rank = "no tensor" if shape is None else f"a {len(shape)}-D tensor"
        return DPUVerdict(op, f"a {op} on {rank} (the DPU takes 4-D NCHW batches)")
    kernel, dilation = _pair(conv.kernel_size), _pair(conv.dilation)
    problem = _window_problem(op, kernel, _pair(conv.stride), _pair(conv.padding), dilation)
    if problem:
        return DPUVerdict(op, problem)
    limit = 256 * CHANNEL_PARALLEL
    if max(dilation) * conv.in_channels > limit:
        return DPUVerdict(op, f"a dilated {op} (dilation * input channels must be <= {limit})")
    if kernel[0] * kernel[1] * math.ceil(conv.in_channels / CHANNEL_PARALLEL) > BANK_DEPTH:
        return DPUVerdict(
            op,
            f"a {op} with {conv.in_channels} input channels and a {kernel[0]}x{kernel[1]} kernel (DPUCZDX8G: "
            f"kernel_w * kernel_h * ceil(input_channel / {CHANNEL_PARALLEL}) <= {BANK_DEPTH})",
        )
    if conv.out_channels > limit:
        return DPUVerdict(op, f"a {op} with {conv.out_channels} output channels (DPUCZDX8G: at most {limit})")
    return DPUVerdict(op)


def _maxpool(node: fx.Node, pool: nn.MaxPool2d) -> DPUVerdict:
    if _pair(pool.dilation) != (1, 1):
        return DPUVerdict("maxpool2d", "a dilated max pool")
    if pool.return_indices:
        return DPUVerdict("maxpool2d", "a max pool that returns indices")
    shape = _input_shape(node)
    if shape is None or len(shape) != 4:
        return DPUVerdict("maxpool2d", "a max pool of a tensor that is not 4-D NCHW")
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return DPUVerdict("maxpool2d", _window_problem("maxpool2d", kernel, stride, _pair(pool.padding)))


def _avgpool(node: fx.Node, pool: DPUAvgPool2d) -> DPUVerdict:
    shape = _input_shape(node)
    if shape is None or len(shape) != 4:
        return DPUVerdict("avgpool2d", "an average pool of a tensor that is not 4-D NCHW")
    try:
        kernel, stride, pad = pool.window(shape[2], shape[3])
    except ValueError as err:
        return DPUVerdict("avgpool2d", str(err).rstrip("."))
    return DPUVerdict("avgpool2d", _window_problem("avgpool2d", kernel, None if pool.global_pool else stride, pad))


def _flatten(gm: fx.GraphModule, node: fx.Node) -> DPUVerdict:
    src, out = _input_shape(node), node_shape(node)
    if src is None or out is None:
        return DPUVerdict("reshape", "a reshape of something that is not one tensor")
    if node.op == "call_method" and node.target in ("view", "reshape"):
        if len(out) != 2 or out[0] != src[0]:
            return DPUVerdict(
                "reshape", f"a {node.target} to {out} (only flattening to [batch, features] is supported)"
            )
    start, end = flatten_dims(gm, node)
    if start % len(src) != 1 or end % len(src) != len(src) - 1:
        return DPUVerdict("reshape", f"a flatten of dims {start}..{end} (only dims 1..-1 are supported)")
    return DPUVerdict("reshape")


def is_flattened(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node``'s value is a 4-D activation flattened to [batch, features] (through quantizers, ReLUs and
    no-ops): the XModel holds it in NHWC order, so slicing or padding it would address the wrong elements."""
    verdict = dpu_verdict(gm, node)
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if src is None:
        return False
    if verdict.op == "reshape":
        shape = node_shape(src)
        return (shape is not None and len(shape) == 4) or is_flattened(gm, src)
    return verdict.op in ("fix", "relu", "relu6", "identity") and is_flattened(gm, src)


def _slice(gm: fx.GraphModule, node: fx.Node) -> DPUVerdict:
    """``x[:, a:b:s, ...]``: plain slices only, the batch dimension whole, steps >= 1, an unflattened tensor."""
    src, index = _input_shape(node), node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    plain = src is not None and index and all(isinstance(i, slice) for i in index) and len(index) <= len(src)
    if not plain or is_flattened(gm, node.args[0]):
        return DPUVerdict("strided_slice", "an indexing that is not plain slicing of an unflattened tensor")
    whole = index[0].start in (None, 0) and index[0].stop is None and index[0].step in (None, 1)
    if not whole:  # judged on the slice itself: the export traces one example, so indices() would hide it
        return DPUVerdict("strided_slice", "a slice of the batch dimension")
    if any(i.indices(n)[2] < 1 for i, n in zip(index, src, strict=False)):
        return DPUVerdict("strided_slice", "a slice with a negative step")
    return DPUVerdict("strided_slice")


def pad_arguments(node: fx.Node) -> dict:
    """``F.pad``'s arguments by name (``pad``, ``mode``, ``value``)."""
    return dict(zip(["pad", "mode", "value"], node.args[1:], strict=False)) | dict(node.kwargs)


def _pad(gm: fx.GraphModule, node: fx.Node) -> DPUVerdict:
    kwargs, src = pad_arguments(node), _input_shape(node)
    if kwargs.get("mode", "constant") != "constant" or kwargs.get("value") not in (None, 0, 0.0):
        return DPUVerdict("pad", "a pad that is not constant zero padding")
    pads = list(kwargs["pad"])
    if src is None or is_flattened(gm, node.args[0]) or len(pads) % 2 or len(pads) // 2 >= len(src):
        return DPUVerdict("pad", "a pad of the batch dimension or of a flattened tensor")
    return DPUVerdict("pad")


def _add(node: fx.Node) -> DPUVerdict:
    args = [a for a in node.args if isinstance(a, fx.Node)]
    shapes = [node_shape(a) for a in args]
    if len(args) != 2 or len(node.args) != 2 or node.kwargs or shapes[0] is None or shapes[0] != shapes[1]:
        return DPUVerdict("add", "an add that is not tensor + tensor of one shape")
    return DPUVerdict("add")


def _mul(gm: fx.GraphModule, node: fx.Node) -> DPUVerdict:
    """``a * b`` of two tensors: one shape, or NCHW times a per-channel ``[N, C, 1, 1]`` (squeeze-and-excitation)."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if len(args) != 2 or len(node.args) != 2 or node.kwargs:
        return DPUVerdict(
            "mul",
            "a multiply by a constant (the DPU's element-wise multiply takes two int8 tensors; fold the constant into "
            "the layer before)",
        )
    a, b = (node_shape(arg) for arg in args)
    if a is None or b is None:
        return DPUVerdict("mul", "a multiply of something that is not one tensor")
    if any(is_flattened(gm, arg) for arg in args):
        return DPUVerdict("mul", "a multiply of a flattened tensor (the XModel holds it in NHWC order)")
    small, big = sorted((a, b), key=lambda shape: math.prod(shape))
    per_channel = len(big) == 4 and small == [big[0], big[1], 1, 1]
    if a != b and not per_channel:
        return DPUVerdict(
            "mul", f"a multiply of shapes {a} and {b} (the DPU takes one shape, or [N, C, H, W] times [N, C, 1, 1])"
        )
    if len(big) == 4 and big[1] > ELTWISE_CHANNELS:
        return DPUVerdict("mul", f"a multiply of {big[1]} channels (DPUCZDX8G: at most {ELTWISE_CHANNELS})")
    return DPUVerdict("mul")


def resize_arguments(gm: fx.GraphModule, node: fx.Node) -> dict:
    """An upsampling node's ``mode``, ``align_corners``, ``scale_factor`` (or None), ``recompute_scale_factor`` and
    ``antialias``, from the ``nn.Upsample`` module or the ``F.interpolate`` call.

    Example:
        >>> gm = fx.symbolic_trace(nn.Upsample(scale_factor=2, mode="bilinear"))
        >>> args = resize_arguments(gm, list(gm.graph.nodes)[1])
        >>> args["mode"], args["scale_factor"], args["align_corners"]
        ('bilinear', 2.0, None)
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        names = ["mode", "align_corners", "scale_factor", "recompute_scale_factor"]
        kwargs = {k: getattr(module, k, None) for k in names}
    else:
        names = ["size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"]
        kwargs = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
    return {"mode": "nearest", "align_corners": None, "scale_factor": None, "recompute_scale_factor": None,
            "antialias": False} | {k: v for k, v in kwargs.items() if k != "size" and v is not None}  # fmt: skip


def _resize(gm: fx.GraphModule, node: fx.Node) -> DPUVerdict:
    """Nearest upsampling by integer factors; bilinear (``align_corners=False``) by 2 or 4 on both sides."""
    src, out = _input_shape(node), node_shape(node)
    if src is None or out is None or len(src) != 4 or len(out) != 4:
        return DPUVerdict("resize", "a resize of a tensor that is not 4-D NCHW")
    args = resize_arguments(gm, node)
    mode = args["mode"]
    if mode not in ("nearest", "bilinear") or args["antialias"]:
        return DPUVerdict("resize", f"a resize with mode={mode!r} (the DPU resizes 'nearest' and 'bilinear' only)")
    if args["align_corners"]:
        return DPUVerdict("resize", "a resize with align_corners=True (the DPU takes align_corners=False)")
    if out[2] % src[2] or out[3] % src[3]:
        return DPUVerdict(
            "resize", f"a resize from {src[2]}x{src[3]} to {out[2]}x{out[3]} (the DPU upsamples by integer factors)"
        )
    scale = (out[2] // src[2], out[3] // src[3])
    factor = args["scale_factor"]
    if factor is not None and not args["recompute_scale_factor"]:  # PyTorch then indexes with 1 / scale_factor
        factors = (factor, factor) if isinstance(factor, (int, float)) else tuple(factor)
        if tuple(float(f) for f in factors) != tuple(float(s) for s in scale):
            return DPUVerdict("resize", f"a resize with scale_factor={factor} (the DPU upsamples by integer factors)")
    if mode == "bilinear" and (scale[0] != scale[1] or scale[0] not in BILINEAR_SCALES):
        return DPUVerdict(
            "resize",
            f"a bilinear resize by {scale[0]}x{scale[1]} (DPUCZDX8G: the same scale, 2 or 4, on both sides, which the "
            "compiler turns into a depthwise transposed conv)",
        )
    if src[1] > ELTWISE_CHANNELS:
        return DPUVerdict("resize", f"a resize of {src[1]} channels (DPUCZDX8G: at most {ELTWISE_CHANNELS})")
    source = node.args[0]
    if not isinstance(source, fx.Node) or dpu_verdict(gm, source).op != "fix":
        return DPUVerdict(
            "resize", "a resize of a tensor that is not quantized (the DPU reads int8: quantize its input first)"
        )
    return DPUVerdict("resize")


def _module(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> DPUVerdict:
    if isinstance(module, FakeQuantize):
        return DPUVerdict("fix")
    if isinstance(module, QuantConv2d):
        return _conv(node, module)
    if isinstance(module, QuantLinear):
        shape = _input_shape(node)
        if shape is None or len(shape) != 2:
            rank = "no tensor" if shape is None else f"a {len(shape)}-D input"
            return DPUVerdict("matmul", f"a linear layer on {rank} (flatten to 2-D first)")
        return DPUVerdict("matmul")
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return DPUVerdict("relu" if isinstance(module, nn.ReLU) else "relu6")
    if isinstance(module, nn.MaxPool2d):
        return _maxpool(node, module)
    if isinstance(module, DPUAvgPool2d):
        return _avgpool(node, module)
    if isinstance(module, (DPUHardsigmoid, DPUHardswish)):
        return _hard_activation(gm, node, "hard-sigmoid" if isinstance(module, DPUHardsigmoid) else "hard-swish")
    if isinstance(module, nn.Upsample):
        return _resize(gm, node)
    if isinstance(module, nn.Flatten):
        return _flatten(gm, node)
    if isinstance(module, _PASSTHROUGH_MODULES):
        return DPUVerdict("identity")
    kind = type(module).__name__
    if isinstance(module, _ACTIVATION_MODULES):
        return _activation(kind)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return DPUVerdict(kind, f"a float {kind} (kept in float: excluded from quantization; the DPU runs int8 only)")
    if isinstance(module, QuantConvBn):
        return DPUVerdict(kind, "a QAT conv+BatchNorm (call convert() first: export folds the BatchNorm)")
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return DPUVerdict(
            kind,
            f"a float {kind} (lightning_quant does not quantize transposed convs yet, so it stays float; the DPU's "
            "transposed-conv2d needs int8 weights)",
        )
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return DPUVerdict(kind, f"module {kind} (no DPU lowering here: conv2d on 4-D NCHW tensors only)")
    return DPUVerdict(kind, f"module {kind} (export_xmodel has no DPU lowering for it)")


def _call(gm: fx.GraphModule, node: fx.Node) -> DPUVerdict:
    target = node.target
    if target in _PASSTHROUGH_CALLS:
        return DPUVerdict("identity")
    if target in _RELU_CALLS:
        return DPUVerdict("relu")
    if target is F.relu6 or (target is F.hardtanh and is_fused_activation(gm, node)):
        return DPUVerdict("relu6")
    if target in _ADD_CALLS:
        return _add(node)
    if target in _MUL_CALLS:
        return _mul(gm, node)
    if target in _RESIZE_CALLS:
        return _resize(gm, node)
    if _name(target) == "stochastic_depth" and (node.args[3:4] == (False,) or node.kwargs.get("training") is False):
        return DPUVerdict("identity")  # torchvision.ops.stochastic_depth outside training returns its input
    if target in _CAT_CALLS:
        return DPUVerdict("concat")
    if target in _FLATTEN_CALLS:
        return _flatten(gm, node)
    if target is operator.getitem:
        return _slice(gm, node)
    if target is F.pad:
        return _pad(gm, node)
    if target is F.max_pool2d:
        return _maxpool(node, maxpool_of(gm, node))
    if target in _ACTIVATION_CALLS:
        return _activation(_name(target))
    return DPUVerdict(_name(target), f"{_name(target)} (export_xmodel has no DPU lowering for it)")


def dpu_verdict(gm: fx.GraphModule, node: fx.Node) -> DPUVerdict:
    """What ``node`` of the DPU-prepared, shape-propagated graph ``gm`` is, and why the DPU cannot run it (if so).

    ``reason`` is a noun phrase naming the problem ("a grouped conv (groups=2, ...)", "activation Sigmoid (...)");
    export_xmodel's error reads ``export_xmodel cannot lower <reason> (node ...)``.
    """
    if node.op == "placeholder":
        ok = node_shape(node) is not None
        return DPUVerdict("data", None if ok else "an input that is not one tensor")
    if node.op == "output":
        return DPUVerdict("output")
    if is_shape_value(node) or (node.op == "get_attr" and node.users and all(map(is_shape_value, node.users))):
        return DPUVerdict("shape")
    if node.op == "get_attr":
        return DPUVerdict("get_attr", "a tensor read from the model inside forward (a get_attr node)")
    if node.op == "call_module":
        verdict = _module(gm, node, gm.get_submodule(node.target))
    else:
        verdict = _call(gm, node)
    if verdict.on_dpu and verdict.op not in ("fix", "identity") and node_shape(node) is None:
        return DPUVerdict(verdict.op, f"a {verdict.op} that does not produce one tensor")
    return verdict
