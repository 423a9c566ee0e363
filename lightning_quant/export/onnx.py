"""INT8 ONNX export in QDQ format that onnxruntime fuses into integer kernels.

The graph holds int8 weight initializers with constant per-channel scales (``DequantizeLinear`` only),
int32 biases with scale ``input_scale * weight_scale``, BatchNorm folded, and QuantizeLinear/DequantizeLinear
pairs where the model was quantized (uint8 activations for ``x86``, int8 for ``tensorrt``). The batch
dimension is dynamic. Files are written atomically and checked with ``onnx.checker``.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize, export_onnx
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    >>> qmodel = quantize(model, [torch.randn(4, 3, 8, 8) for _ in range(2)], progress=False)
    >>> path = export_onnx(qmodel, tempfile.mkdtemp() + "/model.onnx", torch.randn(1, 3, 8, 8), verify=False)
    >>> path.name
    'model.onnx'
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.export._atomic import atomic_path, check_output_path
from lightning_quant.export.deploy import deploy_model, rounds_unlike_onnx
from lightning_quant.export.onnx_passes import (
    add_weight_zero_points,
    quantize_biases,
    requantize_after_shape_ops,
    strip_metadata,
)

__all__ = [
    "add_weight_zero_points",
    "export_float_onnx",
    "export_onnx",
    "quantize_biases",
    "requantize_after_shape_ops",
    "strip_metadata",
]


def _as_args(example_input: Any) -> tuple[tuple, dict]:
    if isinstance(example_input, tuple):
        return example_input, {}
    if isinstance(example_input, dict):
        return (), example_input
    return (example_input,), {}


def _dynamic_batch(args: tuple, kwargs: dict) -> tuple | dict:
    batch = torch.export.Dim("batch", min=1, max=4096)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return {0: batch}
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        return None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def _has_batch_of_one(args: tuple, kwargs: dict) -> bool:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1 for t in leaves)


def _size_oblivious(enabled: bool = True):
    """Keep a batch of 1 in ``example_input`` dynamic (torch.export specializes size-1 dims; torch.onnx does too).

    Only switched on for such inputs: size-oblivious reasoning adds a ``batch != 1`` guard to some graphs (e.g. a
    ViT's class-token ``expand``), which then fails the ``min=1`` batch range for examples with more samples.
    """
    if not enabled:
        return contextlib.nullcontext()
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - older/newer torch without the switch
        return contextlib.nullcontext()
    if not hasattr(_config, "backed_size_oblivious"):  # pragma: no cover
        return contextlib.nullcontext()
    return _config.patch(backed_size_oblivious=True)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's own chatter (torch.onnx / onnxscript log every folding decision at INFO, which an
    application's INFO logging, e.g. Hydra's, would print by the hundred); levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torch_export_to_onnx(deployed: nn.Module, args: tuple, kwargs: dict, opset: int, dynamic_batch: bool):
    from lightning_quant.export.qdq_ops import onnx_translations

    with _quiet_exporter():
        exported, dynamic_batch = _capture(deployed, args, kwargs, dynamic_batch)
        program = torch.onnx.export(
            exported,
            (),
            dynamo=True,
            opset_version=opset,
            custom_translation_table=onnx_translations(),
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    if dynamic_batch:
        _name_batch_dim(proto)
    return proto


def _capture(deployed: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool) -> tuple[Any, bool]:
    """``torch.export`` of the deployable copy, with a dynamic batch when the model allows one; a model that fixes
    its batch size is captured at the example's batch, with a warning. Returns the program and whether the batch
    stayed dynamic.

    Raises:
        RuntimeError: the model cannot be captured; the message names the cause (see :func:`explain_export_failure`).
    """
    try:
        shapes = _dynamic_batch(args, kwargs) if dynamic_batch else None
        with _size_oblivious(dynamic_batch and _has_batch_of_one(args, kwargs)):
            return torch.export.export(
                deployed, args, kwargs or None, dynamic_shapes=shapes, strict=False
            ), dynamic_batch
    except Exception as error:  # torch.export raises many types; all mean the graph could not be captured
        if not (dynamic_batch and _cause(error) == "dynamic shapes"):
            raise RuntimeError(explain_export_failure(error)) from error
    try:
        exported = torch.export.export(deployed, args, kwargs or None, strict=False)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(explain_export_failure(error)) from error
    batch = next((t.shape[0] for t in _tensors(args, kwargs) if t.dim()), "?")
    warnings.warn(
        f"the model fixes its batch size (it turns the batch dimension into a Python number, e.g. torch.zeros(x.shape) "
        f"or a reshape with the batch written out), so the ONNX file takes batch {batch} only. Pass "
        "dynamic_batch=False to say so and silence this warning, or keep the batch symbolic in the model.",
        UserWarning,
        stacklevel=4,
    )
    return exported, False


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]


_CAUSES = (  # (cause, needles in torch.export's message), most specific first
    ("missing attribute", ("referenced nonexistent target", "has no attribute")),
    ("dynamic shapes", ("Constraints violated", "specialized", "dynamic_shapes", "marked dynamic")),
    (
        "data-dependent control flow",
        ("data-dependent", "data dependent", "GuardOnDataDependent", "symbolically traced variables"),
    ),
    ("unsupported operator", ("not supported", "Unsupported", "no decomposition", "not implemented")),
)
_FIXES = {
    "missing attribute": (
        "the graph reads {detail}, which the deployable (int8) copy of the model does not have: a parameter of a "
        "quantized layer is read outside the layer's own call. Call the layer instead of reading its weight, or "
        "exclude=['<that layer>'] to keep it float"
    ),
    "dynamic shapes": "the batch dimension cannot stay symbolic in this model: pass dynamic_batch=False",
    "data-dependent control flow": (
        "Python control flow on a tensor value (an if/while on data) cannot be exported to ONNX: express it with "
        "tensor ops (torch.where) or torch.cond, or export TorchScript with export_torchscript, which records the path "
        "example_input takes"
    ),
    "unsupported operator": (
        "an operator torch.export or the ONNX exporter does not support; keep that part float (exclude=[...]) or "
        "export TorchScript with export_torchscript"
    ),
}


def _cause(error: BaseException) -> str | None:
    text = str(error)
    return next((cause for cause, needles in _CAUSES if any(n in text for n in needles)), None)


def explain_export_failure(error: BaseException) -> str:
    """What a ``torch.export`` failure means for the user: the cause (a missing attribute after prepare, dynamic
    shapes, data-dependent control flow, an unsupported operator) with the node it names and the fix; an
    unrecognised failure is reported as it is, never with a guessed cause.

    Example:
        >>> message = explain_export_failure(RuntimeError("Node referenced nonexistent target layer.weight"))
        >>> "the graph reads layer.weight," in message
        True
    """
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    cause = _cause(error)
    if cause is None:
        return (
            f"torch.export could not capture the model for ONNX ({type(error).__name__}: {first_line[:300]}). "
            "export_torchscript records the path example_input takes and may work where torch.export does not."
        )
    detail = first_line.rsplit(" ", 1)[-1] if cause == "missing attribute" else ""
    return (
        f"torch.export could not capture the model for ONNX: {_FIXES[cause].format(detail=detail)} "
        f"[{type(error).__name__}: {first_line[:300]}]"
    )


def _name_batch_dim(model) -> None:
    """Call the symbolic batch dimension ``batch`` (torch.export names it ``s0``, ``s77``, ...)."""
    values = list(model.graph.input) + list(model.graph.output)
    symbols = {v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input if v.type.tensor_type.shape.dim}
    symbols.discard("")
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = "batch"


def export_onnx(
    qmodel: nn.Module,
    path: str | Path,
    example_input: Any,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    verify: bool = True,
    min_top1_agreement: float = 0.99,
    verification_data: Iterable[Any] | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    max_verify_batches: int = 8,
) -> Path:
    """Export a calibrated/QAT model to an INT8 QDQ ONNX file.

    Args:
        qmodel: model from :func:`~lightning_quant.quantize` or a QuantCallback-prepared network.
        path: destination ``.onnx`` file (replaced atomically; an earlier file survives a failed export).
        example_input: one model input (tensor, tuple of args or dict of kwargs) used for tracing and checks.
        opset: ONNX opset, 18 or newer (per-channel QDQ needs >= 13, and torch.onnx's exporter writes >= 18:
            it cannot convert these graphs down to 13-17).
        dynamic_batch: make dimension 0 of every input dynamic.
        verify: run the file with onnxruntime on ``example_input`` and compare with the fake-quant model
            (see :func:`lightning_quant.export.verify.verify_onnx`); raises when it disagrees.
        min_top1_agreement: agreement threshold for ``verify``.
        verification_data: a few held-out batches (a DataLoader, a list) to verify on instead of ``example_input``
            alone: top-1 agreement over many images catches a model whose outputs differ between runtimes near its
            decision boundaries, which one example does not (see :func:`~lightning_quant.export.verify.gate_inputs`).
        transform_fn: maps one item of ``verification_data`` to the model input (default: first element of
            ``(input, label)`` pairs).
        max_verify_batches: verify on at most this many batches of ``verification_data``.

    Returns:
        The written path.

    Raises:
        NotCalibratedError: the model was not calibrated.
        ValueError: bad path, opset < 18, or a scheme ONNX QDQ cannot express (non-8-bit activations, rounding other
            than half to even with non-power-of-two scales).
        RuntimeError: ``torch.export`` cannot capture the model (data-dependent Python control flow).
        ExportVerificationError: ``verify`` found the file disagrees with the model.
    """
    import onnx

    path = check_output_path(path, (".onnx",))
    if opset < 13:
        raise ValueError(f"opset={opset}: per-channel QDQ needs opset >= 13; use opset=18 (the default).")
    if opset < 18:
        raise ValueError(
            f"opset={opset}: torch.onnx's exporter writes opset 18 or newer and cannot convert this graph down "
            "(ReduceMean/Relu adapters fail); use opset=18 (the default), which every onnxruntime >= 1.14 runs."
        )
    deployed = deploy_model(qmodel, onnx_ops=True)
    half_up = rounds_unlike_onnx(deployed)
    if half_up:
        warnings.warn(
            f"{len(half_up)} activation quantizer(s) round half up (the DPU scheme); ONNX QuantizeLinear rounds exact "
            "ties half to even, so the file can differ from the model by one code at ties (as Vitis AI's own ONNX "
            "export does). The verification gate measures the agreement; export_xmodel keeps the DPU rounding.",
            stacklevel=2,
        )
    args, kwargs = _as_args(example_input)
    proto = _torch_export_to_onnx(deployed, args, kwargs, opset, dynamic_batch)
    requantize_after_shape_ops(proto)
    quantize_biases(proto)
    add_weight_zero_points(proto)
    strip_metadata(proto)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        if verify:
            from lightning_quant.export.verify import gate_export

            gate_export(
                qmodel, tmp, path, example_input, verification_data=verification_data, transform_fn=transform_fn,
                max_batches=max_verify_batches, min_top1_agreement=min_top1_agreement,
            )  # fmt: skip
    return path


def export_float_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, *, opset: int = 18) -> Path:
    """The float baseline to compare an INT8 export with (``verify_export(..., float_path=...)``): the same exporter,
    weights inline, dynamic batch, exporter metadata stripped, so file sizes and latencies compare like with like.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> path = export_float_onnx(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), tempfile.mkdtemp() + "/f.onnx",
        ...                          torch.randn(1, 3, 8, 8))
        >>> path.suffix
        '.onnx'

    Raises:
        ValueError: bad path.
    """
    import onnx

    path = check_output_path(path, (".onnx",))
    with _quiet_exporter():
        program = torch.onnx.export(
            model.eval(),
            (example_input,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    strip_metadata(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp), save_as_external_data=False)
    return path
