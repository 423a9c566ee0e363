"""Where QuantCallback's calibration batches come from, in a documented order.

``calibration_source="auto"`` (the default) takes the first of:

1. ``QuantCallback(calibration_data=...)``;
2. the datamodule's ``calibration_dataloader()``;
3. a train dataloader, wherever it was given: the datamodule's ``train_dataloader()``, the LightningModule's own
   ``train_dataloader()``, or (in ``fit``) the ``train_dataloaders=`` passed to ``trainer.fit``.

Evaluation data (``validate/test/predict(dataloaders=...)``, ``val_dataloaders=``) is never used unless asked for
with ``calibration_source="val"``, which warns: calibrating on the data you report on inflates the results. When only
evaluation data exists, PTQ stops with an error that names both ways out. Every run logs the source it used.

Example:
    >>> from torch.utils.data import DataLoader
    >>> batches, used = calibration_loader(None, None, "validate", [1, 2], "auto")
    >>> used
    'calibration_data'
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["SOURCES", "calibration_loader"]

SOURCES = ("auto", "calibration", "train", "val")

_NO_DATA = (
    "no calibration data: {what}. Pass QuantCallback(calibration_data=<a DataLoader of training images>), give the "
    "datamodule a calibration_dataloader() or train_dataloader(), or opt in to calibrating on the evaluation data "
    "with QuantCallback(calibration_source='val') (the accuracy it reports is then optimistic)."
)


def calibration_loader(
    trainer: Any, pl_module: Any, stage: str, calibration_data: Iterable[Any] | None, source: str
) -> tuple[Iterable[Any], str]:
    """The calibration batches for ``stage`` and a description of where they came from (see the module docstring).

    Raises:
        ValueError: the chosen source has no data (the message names what to pass).
    """
    if calibration_data is not None:
        return calibration_data, "calibration_data"
    dm = getattr(trainer, "datamodule", None)
    if source in ("auto", "calibration") and dm is not None and callable(getattr(dm, "calibration_dataloader", None)):
        return dm.calibration_dataloader(), f"{type(dm).__name__}.calibration_dataloader()"
    if source == "calibration":
        raise ValueError(
            "calibration_source='calibration' but neither calibration_data nor a datamodule "
            "calibration_dataloader() was given."
        )
    if source in ("auto", "train"):
        found = _train_loader(trainer, pl_module, dm, stage)
        if found is not None:
            return found
        if source == "train":
            raise ValueError(_NO_DATA.format(what="calibration_source='train' but no train dataloader was given"))
    loaders = _evaluation_loaders(trainer, stage)
    if source == "val" and loaders is not None:
        rank_zero_warn(
            "lightning_quant: calibrating on the evaluation data (calibration_source='val'): the accuracy reported on "
            "the same data is optimistic. Calibrate on training images for numbers you publish."
        )
        return loaders, f"the {stage} dataloaders (calibration_source='val')"
    what = "only evaluation data was given" if loaders is not None else "no dataloader was given"
    raise ValueError(_NO_DATA.format(what=what))


def _train_loader(trainer: Any, pl_module: Any, dm: Any, stage: str) -> tuple[Iterable[Any], str] | None:
    if dm is not None and _overrides(dm, "train_dataloader"):
        return dm.train_dataloader(), f"{type(dm).__name__}.train_dataloader()"
    if stage == "fit":  # the loader Lightning resolved for this fit (train_dataloaders=, the datamodule's or model's)
        return _flatten(trainer.train_dataloader), "the fit's train dataloader"
    if pl_module is not None and _overrides(pl_module, "train_dataloader"):
        return pl_module.train_dataloader(), f"{type(pl_module).__name__}.train_dataloader()"
    return None


def _evaluation_loaders(trainer: Any, stage: str) -> Iterable[Any] | None:
    loaders = {
        "validate": getattr(trainer, "val_dataloaders", None),
        "test": getattr(trainer, "test_dataloaders", None),
        "predict": getattr(trainer, "predict_dataloaders", None),
    }.get(stage)
    return None if loaders is None else _flatten(loaders)


def _flatten(loaders: Any) -> Iterable[Any]:
    """One iterable of batches from a loader, a list/tuple of loaders or a dict of loaders (several val dataloaders,
    Lightning's combined loaders): their batches one after the other."""
    iterables = getattr(loaders, "iterables", loaders)  # a CombinedLoader: the user's own loaders
    if isinstance(iterables, Mapping):
        iterables = list(iterables.values())
    if isinstance(iterables, (list, tuple)) and iterables and all(hasattr(x, "__iter__") for x in iterables):
        if len(iterables) == 1:
            return iterables[0]
        return _SizedChain(iterables) if all(hasattr(x, "__len__") for x in iterables) else _Chain(iterables)
    return iterables


class _Chain:
    """Several loaders read one after the other (re-iterable: calibration and refinement each read it)."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __iter__(self):
        return itertools.chain.from_iterable(self.loaders)


class _SizedChain(_Chain):
    """A :class:`_Chain` of loaders that all have a length (progress bars show it)."""

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)


def _overrides(obj: Any, method: str) -> bool:
    """True when ``obj`` defines ``method`` itself, not Lightning's default (which raises), whichever of the
    ``lightning`` and ``pytorch_lightning`` packages it comes from."""
    impl = getattr(type(obj), method, None)
    return impl is not None and not getattr(impl, "__qualname__", "").startswith("DataHooks.")
