"""What an app run writes never lies or collides: run names stay inside their folders, mode=calib keeps another
run's state file unless told otherwise, metrics.json is replaced whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_quant.app import compose_config, train
from tests.app.conftest import needs_shared, tiny_config


@pytest.mark.parametrize("name", ["../escaped", "runs/v2", "..", "a..b", r"a\b"])
def test_name_cannot_escape_its_folder(tmp_path, name):
    # before: name=../escaped wrote the state file to <state_dir>/../escaped.ckpt
    cfg = compose_config(["recipe=resnet20_ptq_cifar10", f"paths.output_dir={tmp_path}"])
    cfg.name = name  # set after composing: Hydra's override grammar would need quoting for some of these
    with pytest.raises(ValueError, match=r"must be a plain run name \(no '/', '\\' or '\.\.'\).*name=resnet20_ptq_v2"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_overwrite_state_is_in_the_config():
    assert compose_config([]).overwrite_state is False
    assert compose_config(["overwrite_state=true"]).overwrite_state is True


def test_calib_refuses_to_replace_another_runs_state_file(tmp_path):
    state = tmp_path / "state" / "resnet20_ptq_cifar10.ckpt"
    state.parent.mkdir()
    state.write_bytes(b"another run's calibration")
    cfg = compose_config(["recipe=resnet20_ptq_cifar10", "mode=calib", f"paths.state_dir={state.parent}",
                          f"paths.output_dir={tmp_path / 'run'}"])  # fmt: skip
    expected = r"state file .*resnet20_ptq_cifar10\.ckpt' already exists .*Pass overwrite_state=true to replace it"
    with pytest.raises(FileExistsError, match=expected + r", or write elsewhere with name="):
        train(cfg)
    assert state.read_bytes() == b"another run's calibration" and not (tmp_path / "run").exists()


@needs_shared
def test_calib_replaces_the_state_file_with_overwrite_state(tmp_path):
    state = tmp_path / "state" / "resnet20_ptq_cifar10.ckpt"
    state.parent.mkdir()
    state.write_bytes(b"another run's calibration")
    metrics = train(tiny_config("resnet20_ptq_cifar10", tmp_path, "mode=calib", "overwrite_state=true"))
    assert metrics["state_file"] == str(state) and state.read_bytes() != b"another run's calibration"


@needs_shared
def test_metrics_json_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) leaves the earlier metrics.json whole and no partial file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"earlier": true}\n')
    real_write_text = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        if self.name == "metrics.json":
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device (simulated)")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        train(tiny_config("resnet20_ptq_cifar10", tmp_path, "mode=float"))
    assert json.loads((run / "metrics.json").read_text()) == {"earlier": True}
    assert not [p.name for p in run.iterdir() if "partial" in p.name]
