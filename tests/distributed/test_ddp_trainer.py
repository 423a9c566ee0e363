"""QuantCallback under Lightning DDP (2 CPU processes, gloo, spawn): PTQ calibration and QAT stay identical
across ranks, match a single process, resume single-process, and do not hang on uneven data (a hang would
fail on the process group's 120 s collective timeout)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_quant import QuantCallback, scheme_for_target
from lightning_quant.calibration import calibrate
from lightning_quant.quantizers import iter_quantizers
from tests.helpers.models import quiet_trainer, random_images, seeded_lit


class CalibDataModule(pl.LightningDataModule):
    """Picklable (spawn) data: ``calib_batches`` calibration batches of 8, train/val of 32 images."""

    def __init__(self, calib_batches: int = 5) -> None:
        super().__init__()
        self.calib_batches = calib_batches

    def calibration_dataloader(self) -> DataLoader:
        data = random_images(8 * self.calib_batches, seed=2)
        data.tensors[0].mul_(torch.linspace(0.5, 3.0, 8 * self.calib_batches).view(-1, 1, 1, 1))  # ranges differ
        return DataLoader(data, batch_size=8)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(random_images(32, seed=0), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(random_images(24, seed=1), batch_size=8)


class DumpQuantState(Callback):
    """Each rank writes its quantizer state (and whether it holds a report) when a stage ends."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        quant = next(c for c in trainer.callbacks if isinstance(c, QuantCallback))
        state["__has_report"] = torch.tensor(quant.last_report is not None)
        torch.save(state, Path(self.out) / f"{tag}-rank{trainer.global_rank}.pt")

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._dump(trainer, pl_module, "validate")

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, pl_module, "fit")


lit = seeded_lit


def ddp_trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=120))
    return quiet_trainer(tmp_path, callbacks, devices=2, strategy=strategy, **kwargs)


def load_ranks(tmp_path: Path, tag: str) -> list[dict]:
    return [torch.load(tmp_path / f"{tag}-rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("observer", ["minmax", "mean_minmax"])
@pytest.mark.parametrize("calib_batches", [5, 1])  # 5: uneven shares (3 and 2); 1: rank 1 gets none
def test_ddp_ptq_calibration_equals_single_process(tmp_path, calib_batches, observer):
    """min/max ranges merge exactly; the default ``mean_minmax`` merges its sample-weighted means in float64, equal
    to the single process's running mean to float32 rounding."""
    scheme = scheme_for_target("x86", activation_observer=observer)
    quant = QuantCallback(mode="ptq", scheme=scheme, calibration_batches=calib_batches, progress=False)
    trainer = ddp_trainer(tmp_path, [quant, DumpQuantState(str(tmp_path))], enable_checkpointing=False)
    trainer.validate(lit(), datamodule=CalibDataModule(calib_batches))
    ranks = load_ranks(tmp_path, "validate")
    assert bool(ranks[0].pop("__has_report")) and not bool(ranks[1].pop("__has_report"))  # report on rank 0 only
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    single = lit()
    single_cb = QuantCallback(
        mode="ptq", scheme=scheme, calibration_batches=calib_batches, progress=False, report=False
    )
    single_cb.setup(None, single, "validate")  # type: ignore[arg-type]
    calibrate(single.model, CalibDataModule(calib_batches).calibration_dataloader(), progress=False)
    expected = single.model.state_dict()
    for name, _ in iter_quantizers(single.model):
        for buf in ("scale", "zero_point", "observer.min_val", "observer.max_val"):
            key = f"{name}.{buf}"
            if observer == "minmax":
                assert torch.equal(ranks[0][key], expected[key]), key  # exactly the union's calibration
            else:
                torch.testing.assert_close(ranks[0][key], expected[key], rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize("learnable", [False, True])  # True: LSQ scales are parameters, synced by DDP's all-reduce
def test_ddp_qat_then_resume_single_process(tmp_path, learnable):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    scheme = scheme_for_target("x86", "qat", activation_learnable=learnable, weight_learnable=learnable)
    quant = QuantCallback(mode="qat", scheme=scheme, calibration_batches=2, progress=False, report=False)
    trainer = ddp_trainer(tmp_path, [quant, ckpt, DumpQuantState(str(tmp_path))], max_epochs=1)
    trainer.fit(lit(), datamodule=CalibDataModule())
    ranks = load_ranks(tmp_path, "fit")
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # weights (DDP) and quantizer state (merged)
    scales = {k: v for k, v in ranks[0].items() if k.endswith(".scale")}
    start = lit()
    start_cb = QuantCallback(mode="qat", scheme=scheme, calibration_batches=2, progress=False, report=False)
    start_cb.setup(None, start, "fit")  # type: ignore[arg-type]
    calibrate(start.model, CalibDataModule().calibration_dataloader(), num_batches=2, progress=False)
    moved = [k for k, v in scales.items() if not torch.equal(v, start.model.state_dict()[k])]
    assert moved  # QAT changed scales (observers or LSQ) after calibration, and both ranks agree on them
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()

    resumed_quant = QuantCallback(mode="qat", scheme=scheme, calibration_batches=2, progress=False, report=False)
    single = quiet_trainer(tmp_path, [resumed_quant], devices=1, max_epochs=2, enable_checkpointing=False)
    model = lit()
    single.fit(model, datamodule=CalibDataModule(), ckpt_path=str(last))
    assert single.global_step == 2 + 4  # epoch 0: 4 batches over 2 ranks; epoch 1: 4 batches in one process
    for name, fq in iter_quantizers(model.model):
        assert fq.calibrated.item() == 1, name
