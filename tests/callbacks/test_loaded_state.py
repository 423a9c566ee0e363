"""What was loaded is what runs: loads are safe (a pickle payload never executes), a state without the callback's
config still refuses another scheme, and a loaded PTQ state is never recalibrated behind the user's back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant import CheckpointMismatchError, QuantCallback, load_quantized_checkpoint, scheme_for_target
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
    """One quantizer with calibrated=0 used to make the callback recalibrate every quantizer."""
    path, name = _with_one_uncalibrated(saved)
    loaded = {k: v for k, v in read_checkpoint(path)["state_dict"].items() if k.endswith(".scale")}
    model = seeded_lit(1)
    with pytest.warns(UserWarning, match=rf"holds 1 of \d+ quantizers uncalibrated \({name}\).*calibrate_missing=True"):
        quiet_trainer(saved, [_callback()]).validate(model, dataloaders=VAL, ckpt_path=path, verbose=False)
    for qname, fq in iter_quantizers(model.model):  # every value as loaded, the uncalibrated one included
        assert torch.equal(fq.scale, loaded[f"model.{qname}.scale"])
        assert bool(fq.calibrated.item()) == (qname != name)


def test_calibrate_missing_calibrates_only_the_missing_quantizers(saved):
    path, name = _with_one_uncalibrated(saved)
    checkpoint = read_checkpoint(path)
    checkpoint["state_dict"][f"model.{name}.scale"] = torch.full_like(
        checkpoint["state_dict"][f"model.{name}.scale"], 7.0
    )
    torch.save(checkpoint, path)  # a sentinel scale: calibration must replace it
    loaded = {k: v for k, v in checkpoint["state_dict"].items() if k.endswith(".scale")}
    model = seeded_lit(1)
    with pytest.warns(UserWarning, match="calibrating only the 1 quantizers"):
        quiet_trainer(saved, [_callback(calibrate_missing=True)]).validate(
            model, dataloaders=VAL, ckpt_path=path, verbose=False
        )
    for qname, fq in iter_quantizers(model.model):
        assert fq.calibrated.item()
        if qname == name:
            assert not torch.equal(fq.scale, loaded[f"model.{qname}.scale"])  # calibrated, not the sentinel
        else:  # the loaded ones keep their values
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


def _as_release_0_1(saved: Path, name: str, *, keep_callback_state: bool) -> Path:
    """The full checkpoint as 0.1 wrote it: no config record, the option switches at the top of the callback state."""
    checkpoint = read_checkpoint(saved / "full.ckpt")
    del checkpoint["state_dict"]["model.lightning_quant_config"]
    if keep_callback_state:
        state = checkpoint["callbacks"][next(iter(checkpoint["callbacks"]))]
        options = state.pop("options")
        state.update({k: options[k] for k in ("replace_relu6", "cross_layer_equalization", "bias_correction")})
    else:
        del checkpoint["callbacks"]
    path = saved / name
    torch.save(checkpoint, path)
    return path


def test_release_0_1_checkpoints_load_through_the_trainer_and_the_loader(saved):
    trainer = quiet_trainer(saved, [_callback()])
    trainer.validate(seeded_lit(), dataloaders=VAL, verbose=False)
    trainer.save_checkpoint(saved / "full.ckpt")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = load_quantized_checkpoint(seeded_lit(2), saved / "full.ckpt").model(x)
    old = _as_release_0_1(saved, "old.ckpt", keep_callback_state=True)
    model = seeded_lit(1)
    with pytest.warns(UserWarning, match="written by an earlier release without a config record"):
        quiet_trainer(saved, [_callback()]).validate(model, dataloaders=VAL, ckpt_path=old, verbose=False)
    assert torch.equal(model.model.eval()(x), expected)
    assert torch.equal(load_quantized_checkpoint(seeded_lit(3), old).model(x), expected)
    with pytest.raises(CheckpointMismatchError, match="target"):  # its callback state still has to match
        quiet_trainer(saved, [_callback(target="tensorrt")]).validate(
            seeded_lit(1), dataloaders=VAL, ckpt_path=old, verbose=False
        )
    weights_only = _as_release_0_1(saved, "old_weights.ckpt", keep_callback_state=False)
    with pytest.raises(CheckpointMismatchError, match="no record of the scheme and options"):
        quiet_trainer(saved, [_callback()]).validate(
            seeded_lit(1), dataloaders=VAL, ckpt_path=weights_only, verbose=False
        )


def test_an_already_quantized_network_must_match_the_callback(saved):
    model = load_quantized_checkpoint(seeded_lit(), saved / "weights.ckpt")
    with pytest.raises(CheckpointMismatchError, match="already quantized"):
        quiet_trainer(saved, [_callback(target="tensorrt")]).validate(model, dataloaders=VAL, verbose=False)
    quiet_trainer(saved, [_callback()]).validate(model, dataloaders=VAL, verbose=False)  # the same settings run


def test_exclude_given_as_one_pattern_or_one_type(saved):
    assert QuantCallback(exclude="model.fc").exclude == ("model.fc",)
    assert QuantCallback(exclude=torch.nn.Linear).exclude == (torch.nn.Linear,)


def test_a_state_calibrated_with_the_old_default_estimator_names_the_scheme_to_pass(tmp_path):
    """0.1 calibrated PTQ activations with min/max; 0.2's default is mean_minmax. Loading such a state into a default
    callback must say which scheme reloads it (not dump two scheme dicts), and that scheme must load it."""
    old_default = scheme_for_target("x86", activation_observer="minmax")
    trainer = quiet_trainer(tmp_path, [_callback(scheme=old_default)])
    trainer.validate(seeded_lit(), dataloaders=VAL, verbose=False)
    trainer.save_checkpoint(tmp_path / "minmax.ckpt")
    wanted = r"calibrated with the 'minmax' range estimator.*scheme_for_target\('x86', activation_observer='minmax'\)"
    with pytest.raises(CheckpointMismatchError, match=wanted):
        quiet_trainer(tmp_path, [_callback()]).validate(
            seeded_lit(1), dataloaders=VAL, ckpt_path=tmp_path / "minmax.ckpt", verbose=False
        )
    model = seeded_lit(1)
    quiet_trainer(tmp_path, [_callback(scheme=old_default)]).validate(
        model, dataloaders=VAL, ckpt_path=tmp_path / "minmax.ckpt", verbose=False
    )
    saved_state = read_checkpoint(tmp_path / "minmax.ckpt")["state_dict"]
    assert all(torch.equal(v, saved_state[k]) for k, v in model.state_dict().items() if k in saved_state)
