"""Checks that a saved quantization state belongs to the network and configuration loading it.

:func:`~lightning_quant.quantizers.prepare` registers :func:`check_quant_state_keys` as a ``load_state_dict``
pre-hook of every network it returns, so the checks run on every load path: ``Trainer.fit/validate/test(ckpt_path=)``,
:func:`~lightning_quant.load_quantized_checkpoint`, or a plain ``model.load_state_dict(torch.load(...))``. Without
them, a mismatch surfaces as a wall of missing/unexpected state-dict keys, or (a ReLU6 network loading weights
calibrated on its ReLU twin) as silently wrong outputs; with them, the error says what differs and how to fix it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lightning_quant.capture.patterns import shared_quantizer_calls
from lightning_quant.config import NETWORK_TRANSFORMS, QuantScheme
from lightning_quant.errors import CheckpointMismatchError
from lightning_quant.quantizers.config_record import (
    NETWORK_KEYS,
    RECORD_ATTR,
    config_record,
    decode_config,
    network_view,
)
from lightning_quant.quantizers.modules import add_zero_bias

__all__ = ["check_quant_state_keys", "check_saved_config", "is_quant_key", "require_matching_config"]

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
    own_state = _own_state(module, prefix)
    own = {k: v for k, v in own_state.items() if is_quant_key(k)}
    saved = {k for k in state_dict if k.startswith(prefix) and is_quant_key(k)}
    if not saved:
        raise CheckpointMismatchError(
            "the checkpoint holds no quantization state (no fake-quant scales): it was saved from a float model. "
            "Load float weights into the model before the Trainer runs (e.g. Model.load_from_checkpoint) and pass "
            "ckpt_path only for checkpoints written with QuantCallback."
        )
    _check_record(module, state_dict, prefix)
    _add_missing_biases(module, state_dict, prefix)
    own_state = _own_state(module, prefix)
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


def _own_state(module: nn.Module, prefix: str) -> dict[str, Any]:
    """The network's state dict, less the device/dtype probe buffers (not state; older torch kept them through a
    deepcopy)."""
    return {k: v for k, v in module.state_dict(prefix=prefix).items() if "_lq_probe_" not in k}


def _check_record(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """The saved config (scheme, mode, exclude, mixed precision, network transforms) must be this network's."""
    own = config_record(module)
    if own is None:
        return
    key = f"{prefix}{RECORD_ATTR}"
    if key not in state_dict:
        raise CheckpointMismatchError(
            "the checkpoint holds quantized weights but no record of the scheme and options they were calibrated "
            f"with ({key!r} is missing): it was written by an older lightning_quant. Load it with "
            "lightning_quant.load_quantized_checkpoint(module, path), which rebuilds the network from the "
            "checkpoint's QuantCallback state, or calibrate again."
        )
    check_saved_config(own, decode_config(state_dict[key]))


def check_saved_config(own: dict[str, Any], saved: dict[str, Any]) -> None:
    """Compare a saved config record with the network's own.

    Raises:
        CheckpointMismatchError: the saved record is damaged, or any of mode, scheme, exclude, layer_weight_bits or
            the network transforms (``replace_relu6``, ``cross_layer_equalization``) differ; the message names the
            value to pass.
    """
    if any(k not in saved for k in (*NETWORK_KEYS[:-1], "options")):
        raise CheckpointMismatchError(
            "the checkpoint's quantization config record is damaged or incomplete; use the file the run wrote."
        )
    own, saved = network_view(own), network_view(saved)
    for key in NETWORK_KEYS:
        same = sorted(saved[key]) == sorted(own[key]) if key == "exclude" else saved[key] == own[key]
        if not same:
            raise CheckpointMismatchError(_mismatch_message(key, saved, own))


def _mismatch_message(key: str, saved: dict[str, Any], own: dict[str, Any]) -> str:
    if key == "network_transforms":
        wanted = ", ".join(f"{t}=True" for t in saved[key]) or "none of replace_relu6/cross_layer_equalization"
        return (
            f"the checkpoint was quantized with network transforms {saved[key] or 'none'}, this network with "
            f"{own[key] or 'none'}: its weights belong to another float network. Pass options=QuantOptions({wanted}) "
            "(recipes: quant.options.<name>=true), or use lightning_quant.load_quantized_checkpoint(module, path), "
            "which rebuilds the network from the file."
        )
    if key == "mode":
        return (
            f"the checkpoint was written in {saved[key]} mode; this model is prepared for {own[key]}. Create the "
            f"callback (or prepare the network) with mode={saved[key]!r} to load it."
        )
    if key == "scheme":
        hint = estimator_hint(saved[key], own[key])
        if hint:
            return hint
        diff = _first_difference(saved[key], own[key])
        return (
            f"the checkpoint was quantized for target={saved[key].get('target')!r}, this network for "
            f"target={own[key].get('target')!r}, and the schemes differ ({diff}); pass "
            "scheme=QuantScheme.from_dict(<the checkpoint's scheme>) or the target it was written for "
            f"({saved[key].get('target')!r}), or use lightning_quant.load_quantized_checkpoint(module, path)."
        )
    return (
        f"the checkpoint was quantized with {key}={saved[key]!r}, this network with {own[key]!r}; create it with "
        f"{key}={saved[key]!r} (or use lightning_quant.load_quantized_checkpoint(module, path), which rebuilds it "
        "from the file)."
    )


