"""Checks that a checkpoint's quantization state belongs to the model and configuration loading it.

Without them, a mismatch surfaces as a wall of missing/unexpected state-dict keys; with them, the error says
what differs and how to fix it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lightning_quant.capture.patterns import shared_quantizer_calls
from lightning_quant.errors import CheckpointMismatchError

__all__ = ["check_quant_state_keys", "is_quant_key", "require_matching_config"]

_QUANT_MARKERS = ("weight_fake_quant.", "activation_quantizers.", "input_fake_quant.")


def is_quant_key(key: str) -> bool:
    return any(marker in key for marker in _QUANT_MARKERS)


def _sample(keys: set[str]) -> str:
    shown = sorted(keys)[:3]
    return ", ".join(shown) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _legacy_pool_keys(module: nn.Module, prefix: str, keys: set[str]) -> set[str]:
    """Keys of max-pool output quantizers, which checkpoints held before max pools reused their input's quantizer
    (the graph now calls the input's quantizer with ``observe=False`` there instead)."""
    stale: set[str] = set()
    for path, _, node in shared_quantizer_calls(module):
        head = f"{prefix}{path + '.' if path else ''}activation_quantizers.{node.args[0].name}."
        stale |= {k for k in keys if k.startswith(head)}
    return stale


def check_quant_state_keys(
    module: nn.Module, state_dict: dict, prefix: str, _metadata: Any, strict: bool, *_: Any
) -> None:
    """``load_state_dict`` pre-hook: the checkpoint's quantizer entries must match the model's.

    Raises:
        CheckpointMismatchError: the checkpoint has no quantization state, different quantizers, differently
            shaped scales (another model, mode, target or exclude list), or scales that are NaN, inf or <= 0
            (a damaged file).
    """
    if not strict:
        return
    own_state = module.state_dict(prefix=prefix)
    own = {k: v for k, v in own_state.items() if is_quant_key(k)}
    saved = {k for k in state_dict if k.startswith(prefix) and is_quant_key(k)}
    if not saved:
        raise CheckpointMismatchError(
            "the checkpoint holds no quantization state (no fake-quant scales): it was saved from a float model. "
            "Load float weights into the model before the Trainer runs (e.g. Model.load_from_checkpoint) and pass "
            "ckpt_path only for checkpoints written with QuantCallback."
        )
    all_own = set(own_state)
    all_saved = {k for k in state_dict if k.startswith(prefix)}
    stale = _legacy_pool_keys(module, prefix, all_saved - all_own)
    if stale:
        for key in stale:
            del state_dict[key]
        all_saved -= stale
        saved -= stale
        warnings.warn(
            f"the checkpoint holds {len(stale)} entries of max-pool output quantizers ({_sample(stale)}), written by "
            "an older lightning_quant; max pools now reuse their input's quantizer, so these are ignored.",
            stacklevel=2,
        )
    missing, unexpected = all_own - all_saved, all_saved - all_own
    if missing or unexpected:
        qat_saved = any(k.endswith(".bn_frozen") for k in all_saved)
        qat_own = any(k.endswith(".bn_frozen") for k in all_own)
        hint = ""
        if qat_saved != qat_own:
            hint = f" The checkpoint was written in {'qat' if qat_saved else 'ptq'} mode; this model is prepared for "
            hint += f"{'qat' if qat_own else 'ptq'}."
        raise CheckpointMismatchError(
            f"the checkpoint's quantization state does not match this model: missing {_sample(missing) or 'none'}; "
            f"unexpected {_sample(unexpected) or 'none'}.{hint} It was written for another model or another "
            "QuantCallback configuration (mode ptq/qat, target, exclude); use the same ones that wrote it."
        )
    wrong = {k for k in saved if tuple(state_dict[k].shape) != tuple(own[k].shape)}
    if wrong:
        raise CheckpointMismatchError(
            f"quantizer shapes differ from the checkpoint ({_sample(wrong)}): per-channel vs per-tensor or another "
            "layer size. Use the scheme/target the checkpoint was written with."
        )
    invalid = {k for k in saved if k.endswith(".scale") and not _valid_scale(state_dict[k])}
    if invalid:
        raise CheckpointMismatchError(
            f"the checkpoint holds invalid quantization scales ({_sample(invalid)}: NaN, inf or <= 0), which would "
            "silently give wrong outputs: the file is damaged, or it was saved after training diverged. Use an "
            "earlier checkpoint or re-run the job that wrote it."
        )


def _valid_scale(value: Any) -> bool:
    """A quantization scale is a finite positive float tensor (uncalibrated quantizers hold 1)."""
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and bool(torch.isfinite(value).all())
        and bool((value > 0).all())
    )


def require_matching_config(current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Compare the callback configuration stored in a checkpoint with the current one.

    Raises:
        CheckpointMismatchError: mode, target or scheme differ.
    """
    for key in ("mode", "target", "scheme", "exclude", "layer_weight_bits", "replace_relu6"):
        if key in saved and saved[key] != current[key]:
            raise CheckpointMismatchError(
                f"the checkpoint was written with QuantCallback {key}={saved[key]!r}, this run uses {current[key]!r}; "
                f"create the callback with {key}={saved[key]!r} to load it, or start from the float model."
            )
