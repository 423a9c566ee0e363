"""Tiny models and data for tests: Conv-BN nets, a multi-input/kwargs net, dict batches, an untraceable net."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class TinyConvBN(nn.Module):
    """conv-bn-relu x2 with a residual add, pooling and a linear head (10 classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class TinyReLU6Net(nn.Module):
    """MobileNet-style conv-bn-ReLU6 pairs (bias-less convs), pooling and a linear head: what ``replace_relu6``,
    cross-layer equalization (which adds biases) and bias correction change."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)
        nn.init.constant_(self.bn1.weight, 4.0)  # activations well above 6: ReLU6 and ReLU differ

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(y), 1))


class TwoInputNet(nn.Module):
    """Two image inputs plus a keyword flag with a default and an optional scale kwarg."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor, use_depth: bool = True) -> torch.Tensor:
        a = F.relu(self.a(rgb)).mean((2, 3))
        b = F.relu(self.b(depth)).mean((2, 3))
        if not use_depth:
            b = b * 0
        return self.head(torch.cat([a, b], dim=1))


class DictInputNet(nn.Module):
    """Takes one dict batch: {"image": ..., "extra": ...}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 + 2, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        feat = F.relu(self.conv(batch["image"])).mean((2, 3))
        return self.fc(torch.cat([feat, batch["extra"]], dim=1))


class DataDependentBlock(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace this."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return F.relu(self.conv(x))
        return self.conv(x)


class UntraceableNet(nn.Module):
    """A traceable stem, an untraceable block, a traceable head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = DataDependentBlock()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        if y.std() > 0:  # makes the whole model untraceable
            y = self.block(y)
        return self.head(y)


def random_images(n: int = 64, size: int = 16, seed: int = 0, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


class LitClassifier(pl.LightningModule):
    """Minimal LightningModule around ``self.model``: cross-entropy, SGD, logs val accuracy."""

    def __init__(self, model: nn.Module | None = None, lr: float = 0.01) -> None:
        super().__init__()
        self.model = model if model is not None else TinyConvBN()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TinyDataModule(pl.LightningDataModule):
    """Random 16x16 images: train/val/calibration loaders of a fixed, seeded content."""

    def __init__(self, n: int = 64, batch_size: int = 16, with_calibration: bool = True) -> None:
        super().__init__()
        self.train_set, self.val_set = random_images(n, seed=0), random_images(n // 2, seed=1)
        self.batch_size = batch_size
        if with_calibration:
            self.calibration_dataloader = lambda: DataLoader(random_images(32, seed=2), batch_size=self.batch_size)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class EmptyDataset(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i):  # pragma: no cover - never called
        raise IndexError(i)


def warm_bn(model: nn.Module, steps: int = 3, size: int = 16) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, then return the model in eval mode."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(100 + i)) * 2 + 0.5)
    return model.eval()


def seeded_lit(seed: int = 0, num_classes: int = 10) -> LitClassifier:
    """A LitClassifier around a warmed-up TinyConvBN, built from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return LitClassifier(warm_bn(TinyConvBN(num_classes)))


def quiet_trainer(root, callbacks=(), **kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, progress bar or model summary; ``kwargs`` add or override options."""
    options = dict(
        default_root_dir=root,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    options.update(kwargs)
    return pl.Trainer(**options)
