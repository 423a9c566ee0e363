"""Load a quantized model from a Lightning checkpoint in a fresh process, without a Trainer.

A quantized network's ``state_dict`` carries the config it was quantized with (mode, scheme, options, exclude list,
mixed precision: :mod:`lightning_quant.quantizers.config_record`) beside every quantizer's state, so the same network
can be rebuilt (ReLU6 swapped, layers equalized, quantizers inserted) and filled in, from a full checkpoint or one
saved with ``save_weights_only=True``. Files are read with ``torch.load(weights_only=True)``: a checkpoint from
someone else cannot run code when it is loaded.

Example:
    >>> from lightning_quant.checkpoint import load_quantized_checkpoint
    >>> # model = load_quantized_checkpoint(MyLitModule(), "checkpoints/last.ckpt")
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.algorithms.post_calibration import apply_network_transforms
from lightning_quant.callbacks.quant_callback import network_attribute
from lightning_quant.config import REFINEMENT_STEPS, QuantMode, QuantOptions, QuantScheme
from lightning_quant.errors import CheckpointMismatchError
from lightning_quant.quantizers.config_record import (
    RECORD_ATTR,
    decode_config,
    encode_config,
    exclude_names,
    record_options,
)
from lightning_quant.quantizers.prepare import prepare, set_fake_quant, set_observers

__all__ = ["callback_state", "exclude_from_names", "load_quantized_checkpoint", "read_checkpoint", "saved_config"]

_STATE_KEY = "QuantCallback"
_REQUIRED = ("mode", "target", "scheme")


def callback_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The QuantCallback entry of a loaded checkpoint dict.

    Raises:
        CheckpointMismatchError: the checkpoint was not written with QuantCallback, or its QuantCallback entry
            lacks the configuration (mode, target, scheme) needed to rebuild the quantized model.
    """
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    for key, state in (callbacks if isinstance(callbacks, dict) else {}).items():
        if key == _STATE_KEY or str(key).startswith(_STATE_KEY + "{"):
            missing = [name for name in _REQUIRED if not isinstance(state, dict) or name not in state]
            if missing:
                raise CheckpointMismatchError(
                    f"the checkpoint's QuantCallback state lacks {', '.join(missing)}: it is damaged or was edited. "
                    "Use the checkpoint file the Trainer wrote, or an earlier one."
                )
            return state
    raise CheckpointMismatchError(
        "this checkpoint holds no QuantCallback state: it was not written by a Trainer with QuantCallback "
        "(or save_weights_only=True dropped callback state). Save with the callback attached."
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint file on CPU with ``torch.load(weights_only=True)`` (nothing in the file can run
    code), with clear errors for a missing, damaged, unsafe or non-checkpoint file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: the file cannot be unpickled (truncated/corrupted), holds objects other than
            tensors and plain containers (a pickled class or function: refused, never executed), or is not a
            Lightning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the .ckpt path a Trainer wrote.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if refused is None:  # not a pickled object the safe loader refused: the bytes themselves are bad
            raise CheckpointMismatchError(
                f"checkpoint {str(path)!r} cannot be read; it is truncated or corrupted. Use an earlier checkpoint or "
                "re-run the job that wrote it."
            ) from err
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} was refused by the safe loader (torch.load(weights_only=True)): it holds a "
            f"Python object other than tensors and plain containers ({refused[:200]}). Nothing in it was executed. "
            "If you wrote the file yourself and trust every object in it, allow those classes with "
            "torch.serialization.add_safe_globals([...]) before loading; otherwise do not use the file."
        ) from err
    except Exception as err:  # noqa: BLE001 - any other unpickling error means a damaged file
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:120]}); it is truncated or "
            "corrupted. Use an earlier checkpoint or re-run the job that wrote it."
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        what = type(checkpoint).__name__ if not isinstance(checkpoint, dict) else "a dict without 'state_dict'"
        raise CheckpointMismatchError(
            f"{str(path)!r} holds {what}, not a Lightning checkpoint (a dict with 'state_dict' and 'callbacks'): "
            "pass the .ckpt file a Trainer with QuantCallback wrote (a bare model.state_dict() file cannot be used)."
        )
    return checkpoint


