"""Checkpoints: QAT resume gives the same run, PTQ/QAT state reloads in a fresh Trainer and a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_quant import CheckpointMismatchError, QATSchedule, QuantCallback, QuantOptions
from lightning_quant.checkpoint import load_quantized_checkpoint
from lightning_quant.quantizers import iter_quantizers
from tests.helpers.models import LitClassifier, TinyDataModule, quiet_trainer, seeded_lit

REPO = Path(__file__).resolve().parents[2]


lit = seeded_lit


def qat_callback() -> QuantCallback:
    return QuantCallback(
        mode="qat",
        calibration_batches=2,
        progress=False,
        qat_schedule=QATSchedule(freeze_observer_epoch=1, freeze_bn_epoch=1),
    )


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, callbacks, deterministic=True, **kwargs)


def quant_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def qat_run(tmp_path):
    """One epoch of QAT with a checkpoint per epoch; returns (checkpoint path, trained module)."""
    model = lit()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    trainer(tmp_path, [qat_callback(), ckpt], max_epochs=1).fit(model, datamodule=TinyDataModule())
    return tmp_path / "ckpt" / "last.ckpt", model


def test_qat_resume_matches_uninterrupted_run(tmp_path, qat_run):
    last, _ = qat_run
    straight = lit()
    trainer(tmp_path / "a", [qat_callback()], max_epochs=2, enable_checkpointing=False).fit(
        straight, datamodule=TinyDataModule()
    )
    resumed = lit(seed=123)  # different init: everything must come from the checkpoint
    trainer(tmp_path / "b", [qat_callback()], max_epochs=2, enable_checkpointing=False).fit(
        resumed, datamodule=TinyDataModule(), ckpt_path=last
    )
    assert_same_state(quant_state(straight), quant_state(resumed))


def test_resume_restores_identical_quantizer_state(tmp_path, qat_run):
    last, trained = qat_run
    saved = torch.load(last, weights_only=False)["state_dict"]
    snapshot = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot.update({k: v.clone() for k, v in pl_module.state_dict().items() if "quant" in k})

    trainer(tmp_path, [Snapshot(), qat_callback()], max_epochs=2, enable_checkpointing=False).fit(
        lit(seed=7), datamodule=TinyDataModule(), ckpt_path=last
    )
    assert snapshot and all(torch.equal(saved[k], v) for k, v in snapshot.items())


def test_validate_from_qat_checkpoint_in_fresh_trainer(tmp_path, qat_run):
    last, trained = qat_run
    dm = TinyDataModule()
    expected = trainer(tmp_path, [qat_callback()], enable_checkpointing=False).validate(trained, datamodule=dm)
    fresh = lit(seed=99)
    got = trainer(tmp_path, [qat_callback()], enable_checkpointing=False).validate(fresh, datamodule=dm, ckpt_path=last)
    assert got == expected


def test_ptq_checkpoint_reloads_without_recalibrating(tmp_path):
    dm = TinyDataModule()
    model = lit()
    cb = QuantCallback(calibration_batches=2, progress=False)
    t = trainer(tmp_path, [cb], enable_checkpointing=False)
    expected = t.validate(model, datamodule=dm)
    t.save_checkpoint(tmp_path / "ptq.ckpt")

    def forbidden():
        raise AssertionError("calibration must not run when the checkpoint holds calibrated state")

    dm.calibration_dataloader = forbidden
    fresh = lit(seed=5)
    got = trainer(
        tmp_path, [QuantCallback(calibration_batches=2, progress=False)], enable_checkpointing=False
    ).validate(fresh, datamodule=dm, ckpt_path=tmp_path / "ptq.ckpt")
    assert got == expected


def test_load_quantized_checkpoint_in_fresh_process(tmp_path, qat_run):
    last, trained = qat_run
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = trained.eval()(x)
    script = textwrap.dedent(f"""
        import torch
        from lightning_quant.checkpoint import load_quantized_checkpoint
        from tests.helpers.models import LitClassifier, TinyConvBN
        model = load_quantized_checkpoint(LitClassifier(TinyConvBN()), {str(last)!r})
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_float_checkpoint_is_rejected_clearly(tmp_path):
    model = lit()
    t = trainer(tmp_path, [], max_epochs=1, enable_checkpointing=False)
    t.fit(model, datamodule=TinyDataModule())
    t.save_checkpoint(tmp_path / "float.ckpt")
    with pytest.raises(CheckpointMismatchError, match="no quantization state"):
        trainer(tmp_path, [QuantCallback(progress=False)]).validate(
            lit(), datamodule=TinyDataModule(), ckpt_path=tmp_path / "float.ckpt"
        )
    with pytest.raises(CheckpointMismatchError, match="no quantization config.*saved from a float model"):
        load_quantized_checkpoint(lit(), tmp_path / "float.ckpt")


