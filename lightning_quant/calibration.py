"""Feeding data to a prepared model: input conventions and the PTQ calibration loop.

``transform_fn`` maps one item of the calibration data to the model input (NNCF's convention). Its result
is passed as ``model(*x)`` for a tuple, ``model(**x)`` for a dict and ``model(x)`` otherwise; the default
takes the first element of ``(input, label)`` pairs and the item itself for anything else.

A batch the model cannot take (wrong shape, dtype, arity, a non-tensor) raises a ``ValueError`` that shows what
the model received; any other error from the model (``torch.OutOfMemoryError``, a CUDA error, the model's own
exceptions) is raised as itself, with a note naming the batch.

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

import contextlib
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_quant.distributed import all_ranks_succeed
from lightning_quant.quantizers.prepare import iter_quantizers, set_fake_quant, set_observers, warn_degenerate_ranges

__all__ = [
    "calibrate",
    "call_model",
    "default_transform",
    "is_input_error",
    "move_to_device",
    "warn_degenerate_ranges",
]

_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)
# RuntimeError messages torch gives for an input the model cannot take (shape, dtype, device, rank, too small)
_INPUT_MISMATCH = re.compile(
    r"shape|size|dtype|scalar type|input type|should be the same|same device|channels|dimension|\bdims?\b|"
    r"expected .*input|input .*expected|expected more than 1 value|not implemented for",
    re.IGNORECASE,
)
_NOT_THE_BATCH = re.compile(r"out of memory|can't allocate memory|cuda error|cudnn|cublas|nccl", re.IGNORECASE)


_INPUT_KEYS = ("image", "images", "img", "input", "inputs", "x", "pixel_values")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def default_transform(item: Any) -> Any:
    """The item itself; its first element when it is an ``(input, label, ...)`` tuple/list; its input when it is a
    dict sample with an input key (``image``, ``images``, ``img``, ``input``, ``inputs``, ``x``, ``pixel_values``) and
    a label key (``label``, ``labels``, ``target``, ``targets``, ``y``). Any other dict is passed to the model as
    keyword arguments.

    Example:
        >>> default_transform(("x", "y")), default_transform({"image": "x", "label": 3}), default_transform({"a": 1})
        ('x', 'x', {'a': 1})
    """
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0]
    if isinstance(item, dict) and any(k in item for k in _LABEL_KEYS):
        key = next((k for k in _INPUT_KEYS if k in item), None)
        if key is not None:
            return item[key]
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


def is_input_error(err: BaseException) -> bool:
    """Whether ``err``, raised by a model call, says the model could not take its input (so ``transform_fn`` or
    the data is the thing to fix): a ``TypeError`` (wrong arity, a non-tensor), or a ``RuntimeError`` about a
    shape, size, dtype, device or channel count. Out-of-memory, CUDA/cuDNN errors and anything else are not.

    Example:
        >>> is_input_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"))
        True
        >>> is_input_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        False
    """
    if isinstance(err, _OUT_OF_MEMORY):
        return False
    if isinstance(err, TypeError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return not _NOT_THE_BATCH.search(text) and bool(_INPUT_MISMATCH.search(text))


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

    Warns:
        UserWarning: some quantizers saw no data, or observed a range of zero width (all-zero or constant
            calibration data; the message names the quantizers).

    Raises:
        ValueError: ``data`` yielded no batch or only batches of size 0, ``num_batches`` < 1, or a batch could not
            be fed to the model (a ``TypeError``, or a ``RuntimeError`` about shape/dtype/device, see
            :func:`is_input_error`; the message shows what the batch looked like and how to fix ``transform_fn``).
        FloatingPointError: NaN/inf reached an observer (the message names the layer).
        RankFailedError: (``shard=True`` under ``torch.distributed``) calibration failed on this or another rank;
            raised on every rank, naming the failing rank and its message, so that none waits in a collective.
        Exception: any other error from the model or the data (``torch.OutOfMemoryError``, a CUDA error, the
            model's own exceptions) is raised as itself, with a note naming the batch.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1 (or None for the whole calibration data).")
    # DDP (shard=True): every rank agrees that its share calibrated before anyone enters the merge's collectives
    with all_ranks_succeed("calibration") if shard else contextlib.nullcontext():
        seen, empty, inputs = _feed(model, data, transform_fn or default_transform, num_batches, progress, desc, shard)
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
    warn_degenerate_ranges(model, stacklevel=4)  # past torch.no_grad's wrapper: the caller of calibrate()
    return seen


def _feed(
    model: nn.Module,
    data: Iterable[Any],
    transform: Callable[[Any], Any],
    num_batches: int | None,
    progress: bool,
    desc: str,
    shard: bool,
) -> tuple[int, int, Any]:
    """The calibration loop of :func:`calibrate`: ``(batches seen, empty batches, the last model input)``."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    set_observers(model, True)
    set_fake_quant(model, False)
    total = _batch_count(data, num_batches)
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
            except Exception as err:
                if not is_input_error(err):  # out of memory, a CUDA error, the model's own: raised as itself
                    if hasattr(err, "add_note"):  # Python >= 3.11
                        err.add_note(f"(raised by the model on calibration batch {seen}: {_describe(inputs)})")
                    raise
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
                fq.enable_fake_quant(True, estimate=False)
        else:
            set_fake_quant(model, True)
        model.train(was_training)
    return seen, empty, inputs


def _batch_count(data: Iterable[Any], num_batches: int | None) -> int | None:
    """The batches calibration will see, for the progress bar: ``num_batches`` capped by the data's length.

    Example:
        >>> _batch_count([1, 2, 3, 4], 16), _batch_count([1, 2], None), _batch_count(iter([1]), 5)
        (4, 2, 5)
    """
    try:
        length = len(data)  # type: ignore[arg-type]
    except TypeError:  # an iterator or a stream: only the cap is known
        return num_batches
    return length if num_batches is None else min(num_batches, length)


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
