"""TorchScript's deprecation notice, silenced where the user asked for TorchScript (writing and verifying it)."""

from __future__ import annotations

import warnings


def quiet_jit_deprecation() -> None:
    """Inside ``warnings.catch_warnings()``: hide torch's ``torch.jit.* is deprecated`` FutureWarnings. TorchScript
    is a format the user asked for (docs/export.md); the notice would repeat on every export and load.

    Example:
        >>> with warnings.catch_warnings():
        ...     quiet_jit_deprecation()
        ...     warnings.warn("`torch.jit.trace` is deprecated", FutureWarning)  # hidden
    """
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
