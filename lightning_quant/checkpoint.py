"""Load a quantized model from a Lightning checkpoint in a fresh process, without a Trainer.

The checkpoint written by a Trainer with :class:`~lightning_quant.QuantCallback` holds the callback's
configuration (mode, scheme, exclude list) and every quantizer's state, so the same network can be
prepared again and filled in.

Example:
    >>> from lightning_quant.checkpoint import load_quantized_checkpoint
    >>> # model = load_quantized_checkpoint(MyLitModule(), "checkpoints/last.ckpt")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.algorithms.post_calibration import REFINEMENT_STEPS, record_refinements
from lightning_quant.callbacks.checkpoint_guard import check_quant_state_keys
from lightning_quant.callbacks.network_attribute import network_attribute
from lightning_quant.config import QuantMode, QuantScheme
from lightning_quant.errors import CheckpointMismatchError
from lightning_quant.quantizers.prepare import prepare, set_fake_quant, set_observers

__all__ = ["callback_state", "load_quantized_checkpoint", "read_checkpoint"]

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
    """Load a Lightning checkpoint file on CPU, with clear errors for a missing, damaged or non-checkpoint file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: the file cannot be unpickled (truncated/corrupted) or is not a Lightning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the .ckpt path a Trainer wrote.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling error means a damaged file
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


def load_quantized_checkpoint(module: nn.Module, path: str | Path) -> nn.Module:
    """Prepare ``module``'s network as the checkpoint's QuantCallback did, then load all weights and qparams.

    Args:
        module: a freshly constructed LightningModule (or any nn.Module holding the network), float weights.
        path: a checkpoint written with QuantCallback attached.

    Returns:
        ``module`` itself, in eval mode, with observers off and fake-quant on.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: unreadable file, not a Lightning checkpoint, no (or incomplete) QuantCallback
            state, state for another model, or invalid scales (NaN, inf, <= 0).
    """
    checkpoint = read_checkpoint(path)
    state = callback_state(checkpoint)
    from lightning_quant.callbacks.quant_callback import QuantCallback

    callback = QuantCallback(
        mode=state["mode"],
        target=state["target"],
        scheme=QuantScheme.from_dict(state["scheme"]),
        exclude=state.get("exclude", ()),
        layer_weight_bits=state.get("layer_weight_bits"),
        module_name=state.get("module_name"),
        report=False,
    )
    name = network_attribute(module, callback.module_name)
    network = getattr(module, name)
    prepared = prepare(
        network, callback.scheme, mode=QuantMode(state["mode"]), exclude=callback.exclude, inplace=True,
        layer_weight_bits=callback.layer_weight_bits,
    )  # fmt: skip
    setattr(module, name, prepared)
    handle = module.register_load_state_dict_pre_hook(check_quant_state_keys)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    finally:
        handle.remove()
    set_observers(prepared, False)
    set_fake_quant(prepared, True)
    record_refinements(prepared, [step for step in REFINEMENT_STEPS if state.get(step)])
    return module.eval()
