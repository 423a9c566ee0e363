"""Feeding data to a prepared model: input conventions and the PTQ calibration loop.

``transform_fn`` maps one item of the calibration data to the model input (NNCF's convention). Its result
is passed as ``model(*x)`` for a tuple, ``model(**x)`` for a dict and ``model(x)`` otherwise; the default
takes the first element of ``(input, label)`` pairs and the item itself for anything else.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant.config import scheme_for_target
    >>> from lightning_quant.quantizers import prepare
    >>> qmodel = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), scheme_for_target("x86"))
    >>> calibrate(qmodel, [(torch.randn(2, 3, 8, 8), 0)] * 3, progress=False)
    3
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_quant.quantizers.prepare import iter_quantizers, set_fake_quant, set_observers

__all__ = ["calibrate", "call_model", "default_transform", "move_to_device"]


def default_transform(item: Any) -> Any:
    """The item itself, or its first element when it is an ``(input, label, ...)`` tuple/list."""
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0]
    return item


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with ``inputs`` following the convention in this module's docstring."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _describe(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"Tensor(shape={tuple(inputs.shape)}, dtype={inputs.dtype})"
    if isinstance(inputs, (tuple, list)):
        return f"{type(inputs).__name__}[{', '.join(_describe(v) for v in inputs)}]"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    desc: str = "Calibrating",
    shard: bool = False,
) -> int:
    """Run ``data`` through a prepared model with observers on and fake-quant off, then freeze the ranges.

    Afterwards observers are off and fake-quant is on: ``model(x)`` gives the quantized output.

    Args:
        model: a model returned by :func:`~lightning_quant.quantizers.prepare`.
        data: any iterable of batches (DataLoader, list, generator).
        transform_fn: maps one item of ``data`` to the model input.
        num_batches: stop after this many batches (all of ``data`` when None).
        progress: show a progress bar.
        desc: progress bar label.
        shard: ``data`` is this process's share of a distributed calibration: an empty share returns 0 instead of
            raising, and the range estimate is left to :func:`lightning_quant.distributed.sync_quantizers` (which
            merges every rank's statistics first), so histogram searches run once, on the merged state.

    Returns:
        The number of batches used.

    Raises:
        ValueError: ``data`` yielded no batch or only batches of size 0, ``num_batches`` < 1, or a batch could not
            be fed to the model (the message shows what the batch looked like and how to fix ``transform_fn``).
        FloatingPointError: NaN/inf reached an observer (the message names the layer).
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1 (or None for the whole calibration data).")
    transform = transform_fn or default_transform
    device = _model_device(model)
    was_training = model.training
    model.eval()
    set_observers(model, True)
    set_fake_quant(model, False)
    total = num_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
    seen = empty = 0
    inputs: Any = None
    try:
        for item in tqdm(data, total=total, desc=desc, disable=not progress, leave=False, unit="batch"):
            if num_batches is not None and seen >= num_batches:
                break
            inputs = move_to_device(transform(item), device)
            empty += not _has_samples(inputs)
            try:
                call_model(model, inputs)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"calibration batch {seen} could not be fed to the model: {str(err).splitlines()[0]}. The model "
                    f"received {_describe(inputs)}. Make transform_fn return exactly the model input (a tuple is "
                    "passed as positional arguments, a dict as keyword arguments)."
                ) from err
            seen += 1
    finally:
        set_observers(model, False)
        if shard:  # fake-quant on, estimate deferred (sync_quantizers, or the next forward pass, makes it)
            for _, fq in iter_quantizers(model):
                fq.fake_quant_enabled.fill_(1)
        else:
            set_fake_quant(model, True)
        model.train(was_training)
    if shard:
        return seen
    if seen == 0:
        raise ValueError(
            "calibration data is empty: no batch was produced. Pass a non-empty DataLoader/list (check the dataset "
            "path, the split and drop_last with a batch size larger than the dataset)."
        )
    if empty == seen:
        raise ValueError(
            f"all {seen} calibration batch(es) hold no samples (the model received {_describe(inputs)}): observers "
            "cannot calibrate on a batch of size 0. Check the dataset, the sampler and transform_fn."
        )
    _warn_unreached(model)
    return seen


def _has_samples(inputs: Any) -> bool:
    """Whether the model input holds any data: False when every tensor in it is empty (a batch of size 0)."""
    from torch.utils._pytree import tree_leaves

    tensors = [leaf for leaf in tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
    return not tensors or any(t.numel() > 0 for t in tensors)


def _warn_unreached(model: nn.Module) -> None:
    missing = [name for name, fq in iter_quantizers(model) if not fq.calibrated.item()]
    if missing:
        warnings.warn(
            f"{len(missing)} quantizer(s) saw no data during calibration and stay in float until they do: "
            f"{', '.join(missing[:5])}. This happens for branches the calibration inputs never take.",
            stacklevel=3,
        )