def estimator_hint(saved: Any, own: Any) -> str | None:
    """The fix for schemes that differ only in the activation range estimator (checkpoints of 0.1, whose PTQ default
    was ``minmax``; 0.2 calibrates with ``mean_minmax``), or None when they differ otherwise.

    Example:
        >>> from lightning_quant.config import scheme_for_target
        >>> old = scheme_for_target("x86", activation_observer="minmax").to_dict()
        >>> print(estimator_hint(old, scheme_for_target("x86").to_dict()))  # doctest: +ELLIPSIS
        the checkpoint's activations were calibrated with the 'minmax' range estimator, this run uses 'mean_minmax' ...
    """
    if not (isinstance(saved, dict) and isinstance(own, dict)) or "activation" not in saved or "activation" not in own:
        return None
    saved_act, own_act = dict(saved["activation"]), dict(own["activation"])
    was, now = saved_act.pop("observer", None), own_act.pop("observer", None)
    if was == now or saved_act != own_act or {**saved, "activation": None} != {**own, "activation": None}:
        return None
    target = saved.get("target") or "x86"
    return (
        f"the checkpoint's activations were calibrated with the {was!r} range estimator, this run uses {now!r} (the "
        f"PTQ default is 'mean_minmax' since 0.2; 0.1 used 'minmax'); create the callback with "
        f"scheme=scheme_for_target({target!r}, activation_observer={was!r}) (recipes: "
        f"quant.scheme.activation_observer={was}) to load it, or use lightning_quant.load_quantized_checkpoint(module, "
        "path), which rebuilds the network from the file."
    )


def _first_difference(saved: Any, own: Any, path: str = "scheme") -> str:
    if isinstance(saved, dict) and isinstance(own, dict):
        for k in sorted(set(saved) | set(own)):
            if saved.get(k) != own.get(k):
                return _first_difference(saved.get(k), own.get(k), f"{path}.{k}")
    return f"{path}: checkpoint {saved!r}, this network {own!r}"


def _add_missing_biases(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Bias correction and cross-layer equalization give bias-less layers a bias (and, where the target quantizes
    biases, a bias quantizer): recreate both before loading, so the saved values have somewhere to go."""
    config = config_record(module)
    bias_spec = None if config is None else QuantScheme.from_dict(config["scheme"]).bias
    for name, layer in module.named_modules():
        head = f"{prefix}{name + '.' if name else ''}"
        weight = getattr(layer, "weight", None)
        if f"{head}bias" not in state_dict or getattr(layer, "bias", False) is not None:
            continue
        saved = state_dict[f"{head}bias"]
        if not isinstance(weight, torch.Tensor) or not isinstance(saved, torch.Tensor) or saved.dim() != 1:
            continue
        if saved.shape[0] != weight.shape[0]:
            continue
        quantized = f"{head}bias_fake_quant.scale" in state_dict and hasattr(layer, "bias_fake_quant")
        add_zero_bias(layer, name, bias_spec if quantized else None)


def _valid_scale(value: Any) -> bool:
    """A quantization scale is a finite positive float tensor (uncalibrated quantizers hold 1)."""
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and bool(torch.isfinite(value).all())
        and bool((value > 0).all())
    )


def require_matching_config(current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Compare the QuantCallback configuration stored in a checkpoint with the current callback's.

    Checkpoints of earlier releases kept the option switches at the top level; they compare the same way.

    Raises:
        CheckpointMismatchError: mode, target, scheme, exclude, layer_weight_bits or a network transform
            (``replace_relu6``, ``cross_layer_equalization``) differ; the message names the value to pass.
    """
    for key in ("mode", "target", "scheme", "exclude", "layer_weight_bits"):
        if key in saved and saved[key] != current[key]:
            hint = estimator_hint(saved[key], current[key]) if key == "scheme" else None
            if hint:
                raise CheckpointMismatchError(hint)
            raise CheckpointMismatchError(
                f"the checkpoint was written with QuantCallback {key}={saved[key]!r}, this run uses {current[key]!r}; "
                f"create the callback with {key}={saved[key]!r} to load it, or start from the float model."
            )
    saved_options = saved.get("options") or {k: saved[k] for k in NETWORK_TRANSFORMS if k in saved}
    for key in NETWORK_TRANSFORMS:
        if key in saved_options and bool(saved_options[key]) != bool(current["options"][key]):
            raise CheckpointMismatchError(
                f"the checkpoint was written with QuantOptions({key}={saved_options[key]!r}), this callback uses "
                f"{current['options'][key]!r}: the network it quantized differs. Create the callback with "
                f"options=QuantOptions({key}={saved_options[key]!r}, ...) to load it."
            )
