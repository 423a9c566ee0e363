"""On/off state saved as uint8 buffers and mirrored as Python bools, so that ``torch.compile`` can specialize on it.

A quantizer's switches (observer on, fake-quant on, calibrated) and a QAT conv+BN's ``bn_frozen`` are buffers: they
are saved in checkpoints and move with ``.to()``. Branching on a buffer in ``forward`` needs ``.item()``, which
``torch.compile`` cannot trace: it breaks the graph at every quantizer, and each of the hundred instances then
recompiles the same function until the recompile limit. :class:`BufferFlags` keeps each flag's value as a Python bool
too. An eager forward reads the buffer (code that writes a buffer directly is still honoured) and refreshes the
mirror; a compiled forward reads the mirror, so the graph specializes on it and is recompiled once when a flag
changes (a QAT schedule's freeze). The mirror follows :meth:`BufferFlags._set_flag` and state loading.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Switch(BufferFlags, nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self._register_flag("enabled", True)
    ...     def forward(self, x):
    ...         return x * 2 if self._flag("enabled") else x
    >>> s = Switch(); s._set_flag("enabled", False)
    >>> s(torch.ones(1)).item(), s.state_dict()["enabled"].item()
    (1.0, 0)
    >>> t = Switch(); _ = t.load_state_dict(s.state_dict()); t._flags["enabled"]
    False
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BufferFlags"]


class BufferFlags:
    """Mixin for an ``nn.Module`` with boolean state buffers that ``forward`` branches on (see the module doc)."""

    _flags: dict[str, bool]

    def _register_flag(self, name: str, value: bool, device: Any = None) -> None:
        """Register buffer ``name`` (uint8, saved in the state dict) holding ``value``, and its mirror."""
        module: nn.Module = self  # type: ignore[assignment]
        module.register_buffer(name, torch.tensor(int(value), dtype=torch.uint8, device=device))
        if "_flags" not in self.__dict__:
            self._flags = {}
        self._flags[name] = bool(value)

    def _flag(self, name: str) -> bool:
        """The flag's value: from its buffer in eager mode (and mirrored), from the mirror while compiling."""
        if torch.compiler.is_compiling():
            return self._flags[name]
        value = bool(getattr(self, name).item())
        self._flags[name] = value
        return value

    def _set_flag(self, name: str, value: bool) -> None:
        getattr(self, name).fill_(int(value))
        self._flags[name] = bool(value)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]
        for name in self._flags:
            self._flags[name] = bool(getattr(self, name).item())
