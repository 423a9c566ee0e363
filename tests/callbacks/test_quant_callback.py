"""QuantCallback in a real Trainer: PTQ in validate/test/predict, QAT in fit, schedule, report, logging."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_quant import QATSchedule, QuantCallback, QuantOptions, scheme_for_target
from lightning_quant.checkpoint import load_quantized_checkpoint
from lightning_quant.quantizers import iter_quantizers, prepare_info
from lightning_quant.quantizers.modules import QuantConvBn
from tests.helpers.models import (
    EmptyDataset,
    LitClassifier,
    TinyConvBN,
    TinyDataModule,
    quiet_trainer,
    random_images,
    seeded_lit,
)


def make_trainer(tmp_path, callback, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, [callback], **{"enable_checkpointing": False, **kwargs})


lit = seeded_lit
MINMAX = scheme_for_target("x86", activation_observer="minmax")  # ranges that equal what calibration saw


def input_range(module: LitClassifier) -> tuple[float, float]:
    fq = module.model.activation_quantizers["x"]
    return fq.observer.min_val.item(), fq.observer.max_val.item()


def test_ptq_validate_calibrates_on_calibration_loader_not_val(tmp_path):
    dm = TinyDataModule()
    marker = random_images(32, seed=5)
    marker.tensors[0][0, 0, 0, 0] = 1000.0  # only the calibration data holds this value
    dm.calibration_dataloader = lambda: DataLoader(marker, batch_size=16)
    cb = QuantCallback(mode="ptq", scheme=MINMAX, calibration_batches=2, progress=False)
    model = lit()
    result = make_trainer(tmp_path, cb).validate(model, datamodule=dm)
    assert "val_acc" in result[0]
    assert all(fq.calibrated.item() for _, fq in iter_quantizers(model.model))
    assert not any(fq.observer_enabled.item() for _, fq in iter_quantizers(model.model))
    assert input_range(model)[1] == pytest.approx(1000.0)
    assert cb.last_report is not None and [r.name for r in cb.last_report.rows] == ["conv1", "conv2", "fc"]
    assert prepare_info(model.model).folded_bn == ["bn1", "bn2"]


def test_ptq_fake_quant_output_close_to_float(tmp_path):
    float_model = lit()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = float_model(x)
    model = lit()
    make_trainer(tmp_path, QuantCallback(calibration_batches=4, progress=False)).validate(
        model, datamodule=TinyDataModule()
    )
    with torch.no_grad():
        got = model(x)
    assert not torch.equal(got, expected)  # fake-quant is really in the loop
    assert torch.allclose(got, expected, atol=0.05 * expected.abs().max().item())


def test_ptq_uses_train_loader_when_no_calibration_loader(tmp_path):
    dm = TinyDataModule(with_calibration=False)
    dm.train_set.tensors[0][0, 0, 0, 0] = -777.0
    model = lit()
    callback = QuantCallback(scheme=MINMAX, calibration_batches=1, progress=False)
    make_trainer(tmp_path, callback).validate(model, datamodule=dm)
    assert input_range(model)[0] == pytest.approx(-777.0)


def test_ptq_second_validate_does_not_recalibrate(tmp_path):
    dm, model = TinyDataModule(), lit()
    cb = QuantCallback(calibration_batches=2, progress=False)
    trainer = make_trainer(tmp_path, cb)
    first = trainer.validate(model, datamodule=dm)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dm.calibration_dataloader = lambda: DataLoader(random_images(32, seed=9), batch_size=16)
    second = trainer.validate(model, datamodule=dm)
    assert first == second
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_ptq_test_and_predict_stages(tmp_path):
    dm = TinyDataModule()
    model = lit()
    trainer = make_trainer(tmp_path, QuantCallback(calibration_batches=1, progress=False))
    assert "val_acc" in trainer.test(model, datamodule=dm)[0]
    preds = trainer.predict(model, dataloaders=DataLoader(random_images(8), batch_size=4))
    assert len(preds) == 2 and preds[0].shape == (4, 10)


def test_ptq_explicit_calibration_data_and_transform(tmp_path):
    batches = [{"img": torch.full((2, 3, 16, 16), 3.0)} for _ in range(3)]
    cb = QuantCallback(calibration_batches=5, calibration_data=batches, transform_fn=lambda b: b["img"], progress=False)
    model = lit()
    make_trainer(tmp_path, cb).validate(model, datamodule=TinyDataModule())
    assert input_range(model) == (0.0, 3.0) or input_range(model)[1] == pytest.approx(3.0)


def test_ptq_calibration_source_val_warns(tmp_path):
    cb = QuantCallback(calibration_batches=1, calibration_source="val", progress=False)
    dl = DataLoader(random_images(16, seed=1), batch_size=8)
    with pytest.warns(UserWarning, match="optimistic"):
        make_trainer(tmp_path, cb).validate(lit(), dataloaders=dl)


def test_ptq_without_calibration_source_raises(tmp_path):
    dl = DataLoader(random_images(16, seed=1), batch_size=8)
    with pytest.raises(ValueError, match="no calibration data"):
        make_trainer(tmp_path, QuantCallback(progress=False)).validate(lit(), dataloaders=dl)


def test_ptq_empty_calibration_loader_raises(tmp_path):
    cb = QuantCallback(calibration_data=DataLoader(EmptyDataset(), batch_size=4), progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        make_trainer(tmp_path, cb).validate(lit(), datamodule=TinyDataModule())


def test_nan_reaching_observer_names_layer(tmp_path):
    bad = [torch.full((2, 3, 16, 16), float("nan"))]
    cb = QuantCallback(calibration_data=bad, progress=False)
    with pytest.raises(FloatingPointError, match="NaN values reached an observer at quantizer 'x'"):
        make_trainer(tmp_path, cb).validate(lit(), datamodule=TinyDataModule())


def test_ptq_with_fit_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mode='qat' to fine-tune"):
        make_trainer(tmp_path, QuantCallback(mode="ptq"), max_epochs=1).fit(lit(), datamodule=TinyDataModule())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(mode="int8"), ValueError, "mode='int8' is not supported; use one of 'ptq', 'qat'"),
        (dict(target="tpu"), ValueError, "use one of 'x86', 'x86_vnni', 'tensorrt', 'dpu'"),
        (dict(calibration_batches=-1), ValueError, "calibration_batches=-1 must be an integer >= 0"),
        (dict(calibration_batches=0), ValueError, "mode='ptq' needs calibration_batches >= 1"),
        (dict(calibration_source="test"), ValueError, "calibration_source='test'"),
        (dict(qat_schedule={"freeze_bn_epoch": 1}), TypeError, "qat_schedule must be a QATSchedule"),
        (dict(scheme="x86"), TypeError, "scheme must be a QuantScheme"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantCallback(**kwargs)


def test_calibration_source_calibration_requires_loader(tmp_path):
    cb = QuantCallback(calibration_source="calibration", progress=False)
    with pytest.raises(ValueError, match="calibration_source='calibration'"):
        make_trainer(tmp_path, cb).validate(lit(), datamodule=TinyDataModule(with_calibration=False))


class TwoNets(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = TinyConvBN()
        self.decoder = TinyConvBN()

    def forward(self, x):
        return self.decoder(x) + self.encoder(x)

    def validation_step(self, batch, batch_idx):
        self.log("v", self(batch[0]).mean())


def test_ambiguous_network_needs_module_name(tmp_path):
    with pytest.raises(ValueError, match="module_name='<attribute>'"):
        make_trainer(tmp_path, QuantCallback(progress=False)).validate(TwoNets(), datamodule=TinyDataModule())
    with pytest.raises(ValueError, match="has no nn.Module attribute"):
        make_trainer(tmp_path, QuantCallback(module_name="nope")).validate(TwoNets(), datamodule=TinyDataModule())
    module = TwoNets()
    make_trainer(tmp_path, QuantCallback(module_name="encoder", calibration_batches=1, progress=False)).validate(
        module, datamodule=TinyDataModule()
    )
    assert len(list(iter_quantizers(module.encoder))) > 0 and not list(iter_quantizers(module.decoder))


def test_qat_fit_trains_with_fake_quant_and_schedule(tmp_path):
    model = lit()
    schedule = QATSchedule(freeze_observer_epoch=1, freeze_bn_epoch=1)
    cb = QuantCallback(mode="qat", calibration_batches=2, qat_schedule=schedule, progress=False)
    before = model.model.conv1.weight.detach().clone()
    make_trainer(tmp_path, cb, max_epochs=2).fit(model, datamodule=TinyDataModule())
    convbn = [m for m in model.model.modules() if isinstance(m, QuantConvBn)]
    assert len(convbn) == 2 and all(m.bn_frozen.item() for m in convbn)
    assert not any(fq.observer_enabled.item() for _, fq in iter_quantizers(model.model))
    assert all(fq.calibrated.item() for _, fq in iter_quantizers(model.model))
    assert not torch.equal(before, model.model.conv1.conv.weight)  # the user's optimizer trained it
    assert cb.last_report is not None


def test_qat_observers_update_until_frozen_and_not_during_validation(tmp_path):
    model = lit()
    cb = QuantCallback(
        mode="qat", calibration_batches=1, qat_schedule=QATSchedule(freeze_observer_epoch=None), progress=False
    )
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(input_range(pl_module))

        def on_validation_batch_start(self, trainer, pl_module, *args):
            assert not pl_module.model.activation_quantizers["x"].observer_enabled.item()

    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[cb, Spy()],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(model, datamodule=TinyDataModule())
    assert len(set(seen)) > 1  # moving-average ranges moved during training
    assert len(seen) == 4  # every training batch (the sanity check and validation never observed)
    assert not model.model.activation_quantizers["x"].observer_enabled.item()  # frozen once fit ends
    before = input_range(model)
    model(torch.randn(2, 3, 16, 16) * 50)
    assert input_range(model) == before  # inference after QAT never moves the ranges


def test_qat_step_based_schedule(tmp_path):
    model = lit()
    cb = QuantCallback(
        mode="qat",
        calibration_batches=0,
        progress=False,
        qat_schedule=QATSchedule(freeze_observer_step=2, freeze_bn_step=3),
    )
    make_trainer(tmp_path, cb, max_steps=4).fit(model, datamodule=TinyDataModule())
    assert all(fq.calibrated.item() for _, fq in iter_quantizers(model.model))  # first batches calibrated
    assert not model.model.activation_quantizers["x"].observer_enabled.item()
    assert all(m.bn_frozen.item() for m in model.model.modules() if isinstance(m, QuantConvBn))


class _AdamLit(LitClassifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


@pytest.mark.parametrize("equalized,adam", [(False, False), (True, False), (True, True)])
def test_freezing_batchnorm_in_an_equalized_network_warns_under_sgd(tmp_path, equalized, adam, recwarn):
    """SGD diverged after the freeze (MobileNetV2); AdamW trained the DPU QAT recipe with BatchNorm frozen."""
    model = _AdamLit(lit().model) if adam else lit()
    cb = QuantCallback(
        mode="qat",
        calibration_batches=0,
        progress=False,
        options=QuantOptions(cross_layer_equalization=equalized),
        qat_schedule=QATSchedule(freeze_bn_step=2),
    )
    make_trainer(tmp_path, cb, max_steps=4).fit(model, datamodule=TinyDataModule())
    warned = [w for w in recwarn if "BatchNorm now uses running statistics" in str(w.message)]
    assert len(warned) == int(equalized and not adam)  # once, at the freeze


def test_qat_learnable_scales_are_trained(tmp_path):

    scheme = scheme_for_target("x86", "qat", weight_learnable=True, activation_learnable=True)
    model = lit()
    cb = QuantCallback(mode="qat", scheme=scheme, calibration_batches=2, progress=False)
    trainer = make_trainer(tmp_path, cb, max_epochs=1)
    trainer.fit(model, datamodule=TinyDataModule())
    scales = [fq.scale for _, fq in iter_quantizers(model.model)]
    assert all(isinstance(s, nn.Parameter) for s in scales)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(s) in optimized for s in scales)
    assert not any(fq.observer_enabled.item() for _, fq in iter_quantizers(model.model))


def test_report_is_logged_to_trainer_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(tmp_path, QuantCallback(calibration_batches=1, progress=False), logger=logger)
    trainer.validate(lit(), datamodule=TinyDataModule())
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        header = next(csv.reader(fh))
    assert "quant/output_sqnr_db" in header and "quant/sqnr_db/conv1" in header


def test_callback_setup_is_idempotent(tmp_path):
    model, cb = lit(), QuantCallback(calibration_batches=1, progress=False)
    trainer = make_trainer(tmp_path, cb)
    trainer.validate(model, datamodule=TinyDataModule())
    n = len(list(iter_quantizers(model)))
    cb.setup(trainer, model, "validate")
    assert len(list(iter_quantizers(model))) == n


def test_empty_loader_raises_before_touching_weights():
    with pytest.raises(ValueError, match="calibration data is empty"):
        from lightning_quant import quantize

        quantize(TinyConvBN().eval(), [], progress=False)


def test_post_calibration_refinements_run_in_a_trainer(tmp_path):
    corrected, plain = lit(), lit()
    bc = QuantOptions(bias_correction=True)
    callback = QuantCallback(mode="ptq", calibration_batches=2, options=bc, progress=False, report=False)
    make_trainer(tmp_path, callback).validate(corrected, datamodule=TinyDataModule())
    off = QuantOptions(bias_correction=False)
    make_trainer(
        tmp_path, QuantCallback(mode="ptq", calibration_batches=2, options=off, progress=False, report=False)
    ).validate(plain, datamodule=TinyDataModule())
    assert not torch.equal(corrected.model.conv2.bias, plain.model.conv2.bias)  # corrected after calibration
    assert callback.state_dict()["options"]["bias_correction"] is True
    assert prepare_info(corrected.model).refinements == ["bias_correction"]
    trainer = make_trainer(tmp_path, callback)
    trainer.validate(corrected, datamodule=TinyDataModule())
    trainer.save_checkpoint(tmp_path / "corrected.ckpt")
    reloaded = load_quantized_checkpoint(lit(), tmp_path / "corrected.ckpt")
    assert prepare_info(reloaded.model).refinements == ["bias_correction"]  # e.g. quant_info.json's bias_corrected


@pytest.mark.parametrize(
    ("stage", "refinement"), [("validate", "fast_finetune"), ("test", "fast_finetune"), ("validate", "adaround")]
)
def test_fast_finetune_runs_under_lightning_inference_mode(tmp_path, stage, refinement):
    # validate/test run callbacks inside torch.inference_mode(); fast finetune and AdaRound need autograd there.
    tuned, plain = lit(), lit()
    options = QuantOptions(**{refinement: True})
    callback = QuantCallback(mode="ptq", calibration_batches=2, options=options, progress=False, report=False)
    getattr(make_trainer(tmp_path, callback), stage)(tuned, datamodule=TinyDataModule())
    assert not tuned.model.conv1.weight.is_inference()
    assert not torch.equal(tuned.model.conv1.weight, plain.model.conv1.weight)  # the weights were tuned


def test_refinements_refused_for_qat():
    with pytest.raises(ValueError, match="refine a PTQ calibration"):
        QuantCallback(mode="qat", options=QuantOptions(fast_finetune=True))
    with pytest.raises(ValueError, match="adaround refine a PTQ calibration"):
        QuantCallback(mode="qat", options=QuantOptions(adaround=True))


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_layer_weight_bits_in_the_callback_and_its_checkpoint(tmp_path, mode):
    from lightning_quant import CheckpointMismatchError

    scheme = scheme_for_target("x86", mode, weight_bits=4)
    callback = QuantCallback(mode=mode, scheme=scheme, layer_weight_bits={"conv*": 8}, progress=False, report=False)
    model = lit()
    trainer = make_trainer(tmp_path, callback, max_steps=1)
    trainer.fit(model, datamodule=TinyDataModule()) if mode == "qat" else trainer.validate(model, TinyDataModule())
    bits = {name: fq.spec.bits for name, fq in iter_quantizers(model.model) if name.endswith("weight_fake_quant")}
    assert bits == {"conv1.weight_fake_quant": 8, "conv2.weight_fake_quant": 8, "fc.weight_fake_quant": 4}
    trainer.save_checkpoint(tmp_path / "mixed.ckpt")
    reloaded = load_quantized_checkpoint(lit(), tmp_path / "mixed.ckpt")
    assert prepare_info(reloaded.model).weight_bits == {"conv1": 8, "conv2": 8}
    other = QuantCallback(mode=mode, scheme=scheme, progress=False, report=False)
    with pytest.raises(CheckpointMismatchError, match=r"layer_weight_bits=\{'conv\*': 8\}"):
        other.load_state_dict(callback.state_dict())
