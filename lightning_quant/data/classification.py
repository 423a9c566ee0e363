"""The base of every image-classification datamodule here: train / val / test loaders and a calibration loader.

The calibration loader reads a seeded subset of ``calibration_size`` train images with the evaluation transform
(:func:`~lightning_quant.data.splits.calibration_subset`). Subclasses only say where the datasets come from
(:meth:`ClassificationDataModule.build_datasets`) and which transform evaluates
(:meth:`ClassificationDataModule.eval_transform`): :class:`~lightning_quant.data.ImagenetteDataModule`,
:class:`~lightning_quant.data.CIFAR10DataModule`, :class:`~lightning_quant.data.ImageFolderDataModule`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_quant.data.checks import check_positive_int
from lightning_quant.data.splits import calibration_subset

__all__ = ["ClassificationDataModule"]


class ClassificationDataModule(pl.LightningDataModule):
    """Base: loaders for ``train`` / ``val`` datasets and a seeded calibration subset of the train split.

    Example:
        >>> import torch
        >>> class Tiny(ClassificationDataModule):
        ...     def build_datasets(self):
        ...         ds = torch.utils.data.TensorDataset(torch.randn(20, 3, 4, 4), torch.zeros(20, dtype=torch.long))
        ...         return {"train": ds, "train_eval": ds, "val": ds}
        >>> dm = Tiny(batch_size=4, calibration_size=8, num_workers=0)
        >>> len(dm.calibration_dataloader())
        2

    Args:
        batch_size: images per batch for every loader (Vitis AI ``--batch_size``).
        num_workers: DataLoader worker processes.
        calibration_size: train images in :meth:`calibration_dataloader` (Vitis AI ``--subset_len``).
        seed: seed of the calibration subset.
        pin_memory: pin host memory in the loaders.

    Raises:
        ValueError: a non-positive ``batch_size`` or ``calibration_size``, a negative ``num_workers``, a
            non-integer ``seed``; at setup, ``calibration_size`` larger than the train split.
    """

    def __init__(
        self, *, batch_size: int = 64, num_workers: int = 2, calibration_size: int = 512, seed: int = 0,
        pin_memory: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("num_workers", num_workers, minimum=0)
        check_positive_int("calibration_size", calibration_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer.")
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.calibration_size, self.seed = calibration_size, seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.calibration_dataset: Subset | None = None

    def build_datasets(self) -> dict[str, Dataset]:
        """Return ``train`` (maybe augmented), ``train_eval`` (eval transform) and ``val`` datasets."""
        raise NotImplementedError

    def eval_transform(self) -> Any:
        """The evaluation transform (also used for an unlabeled calibration folder)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once (idempotent). A datamodule without a train split (``build_datasets`` returns
        only ``val``) evaluates; its train and calibration loaders then say what to set."""
        if self.val_dataset is not None:
            return
        datasets = self.build_datasets()
        if "train_eval" in datasets:
            self.calibration_dataset = calibration_subset(datasets["train_eval"], self.calibration_size, self.seed)
        self.train_dataset, self.val_dataset = datasets.get("train"), datasets["val"]

    def _require_train(self, what: str) -> None:
        if self.train_dataset is None:
            raise ValueError(
                f"{type(self).__name__} has no train split, so it has no {what}: set its train root (app: "
                "data.train_root=/path/to/train), or calibrate on a folder of images (app: data.calibration_dir=...; "
                "Python: QuantCallback(calibration_data=...))."
            )

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled train split."""
        self.setup()
        self._require_train("train dataloader")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The evaluation split, in order."""
        self.setup()
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        """``calibration_size`` train images (seeded subset, eval transform, fixed order) for PTQ calibration."""
        self.setup()
        self._require_train("calibration dataloader")
        return self._loader(self.calibration_dataset, shuffle=False)
