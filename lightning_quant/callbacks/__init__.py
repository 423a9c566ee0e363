"""Lightning callbacks, one per file."""

from lightning_quant.callbacks.quant_callback import QuantCallback

__all__ = ["QuantCallback"]
