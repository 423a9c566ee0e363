"""Where QuantCallback's calibration batches come from: explicit data, the datamodule, or the trainer's loaders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["SOURCES", "calibration_loader"]

SOURCES = ("auto", "calibration", "train", "val")


def calibration_loader(
    trainer: pl.Trainer, stage: str, calibration_data: Iterable[Any] | None, source: str
) -> Iterable[Any]:
    """The calibration batches for ``stage``: ``calibration_data`` if given, else by ``source`` (see QuantCallback).

    ``auto`` tries the datamodule's ``calibration_dataloader()``, then its ``train_dataloader()`` (or the fit
    loop's loader); ``val`` uses the loader being evaluated (optimistic accuracy, warned about).

    Raises:
        ValueError: the chosen source has no data (the message names what to pass).
    """
    if calibration_data is not None:
        return calibration_data
    dm = trainer.datamodule
    if source in ("auto", "calibration") and dm is not None and hasattr(dm, "calibration_dataloader"):
        return dm.calibration_dataloader()
    if source == "calibration":
        raise ValueError(
            "calibration_source='calibration' but neither calibration_data nor a datamodule "
            "calibration_dataloader() was given."
        )
    if source in ("auto", "train"):
        if dm is not None and _overrides(dm, "train_dataloader"):
            return dm.train_dataloader()
        if stage == "fit":
            return trainer.fit_loop._combined_loader or trainer.train_dataloader  # type: ignore[return-value]
        if source == "train":
            raise ValueError("calibration_source='train' needs a datamodule with train_dataloader().")
    if source == "val" or source == "auto":
        loaders = {
            "validate": trainer.val_dataloaders,
            "test": trainer.test_dataloaders,
            "predict": trainer.predict_dataloaders,
        }.get(stage)
        if source == "val" and loaders is not None:
            rank_zero_warn("calibrating on the evaluation data: accuracy will be optimistic.")
            return loaders
    raise ValueError(
        "no calibration data: pass QuantCallback(calibration_data=loader), give the datamodule a "
        "calibration_dataloader() or train_dataloader(), or set calibration_source='val' for a quick check "
        "(optimistic accuracy)."
    )


def _overrides(obj: Any, method: str) -> bool:
    """True when ``obj`` defines ``method`` itself (not Lightning's default that raises)."""
    from lightning.pytorch.core.hooks import DataHooks

    impl = getattr(type(obj), method, None)
    return impl is not None and impl is not getattr(DataHooks, method, None)
