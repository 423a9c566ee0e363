"""``mode=inspect``: which ops of the recipe's model the Vitis AI DPU runs, and which fall back to the CPU.

No Trainer and no calibration: the network is prepared for the DPU on a copy and judged op by op on one validation
image (:func:`~lightning_quant.inspect_dpu`, the rules ``export_xmodel`` lowers by). The table is printed and
``<run dir>/dpu_inspection.json`` written (atomically).

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4)), batch_size=2)
    >>> tuple(example_input(loader).shape)
    (1, 3, 8, 8)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lightning_quant.callbacks.quant_callback import network_attribute
from lightning_quant.export._atomic import atomic_path
from lightning_quant.export.dpu_inspector import inspect_dpu

__all__ = ["INSPECTION_FILE", "example_input", "inspect_model"]

INSPECTION_FILE = "dpu_inspection.json"


def example_input(loader: DataLoader) -> torch.Tensor:
    """The first image of ``loader``'s first batch, as a batch of one."""
    batch = next(iter(loader))
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    return images[:1]


def inspect_model(cfg: DictConfig, model: pl.LightningModule, dm: Any, out_dir: Path) -> dict[str, Any]:
    """Inspect the recipe's network for the DPU, print the table, write ``dpu_inspection.json``; return the metrics.

    The recipe's ``quant.exclude`` layers stay float, as calibration would keep them, so they show as CPU ops.

    Raises:
        ValueError: the network cannot be traced whole or does not run on the data's images (from
            :func:`~lightning_quant.inspect_dpu`).
    """
    network = getattr(model, network_attribute(model)).cpu().eval()
    report = inspect_dpu(network, example_input(dm.val_dataloader()), exclude=list(cfg.quant.exclude))
    path = out_dir / INSPECTION_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"name": cfg.name, **report.to_dict()}, indent=2) + "\n")
    if cfg.quant.target != "dpu":
        print(f"lightning-quant: mode=inspect checks the model against the Vitis AI DPU; this recipe's target is "
              f"{cfg.quant.target} (quant=dpu or a *_dpu recipe quantizes for it).")  # fmt: skip
    print(report)
    print(f"lightning-quant: DPU inspection written to {path}")
    return {
        "name": cfg.name,
        "mode": cfg.mode,
        "partitions": report.partitions,
        "dpu_ops": len(report.dpu_ops),
        "cpu_ops": len(report.cpu_ops),
        "dpu_inspection": str(path),
        "output_dir": str(out_dir),
    }