def test_checkpoint_from_other_target_is_rejected(tmp_path):
    t = trainer(tmp_path, [QuantCallback(target="x86", calibration_batches=1, progress=False)])
    t.validate(lit(), datamodule=TinyDataModule())
    t.save_checkpoint(tmp_path / "x86.ckpt")
    with pytest.raises(CheckpointMismatchError, match="target='x86'"):
        trainer(tmp_path, [QuantCallback(target="tensorrt", progress=False)]).validate(
            lit(), datamodule=TinyDataModule(), ckpt_path=tmp_path / "x86.ckpt"
        )


def test_checkpoint_with_other_relu6_choice_is_rejected(tmp_path):
    relu = QuantOptions(replace_relu6=True)
    t = trainer(tmp_path, [QuantCallback(options=relu, calibration_batches=1, progress=False)])
    t.validate(lit(), datamodule=TinyDataModule())
    t.save_checkpoint(tmp_path / "relu.ckpt")
    expected = r"replace_relu6.*options=QuantOptions\(replace_relu6=True\)"
    with pytest.raises(CheckpointMismatchError, match=expected):
        trainer(tmp_path, [QuantCallback(progress=False)]).validate(
            lit(), datamodule=TinyDataModule(), ckpt_path=tmp_path / "relu.ckpt"
        )


def test_checkpoint_from_other_mode_is_rejected(tmp_path, qat_run):
    last, _ = qat_run
    with pytest.raises(CheckpointMismatchError, match="written in qat mode; this model is prepared for ptq"):
        trainer(tmp_path, [QuantCallback(mode="ptq", progress=False)]).validate(
            lit(), datamodule=TinyDataModule(), ckpt_path=last
        )


def test_checkpoint_from_other_model_is_rejected(tmp_path, qat_run):
    last, _ = qat_run
    other = LitClassifier(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10)))
    other(torch.randn(1, 3, 16, 16))
    with pytest.raises(CheckpointMismatchError, match="does not match this model"):
        load_quantized_checkpoint(other, last)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_is_reported(tmp_path, qat_run, damage):
    last, _ = qat_run
    data = last.read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"not a checkpoint" * 10)
    with pytest.raises(CheckpointMismatchError, match="truncated or corrupted"):
        load_quantized_checkpoint(lit(), bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized_checkpoint(lit(), tmp_path / "missing.ckpt")


def test_loaded_quantizers_are_frozen_and_calibrated(tmp_path, qat_run):
    last, _ = qat_run
    model = load_quantized_checkpoint(lit(seed=4), last)
    quantizers = list(iter_quantizers(model))
    assert quantizers and all(fq.calibrated.item() and not fq.observer_enabled.item() for _, fq in quantizers)


def test_max_pool_quantizer_entries_of_older_checkpoints_are_dropped_with_a_warning():
    from lightning_quant.config import scheme_for_target
    from lightning_quant.quantizers import prepare
    from lightning_quant.quantizers.state_checks import check_quant_state_keys

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 2, 1)
    ).eval()
    qmodel = prepare(model, scheme_for_target("x86"))
    qmodel(torch.randn(2, 3, 8, 8))
    state = qmodel.state_dict()
    # an older version gave the pool (node "_2") a quantizer of its own
    legacy = {k.replace("activation_quantizers._1.", "activation_quantizers._2."): v.clone()
              for k, v in state.items() if k.startswith("activation_quantizers._1.")}  # fmt: skip
    fresh = prepare(model, scheme_for_target("x86"))
    fresh.register_load_state_dict_pre_hook(check_quant_state_keys)
    with pytest.warns(UserWarning, match=r"max-pool output quantizers .*activation_quantizers\._2\."):
        fresh.load_state_dict({**state, **legacy})
    assert torch.equal(
        fresh.get_submodule("activation_quantizers._1").scale, qmodel.get_submodule("activation_quantizers._1").scale
    )
    with pytest.raises(
        CheckpointMismatchError, match="unexpected activation_quantizers._9"
    ):  # anything else still fails
        fresh.load_state_dict({**state, "activation_quantizers._9.scale": torch.ones(1)})
