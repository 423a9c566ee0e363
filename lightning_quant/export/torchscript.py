"""TorchScript export: int8 weights + scales in the file, loads with plain ``torch.jit.load``.

The file needs no lightning_quant at load time. Weights are stored as int8 tensors with float per-channel
scales (about 4x smaller than float) and dequantized on the fly; activations are quantize-dequantized with the
frozen qparams, so outputs equal the fake-quant model's. For integer-kernel speed, deploy the ONNX export.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize, export_torchscript
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    >>> qmodel = quantize(model, [torch.randn(4, 3, 8, 8)], progress=False)
    >>> path = export_torchscript(qmodel, tempfile.mkdtemp() + "/model.pt", torch.randn(1, 3, 8, 8))
    >>> loaded = torch.jit.load(str(path))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.equal(loaded(x), qmodel(x))
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.export._atomic import atomic_path, check_output_path
from lightning_quant.export._jit_warnings import quiet_jit_deprecation
from lightning_quant.export.deploy import deploy_model
from lightning_quant.export.verify import gate_export

__all__ = ["export_torchscript"]


def export_torchscript(
    qmodel: nn.Module,
    path: str | Path,
    example_input: Any,
    *,
    verify: bool = True,
    min_top1_agreement: float = 0.99,
    verification_data: Iterable[Any] | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    max_verify_batches: int = 8,
) -> Path:
    """Trace the deployable model and save it as TorchScript (atomically).

    Args:
        qmodel: calibrated/QAT model.
        path: destination ``.pt`` / ``.pth`` file.
        example_input: one model input (tensor, tuple of args or dict of kwargs).
        verify: reload the file and compare with the fake-quant model on ``example_input``.
        min_top1_agreement: agreement threshold for ``verify``.
        verification_data: a few held-out batches to verify on instead of ``example_input`` alone (see
            :func:`~lightning_quant.export.verify.gate_inputs`).
        transform_fn: maps one item of ``verification_data`` to the model input.
        max_verify_batches: verify on at most this many batches of ``verification_data``.

    Raises:
        NotCalibratedError: the model was not calibrated.
        ValueError: bad path, or weights that are not symmetric signed.
        ExportVerificationError: the reloaded file disagrees with the model.
    """
    path = check_output_path(path, (".pt", ".pth", ".torchscript"))
    deployed = deploy_model(qmodel, onnx_ops=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        quiet_jit_deprecation()
        if isinstance(example_input, dict):
            traced = torch.jit.trace(deployed, example_kwarg_inputs=example_input, strict=False)
        else:
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            traced = torch.jit.trace(deployed, args, strict=False)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            quiet_jit_deprecation()
            torch.jit.save(traced, str(tmp))
        if verify:
            gate_export(
                qmodel, tmp, path, example_input, verification_data=verification_data, transform_fn=transform_fn,
                max_batches=max_verify_batches, min_top1_agreement=min_top1_agreement,
            )  # fmt: skip
    return path
