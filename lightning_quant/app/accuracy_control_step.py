"""Accuracy control for the app: ``quant.accuracy_control.max_accuracy_drop=<points>`` picks float layers first.

The drop is measured on a held-out subset of the *training* split (``quant.accuracy_control.tuning_size`` images,
disjoint from the calibration images), never on the evaluation split the run reports, so the reported INT8
accuracy stays an honest estimate. The chosen layers join ``quant.exclude`` (or, with
``quant.accuracy_control.fallback_weight_bits``, ``quant.layer_weight_bits``) for the calibration that follows and
are stored in the state file, which ``mode=test`` reads back.

Example:
    >>> from lightning_quant.app import compose_config
    >>> cfg = compose_config(["recipe=resnet20_ptq_cifar10", "quant.accuracy_control.max_accuracy_drop=0.5"])
    >>> cfg.quant.accuracy_control.max_accuracy_drop, cfg.quant.accuracy_control.tuning_size
    (0.5, 512)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from lightning_quant.algorithms.accuracy_control import AccuracyControlReport, quantize_with_accuracy_control
from lightning_quant.config import QuantOptions, QuantScheme
from lightning_quant.data.splits import held_out_subset
from lightning_quant.evaluation.accuracy import top1_accuracy

__all__ = ["accuracy_control_enabled", "choose_float_layers", "report_metrics"]


def accuracy_control_enabled(cfg: DictConfig) -> bool:
    settings = cfg.quant.get("accuracy_control") or {}
    return settings.get("max_accuracy_drop") is not None


def _tuning_loader(cfg: DictConfig, dm: Any) -> DataLoader:
    dm.setup()
    calibration = getattr(dm, "calibration_dataset", None)
    if calibration is None or not hasattr(calibration, "dataset"):
        raise ValueError(
            f"quant.accuracy_control needs a datamodule with a seeded calibration subset of its train split "
            f"({type(dm).__name__} has none); use one of the project's datamodules or drop max_accuracy_drop."
        )
    subset = held_out_subset(
        calibration.dataset, cfg.quant.accuracy_control.tuning_size, calibration_size=len(calibration), seed=dm.seed
    )  # the datamodule's own seed: the permutation its calibration subset was drawn from
    return DataLoader(subset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers)


def choose_float_layers(
    cfg: DictConfig,
    model: pl.LightningModule,
    dm: Any,
    *,
    scheme: QuantScheme,
    options: QuantOptions,
    calibration_data: Any,
) -> AccuracyControlReport:
    """Run :func:`~lightning_quant.algorithms.quantize_with_accuracy_control` on ``model.model`` (the network the
    app quantizes) with top-1 on the held-out tuning subset as the metric.

    Raises:
        ValueError: a datamodule without a calibration subset of its train split, a tuning subset larger than
            the rest of the train split, or a bound no choice of float layers meets.
    """
    q = cfg.quant
    network: nn.Module = model.model.eval()
    tuning = _tuning_loader(cfg, dm)
    progress = bool(q.progress)

    def metric(m: nn.Module) -> float:
        return top1_accuracy(m, tuning, progress=progress, desc="Tuning top-1")["top1"]

    _, report = quantize_with_accuracy_control(
        network,
        calibration_data if calibration_data is not None else dm.calibration_dataloader(),
        metric,
        max_accuracy_drop=float(q.accuracy_control.max_accuracy_drop),
        scheme=scheme,
        exclude=list(q.exclude),
        layer_weight_bits=dict(q.get("layer_weight_bits") or {}),
        fallback_weight_bits=q.accuracy_control.get("fallback_weight_bits"),
        num_batches=q.calibration_batches,
        progress=progress,
        options=options,
    )
    print(report)
    return report


def report_metrics(report: AccuracyControlReport) -> dict[str, Any]:
    """The part of the report that goes into ``metrics.json`` (``accuracy_control``)."""
    data = report.to_dict()
    data["ranking"] = [[name, round(score, 2)] for name, score in data["ranking"]]
    return data
