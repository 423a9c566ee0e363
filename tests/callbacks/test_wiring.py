"""Every Lightning wiring a user reaches QuantCallback by, with ``lightning.pytorch`` and ``pytorch_lightning`` alike:
plain dataloaders, a datamodule, the model's own ``train_dataloader()``, several val dataloaders, dict batches,
``predict``, and LightningCLI YAML; calibration data chosen in the documented order, and the batch count reported
is the one used."""

from __future__ import annotations

import importlib
import logging
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_quant import QuantCallback, QuantOptions
from lightning_quant.quantizers.prepare import iter_quantizers
from tests.helpers.models import TinyConvBN, random_images, warm_bn

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]


def _module_class(pkg):
    """A LightningModule of package ``pkg`` around a TinyConvBN (batches: (x, y) tuples or {"image", "label"})."""

    class Lit(pkg.LightningModule):
        def __init__(self, own_train_loader: bool = False):
            super().__init__()
            torch.manual_seed(0)
            self.model = warm_bn(TinyConvBN())
            self.own_train_loader = own_train_loader

        def forward(self, x):
            return self.model(x)

        @staticmethod
        def _split(batch):
            return (batch["image"], batch["label"]) if isinstance(batch, dict) else batch

        def training_step(self, batch, batch_idx):
            x, y = self._split(batch)
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = self._split(batch)
            self.log("val_acc", (self(x).argmax(1) == y).float().mean(), add_dataloader_idx=True)

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            self.validation_step(batch, batch_idx, dataloader_idx)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return self(self._split(batch)[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Lit


class _DictImages(Dataset):
    def __init__(self, seed: int) -> None:
        self.data = random_images(32, seed=seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"image": x, "label": y}


def _loader(seed: int, n: int = 32, dict_batches: bool = False) -> DataLoader:
    return DataLoader(_DictImages(seed) if dict_batches else random_images(n, seed=seed), batch_size=8)


def _trainer(pkg, tmp_path, callback, **kwargs):
    return pkg.Trainer(
        default_root_dir=tmp_path, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", **kwargs,
    )  # fmt: skip


def _calibrated(model) -> bool:
    quantizers = list(iter_quantizers(model.model))
    return bool(quantizers) and all(fq.calibrated.item() for _, fq in quantizers)


@pytest.fixture(params=PACKAGES)
def pkg(request):
    return importlib.import_module(request.param)


@pytest.mark.parametrize("dict_batches", [False, True], ids=["tuple_batches", "dict_batches"])
def test_qat_fit_with_plain_dataloaders(pkg, tmp_path, dict_batches):
    """The reported failure: fit(model, dl) calibrated on Lightning's combined loader and fed it a list."""
    callback = QuantCallback(mode="qat", calibration_batches=2, progress=False, report=False)
    model = _module_class(pkg)()
    _trainer(pkg, tmp_path, callback, max_epochs=1).fit(model, _loader(0, dict_batches=dict_batches))
    assert _calibrated(model) and callback.calibration_batches_used == 2


def test_qat_fit_with_train_and_val_dataloaders(pkg, tmp_path, caplog):
    callback = QuantCallback(mode="qat", calibration_batches=2, progress=False, report=False)
    model = _module_class(pkg)()
    trainer = _trainer(pkg, tmp_path, callback, max_epochs=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, train_dataloaders=_loader(0), val_dataloaders=[_loader(1), _loader(2)])
    assert _calibrated(model)
    assert "of the fit's train dataloader" in caplog.text  # the train loader, never the val loaders


def test_qat_with_network_transforms_on_a_training_network(tmp_path):
    """QAT networks arrive in training mode; equalization folds BatchNorm statistics in eval mode and hands back."""
    pkg = importlib.import_module("lightning.pytorch")
    options = QuantOptions(replace_relu6=True, cross_layer_equalization=True)
    callback = QuantCallback(mode="qat", options=options, calibration_batches=1, progress=False, report=False)
    model = _module_class(pkg)()
    model.train()
    _trainer(pkg, tmp_path, callback, max_epochs=1, limit_train_batches=2).fit(model, _loader(0))
    assert _calibrated(model)


def test_qat_fit_with_a_datamodule(pkg, tmp_path):
    class DM(pkg.LightningDataModule):
        def train_dataloader(self):
            return _loader(0)

        def val_dataloader(self):
            return _loader(1)

    callback = QuantCallback(mode="qat", calibration_batches=2, progress=False, report=False)
    model = _module_class(pkg)()
    _trainer(pkg, tmp_path, callback, max_epochs=1).fit(model, datamodule=DM())
    assert _calibrated(model)


def test_ptq_validate_calibrates_on_the_models_own_train_dataloader(pkg, tmp_path, caplog):
    Lit = _module_class(pkg)

    class OwnLoader(Lit):
        def train_dataloader(self):
            return _loader(0, n=16)  # 2 batches of 8

    callback = QuantCallback(calibration_batches=16, progress=False, report=False)
    model = OwnLoader()
    with caplog.at_level(logging.INFO):
        _trainer(pkg, tmp_path, callback).validate(model, dataloaders=_loader(1), verbose=False)
    assert _calibrated(model)
    assert callback.calibration_batches_used == 2  # the batches that existed, not calibration_batches=16
    assert "OwnLoader.train_dataloader()" in caplog.text


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_ptq_with_only_evaluation_data_names_both_ways_out(pkg, tmp_path, stage):
    callback = QuantCallback(progress=False, report=False)
    trainer = _trainer(pkg, tmp_path, callback)
    with pytest.raises(ValueError, match=r"only evaluation data.*calibration_data=.*calibration_source='val'"):
        getattr(trainer, stage)(_module_class(pkg)(), dataloaders=_loader(1))


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_ptq_with_calibration_data_on_every_evaluation_stage(pkg, tmp_path, stage):
    callback = QuantCallback(calibration_data=_loader(0), calibration_batches=3, progress=False, report=False)
    model = _module_class(pkg)()
    getattr(_trainer(pkg, tmp_path, callback), stage)(model, dataloaders=_loader(1))
    assert _calibrated(model) and callback.calibration_batches_used == 3


def test_calibrating_on_several_val_dataloaders_is_an_opt_in_that_warns(pkg, tmp_path):
    callback = QuantCallback(calibration_source="val", calibration_batches=8, progress=False, report=False)
    model = _module_class(pkg)()
    with pytest.warns(UserWarning, match="optimistic"):
        _trainer(pkg, tmp_path, callback).validate(model, dataloaders=[_loader(1, n=16), _loader(2, n=16)])
    assert callback.calibration_batches_used == 4  # 2 + 2 batches: both loaders, one after the other


def test_ptq_on_dict_batches(pkg, tmp_path):
    callback = QuantCallback(calibration_data=_loader(0, dict_batches=True), progress=False, report=False)
    model = _module_class(pkg)()
    _trainer(pkg, tmp_path, callback).validate(model, dataloaders=_loader(1, dict_batches=True), verbose=False)
    assert _calibrated(model)


def test_calibration_data_wins_over_the_datamodule(tmp_path, caplog):
    pkg = importlib.import_module("lightning.pytorch")

    class DM(pkg.LightningDataModule):
        def calibration_dataloader(self):
            raise AssertionError("calibration_data= was given: the datamodule's loader must not be used")

        def val_dataloader(self):
            return _loader(1)

    callback = QuantCallback(calibration_data=_loader(0), calibration_batches=1, progress=False, report=False)
    with caplog.at_level(logging.INFO):
        _trainer(pkg, tmp_path, callback).validate(_module_class(pkg)(), datamodule=DM(), verbose=False)
    assert "of calibration_data" in caplog.text


def test_lightning_cli_yaml(tmp_path):
    """``class_path: lightning_quant.QuantCallback`` with options from YAML, as LightningCLI users write it."""
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(f"""
            trainer:
              default_root_dir: {tmp_path}
              logger: false
              enable_progress_bar: false
              enable_checkpointing: false
              accelerator: cpu
              callbacks:
                - class_path: lightning_quant.QuantCallback
                  init_args:
                    mode: ptq
                    target: tensorrt
                    calibration_batches: 2
                    calibration_source: val
                    progress: false
                    options:
                      bias_correction: true
        """)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(
            _module_class(importlib.import_module("lightning.pytorch")), run=False,
            args=["--config", str(config)], save_config_kwargs={"overwrite": True},
        )  # fmt: skip
        callback = next(c for c in cli.trainer.callbacks if isinstance(c, QuantCallback))
        assert callback.options == QuantOptions(bias_correction=True) and callback.target.value == "tensorrt"
        cli.trainer.validate(cli.model, dataloaders=_loader(1), verbose=False)
    assert _calibrated(cli.model)
