"""The quantization config a prepared network carries in its own ``state_dict``.

Every network :func:`~lightning_quant.quantizers.prepare` returns holds a buffer, ``lightning_quant_config``, with
the mode, the scheme, the ``exclude`` and ``layer_weight_bits`` arguments, the
:class:`~lightning_quant.config.QuantOptions` and the refinements that ran, as UTF-8 JSON in a ``uint8`` tensor. It
is saved wherever the weights are (a Lightning checkpoint, ``save_weights_only=True`` included, or a bare
``torch.save(model.state_dict())``), loads with ``torch.load(weights_only=True)``, survives code that treats every
state entry as a tensor, and is checked on every load (:mod:`lightning_quant.quantizers.state_checks`): quantized
weights never load silently into a network quantized another way.

Example:
    >>> from torch import nn
    >>> from lightning_quant.config import QuantOptions, scheme_for_target
    >>> from lightning_quant.quantizers.prepare import prepare
    >>> net = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), scheme_for_target("x86"))
    >>> record_options(net, QuantOptions(bias_correction=True))
    >>> saved = decode_config(net.state_dict()[RECORD_ATTR])
    >>> saved["mode"], saved["scheme"]["target"], saved["options"]["bias_correction"]
    ('ptq', 'x86', True)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_quant.config import NETWORK_TRANSFORMS, QuantMode, QuantOptions, QuantScheme
from lightning_quant.errors import CheckpointMismatchError

__all__ = [
    "NETWORK_KEYS",
    "RECORD_ATTR",
    "attach_config_record",
    "config_record",
    "decode_config",
    "encode_config",
    "exclude_names",
    "network_view",
    "record_options",
    "record_refinement_steps",
    "write_config_record",
]

RECORD_ATTR = "lightning_quant_config"
RECORD_VERSION = 1
# the entries that decide the network's structure and qparams: a checkpoint loads only where all of them match
# (``network_transforms`` is not stored: :func:`network_view` derives it from the options)
NETWORK_KEYS = ("mode", "scheme", "exclude", "layer_weight_bits", "network_transforms")


def encode_config(config: Mapping[str, Any], device: torch.device | str | None = None) -> torch.Tensor:
    """``config`` as UTF-8 JSON bytes in a ``uint8`` tensor (with the record version)."""
    data = json.dumps({"version": RECORD_VERSION, **config}, sort_keys=True).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8, device=device)


def decode_config(tensor: Any) -> dict[str, Any]:
    """The config dict held in a record tensor.

    Raises:
        CheckpointMismatchError: not a 1-D ``uint8`` tensor of JSON (a damaged or edited file).
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise CheckpointMismatchError(
            f"the quantization config record ({RECORD_ATTR!r}) is not a 1-D uint8 tensor: the file is damaged or was "
            "edited; use the file the run wrote."
        )
    try:
        config = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointMismatchError(
            f"the quantization config record ({RECORD_ATTR!r}) cannot be decoded ({err}): the file is damaged."
        ) from err
    if not isinstance(config, dict):
        raise CheckpointMismatchError(f"the quantization config record ({RECORD_ATTR!r}) is not a mapping.")
    return config


def network_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``network_transforms``: the options' float-network transforms that ran (ReLU6 to ReLU,
    cross-layer equalization), in order.

    Example:
        >>> network_view({"options": {"replace_relu6": True, "cross_layer_equalization": False}})["network_transforms"]
        ['replace_relu6']
    """
    options = config.get("options") or {}
    return {**config, "network_transforms": [name for name in NETWORK_TRANSFORMS if options.get(name)]}


def exclude_names(exclude: Iterable[Any]) -> list[str]:
    """``exclude=`` entries as strings: glob patterns as they are, module types as ``type:<qualified name>``.

    Example:
        >>> exclude_names(["fc", nn.Linear])
        ['fc', 'type:torch.nn.modules.linear.Linear']
    """
    return [p if isinstance(p, str) else f"type:{p.__module__}.{p.__qualname__}" for p in exclude]


def attach_config_record(
    prepared: nn.Module,
    *,
    mode: QuantMode,
    scheme: QuantScheme,
    exclude: Iterable[Any],
    layer_weight_bits: Mapping[str, int],
) -> None:
    """Give ``prepared`` its record (options default to none; :func:`record_options` sets them)."""
    config = {
        "mode": mode.value,
        "scheme": scheme.to_dict(),
        "exclude": exclude_names(exclude),
        "layer_weight_bits": dict(layer_weight_bits),
        "options": QuantOptions(bias_correction=False).to_dict(),
        "refinements": [],
    }
    prepared.register_buffer(RECORD_ATTR, encode_config(config))


def config_record(model: nn.Module) -> dict[str, Any] | None:
    """The config of a prepared network, or None for a network :func:`prepare` did not produce."""
    tensor = model._buffers.get(RECORD_ATTR)
    return None if tensor is None else decode_config(tensor)


def write_config_record(model: nn.Module, config: Mapping[str, Any]) -> None:
    """Replace the record of ``model`` (a prepared network) by ``config``, on the record's device."""
    old = model._buffers[RECORD_ATTR]
    model._buffers[RECORD_ATTR] = encode_config({k: v for k, v in config.items() if k != "version"}, old.device)


def record_options(prepared: nn.Module, options: QuantOptions) -> None:
    """Note the options ``prepared`` is (being) quantized with; a network without a record is left as it is."""
    config = config_record(prepared)
    if config is not None:
        config["options"] = options.to_dict()
        write_config_record(prepared, config)


def record_refinement_steps(prepared: nn.Module, steps: Iterable[str]) -> None:
    """Note the refinement steps that ran (in order, without repeats)."""
    config = config_record(prepared)
    if config is not None:
        done = list(config.get("refinements", []))
        config["refinements"] = done + [s for s in steps if s not in done]
        write_config_record(prepared, config)
