"""Exceptions raised by lightning_quant; each message names the cause and the fix."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "NotCalibratedError", "NothingToQuantizeError"]


class NotCalibratedError(RuntimeError):
    """A quantized model was converted or exported before its quantizers saw any data."""


class NothingToQuantizeError(ValueError):
    """The model holds no layer this library can quantize."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint or quantization state does not belong to this model or configuration."""