def load_quantized_checkpoint(module: nn.Module, path: str | Path, *, module_name: str | None = None) -> nn.Module:
    """Rebuild ``module``'s network as the checkpoint's quantization did, then load all weights and qparams.

    The config comes from the network's own saved record (also in ``save_weights_only=True`` checkpoints), or,
    for checkpoints of earlier releases, from the QuantCallback state. The network transforms it names
    (``replace_relu6``, ``cross_layer_equalization``) are applied again before quantizers are inserted, so the
    reloaded network is the calibrated one, structure included.

    Example:
        >>> # model = load_quantized_checkpoint(MyLitModule(), "checkpoints/last.ckpt")

    Args:
        module: a freshly constructed LightningModule (or any nn.Module holding the network), float weights.
        path: a checkpoint written with QuantCallback attached (or any Lightning checkpoint of a quantized network).
        module_name: the attribute of ``module`` holding the network; by default the one the checkpoint names (its
            config record's key, or the QuantCallback state), else the usual guess (``model``, ``net``, ...).

    Returns:
        ``module`` itself, in eval mode, with observers off and fake-quant on.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: unreadable or unsafe file, not a Lightning checkpoint, no quantization config
            (neither the network's record nor QuantCallback state), state for another model, or invalid scales
            (NaN, inf, <= 0).
    """
    checkpoint = read_checkpoint(path)
    state_dict = checkpoint["state_dict"]
    name, config = saved_config(module, checkpoint, module_name=module_name)
    network = getattr(module, name).eval()
    options = QuantOptions.from_dict(config["options"])
    apply_network_transforms(network, options)
    prepared = prepare(
        network,
        QuantScheme.from_dict(config["scheme"]),
        mode=QuantMode(config["mode"]),
        exclude=exclude_from_names(config["exclude"], network),
        inplace=True,
        layer_weight_bits=config["layer_weight_bits"],
    )
    record_options(prepared, options)
    setattr(module, name, prepared)
    module.load_state_dict(state_dict)
    set_observers(prepared, False)
    set_fake_quant(prepared, True)
    return module.eval()


def saved_config(
    module: nn.Module, checkpoint: dict[str, Any], *, module_name: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The network's attribute in ``module`` and the config it was quantized with (mode, scheme, options, exclude,
    layer_weight_bits, refinements): the network's saved record, else (checkpoints of earlier releases) one rebuilt
    from the QuantCallback state and put into the checkpoint's state dict.

    Raises:
        CheckpointMismatchError: no record and no QuantCallback state, or a damaged record.
    """
    callbacks = checkpoint.get("callbacks")
    state = callback_state(checkpoint) if callbacks else None
    recorded = [k[: -len(RECORD_ATTR) - 1] for k in checkpoint["state_dict"] if k.endswith(f".{RECORD_ATTR}")]
    if module_name is None and len(recorded) == 1 and isinstance(getattr(module, recorded[0], None), nn.Module):
        module_name = recorded[0]  # the attribute the saved network sat under
    name = network_attribute(module, module_name or (state.get("module_name") if state else None))
    key = f"{name}.{RECORD_ATTR}"
    if key in checkpoint["state_dict"]:
        record = decode_config(checkpoint["state_dict"][key])
        missing = [k for k in ("mode", "scheme", "options", "exclude", "layer_weight_bits") if k not in record]
        if missing:
            raise CheckpointMismatchError(
                f"the checkpoint's quantization config record lacks {', '.join(missing)}: it is damaged or was edited."
            )
        return name, record
    if state is None:
        raise CheckpointMismatchError(
            "this checkpoint holds no quantization config: neither the network's record "
            f"({key!r}) nor QuantCallback state. It was saved from a float model, or with save_weights_only=True by a "
            "release that did not record the config; quantize the float model again."
        )
    saved_options = state.get("options") or {k: bool(state.get(k, False)) for k in _LEGACY_OPTION_KEYS}
    options = QuantOptions.from_dict(saved_options)
    config = {
        "mode": state["mode"],
        "scheme": state["scheme"],
        "exclude": exclude_names(state.get("exclude") or ()),
        "layer_weight_bits": dict(state.get("layer_weight_bits") or {}),
        "options": options.to_dict(),
        "refinements": [step for step in REFINEMENT_STEPS if saved_options.get(step)],
    }
    checkpoint["state_dict"][key] = encode_config(config)
    return name, config


# the option switches that checkpoints of earlier releases kept at the top level of the QuantCallback state
_LEGACY_OPTION_KEYS = (
    "replace_relu6", "cross_layer_equalization", "range_search", "bias_correction", "adaround",
    "adaround_per_sample", "fast_finetune",
)  # fmt: skip


def exclude_from_names(names: list[str], network: nn.Module) -> list[Any]:
    """``exclude`` entries back from their saved form: module types (``type:<qualified name>``) are matched against
    the classes in ``network``, never imported.

    Raises:
        CheckpointMismatchError: a saved module type that ``network`` does not contain.
    """
    classes = {exclude_names([c])[0]: c for m in network.modules() for c in type(m).__mro__ if issubclass(c, nn.Module)}
    out: list[Any] = []
    for entry in names:
        if entry.startswith("type:"):
            if entry not in classes:
                raise CheckpointMismatchError(
                    f"the checkpoint excluded the module type {entry[5:]!r}, which this network does not contain: "
                    "it was written for another model."
                )
            out.append(classes[entry])
        else:
            out.append(entry)
    return out
