"""What was loaded is what runs: loads are safe (a pickle payload never executes), a state without the callback's
config still refuses another scheme, and a loaded PTQ state is never recalibrated behind the user's back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant import CheckpointMismatchError, NotCalibratedError, QuantCallback, load_quantized_checkpoint
from lightning_quant.checkpoint import read_checkpoint
from lightning_quant.quantizers.prepare import iter_quantizers
from tests.helpers.models import quiet_trainer, random_images, seeded_lit

CALIBRATION = DataLoader(random_images(32, seed=2), batch_size=16)
VAL = DataLoader(random_images(16, seed=1), batch_size=16)


def _callback(**kwargs) -> QuantCallback:
    return QuantCallback(calibration_data=CALIBRATION, calibration_batches=2, progress=False, report=False, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A PTQ state written with save_weights_only=True (no callback state in the file)."""
    root = tmp_path_factory.mktemp("state")
    trainer = quiet_trainer(root, [_callback()])
    trainer.validate(seeded_lit(), dataloaders=VAL, verbose=False)
    trainer.save_checkpoint(root / "weights.ckpt", weights_only=True)
    return root


def test_weights_only_state_refuses_another_scheme(saved):
    assert "callbacks" not in read_checkpoint(saved / "weights.ckpt")
    with pytest.raises(CheckpointMismatchError, match="target='x86'.*target='tensorrt'"):
        quiet_trainer(saved, [_callback(target="tensorrt")]).validate(
            seeded_lit(1), dataloaders=VAL, ckpt_path=saved / "weights.ckpt", verbose=False
        )


def _with_one_uncalibrated(saved: Path) -> tuple[Path, str]:
    checkpoint = read_checkpoint(saved / "weights.ckpt")
    key = next(k for k in checkpoint["state_dict"] if k.endswith(".calibrated"))
    checkpoint["state_dict"][key] = torch.zeros_like(checkpoint["state_dict"][key])
    path = saved / "partial.ckpt"
    torch.save(checkpoint, path)
    return path, key.removeprefix("model.").removesuffix(".calibrated")


def test_a_loaded_state_is_never_recalibrated_silently(saved):
    path, name = _with_one_uncalibrated(saved)
    expected = rf"leaves 1 of \d+ quantizers uncalibrated \({name}\).*calibrate_missing=True"
    with pytest.raises(NotCalibratedError, match=expected):
        quiet_trainer(saved, [_callback()]).validate(seeded_lit(1), dataloaders=VAL, ckpt_path=path, verbose=False)


def test_calibrate_missing_calibrates_only_the_missing_quantizers(saved):
    path, name = _with_one_uncalibrated(saved)
    loaded = {k: v for k, v in read_checkpoint(path)["state_dict"].items() if k.endswith(".scale")}
    model = seeded_lit(1)
    with pytest.warns(UserWarning, match="calibrating only the 1 quantizers"):
        quiet_trainer(saved, [_callback(calibrate_missing=True)]).validate(
            model, dataloaders=VAL, ckpt_path=path, verbose=False
        )
    for qname, fq in iter_quantizers(model.model):
        assert fq.calibrated.item()
        if qname != name:  # the loaded ones keep their values
            assert torch.equal(fq.scale, loaded[f"model.{qname}.scale"])


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_a_checkpoint_never_executes(saved, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = read_checkpoint(saved / "weights.ckpt")
    checkpoint["hyper_parameters"] = {"lr": _Payload(str(marker))}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"refused by the safe loader.*Nothing in it was executed"):
        load_quantized_checkpoint(seeded_lit(), tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        quiet_trainer(tmp_path, [_callback()]).validate(
            seeded_lit(), dataloaders=VAL, ckpt_path=tmp_path / "evil.ckpt", weights_only=True, verbose=False
        )
    assert not marker.exists()
