"""Load float weights into a network from any of the files users have: a plain state dict, a checkpoint dict with a
``state_dict`` entry (Lightning checkpoints, published CIFAR ResNets), keys under a wrapper prefix (``module.``
from DataParallel, ``model.`` from a LightningModule), tensors stored as float16.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> src = nn.Sequential(nn.Linear(4, 3))
    >>> path = tempfile.mkdtemp() + "/lit.ckpt"
    >>> torch.save({"state_dict": {"model." + k: v.half() for k, v in src.state_dict().items()}}, path)
    >>> dst = load_weights(nn.Sequential(nn.Linear(4, 3)), path)
    >>> dst[0].weight.dtype, bool(torch.allclose(dst[0].weight, src[0].weight, atol=1e-3))
    (torch.float32, True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["WeightsMismatchError", "load_weights", "read_state_dict"]

_WRAPPER_PREFIXES = ("module.", "model.", "net.", "network.", "_orig_mod.")
_QUANT_KEYS = ("weight_fake_quant.", "activation_quantizers.", "input_fake_quant.")


class WeightsMismatchError(RuntimeError):
    """The weights file was written for another architecture (or is a quantized checkpoint)."""


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: the ``state_dict`` entry of a checkpoint dict, or the dict itself.

    Raises:
        FileNotFoundError: no such file.
        WeightsMismatchError: the file holds no state dict (e.g. a pickled module or a damaged file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}; pass the path of a .pth/.pt/.ckpt file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for damaged or foreign files
        raise WeightsMismatchError(
            f"{path} is not a loadable weights file ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Save "
            "weights with torch.save(model.state_dict(), path) or pass a Lightning checkpoint."
        ) from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(
            f"{path} holds no state dict of tensors; save weights with torch.save(model.state_dict(), path)."
        )
    return state


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``model.``, ``module.``, ...) while that brings the keys closer to ``expected``."""
    while not set(state) & expected:
        for prefix in _WRAPPER_PREFIXES:
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                break
        else:
            return state
    return state


def _mismatch_message(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    own = model.state_dict()
    # BatchNorm fills a missing counter itself (files written before it existed, like the published CIFAR ResNets)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (e.g. {k!r}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        )
    return (
        f"{path} does not fit {type(model).__name__}: {'; '.join(parts)} keys. It was written for another "
        "architecture or number of classes: pick the matching model (e.g. model=resnet56_cifar for a ResNet-56 file) "
        "or the weights file of this model."
    )


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load ``path`` into ``model`` (strictly: every key and shape must match) and return ``model``.

    Floating tensors are cast to the model's dtype, so float16-stored files load into float32 models.

    Raises:
        FileNotFoundError: no such file.
        WeightsMismatchError: not a state dict, a quantized checkpoint, or keys/shapes of another architecture
            (the message counts missing, unexpected and reshaped keys and names the fix).
    """
    path = Path(path).expanduser()
    own = model.state_dict()
    state = _strip_prefix(read_state_dict(path), set(own))
    if any(marker in k for k in state for marker in _QUANT_KEYS):
        raise WeightsMismatchError(
            f"{path} is a quantized checkpoint (it holds fake-quant state). Load it with "
            "lightning_quant.checkpoint.load_quantized_checkpoint, or in the app with mode=test state_file=<it>."
        )
    message = _mismatch_message(path, model, state)
    if message:
        raise WeightsMismatchError(message)
    cast: dict[str, Any] = {
        k: (v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v) for k, v in state.items()
    }
    model.load_state_dict(cast, strict=False)  # every other key was checked above
    return model
