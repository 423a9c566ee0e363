"""ImageClassifier: a small LightningModule that wraps any classification network as ``self.model``.

It is what the Hydra app trains and evaluates; QuantCallback finds the network through ``self.model``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> clf = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), lr=0.01)
    >>> clf(torch.randn(2, 3, 2, 2)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import accuracy

from lightning_quant.models.weights import load_weights

__all__ = ["ImageClassifier"]

_OPTIMIZERS = ("sgd", "adamw")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier logging ``{stage}_loss``, ``{stage}_acc`` (top-1) and ``{stage}_acc5`` (top-5).

    Args:
        model: the network (logits out).
        lr: learning rate (QAT fine-tuning typically uses 1e-4 to 1e-3 with SGD).
        optimizer: ``sgd`` (momentum 0.9) or ``adamw``.
        weight_decay: weight decay.
        cosine: cosine-anneal the learning rate over ``trainer.max_epochs``.
        weights_file: float weights loaded into ``model`` (a plain or float16 state dict, a Lightning checkpoint
            of this module, a DataParallel file); see :func:`lightning_quant.models.load_weights`.

    Raises:
        ValueError: unknown optimizer or non-positive learning rate.
        FileNotFoundError: ``weights_file`` does not exist.
        WeightsMismatchError: ``weights_file`` was written for another architecture (or is a quantized checkpoint).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        optimizer: str = "sgd",
        weight_decay: float = 1e-4,
        cosine: bool = True,
        weights_file: str | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}; use one of {', '.join(map(repr, _OPTIMIZERS))}.")
        if not lr > 0:
            raise ValueError(f"lr={lr!r} must be > 0.")
        if weights_file:
            load_weights(model, weights_file)
        self.model = model
        self.lr, self.optimizer_name, self.weight_decay, self.cosine = lr, optimizer, weight_decay, cosine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        num_classes = logits.shape[1]
        acc = accuracy(logits, y, task="multiclass", num_classes=num_classes)
        acc5 = accuracy(logits, y, task="multiclass", num_classes=num_classes, top_k=min(5, num_classes))
        on_step = stage == "train"
        # DDP: evaluation metrics are averaged over the ranks (each rank sees its shard of the data)
        sync = dict(batch_size=len(y), sync_dist=not on_step)
        self.log(f"{stage}_loss", loss, prog_bar=on_step, on_step=on_step, on_epoch=True, **sync)
        self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True, **sync)
        self.log(f"{stage}_acc5", acc5, on_step=False, on_epoch=True, **sync)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if not self.cosine or self.trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}
