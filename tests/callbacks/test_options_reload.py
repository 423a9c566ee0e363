"""Reload equals calibrated: for every option that changes the network or its weights, a network calibrated with
it, saved and reloaded in a fresh process (every load path) gives bit-identical outputs, and a network quantized
another way refuses the file with the option to pass."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant import CheckpointMismatchError, QuantCallback, QuantOptions, quantize, scheme_for_target
from tests.helpers.models import LitClassifier, TinyReLU6Net, quiet_trainer, random_images, warm_bn

REPO = Path(__file__).resolve().parents[2]

# option sets covering every option that changes the network (structure, weights, qparams); scheme overrides
CASES = {
    "replace_relu6": ({"replace_relu6": True}, {}),
    "relu6_cle_bias_correction": (
        {"replace_relu6": True, "cross_layer_equalization": True, "bias_correction": True}, {},
    ),
    "range_search": ({"range_search": True}, {"activation_observer": "percentile"}),
    "adaround": ({"adaround": True, "adaround_per_sample": True}, {"weight_bits": 4}),
    "fast_finetune": ({"fast_finetune": True}, {}),
    "dpu_all": ({"replace_relu6": True, "cross_layer_equalization": True, "bias_correction": True}, "dpu"),
}  # fmt: skip


def _lit() -> LitClassifier:
    torch.manual_seed(0)
    return LitClassifier(warm_bn(TinyReLU6Net()))


def _callback(name: str, **kwargs) -> QuantCallback:
    options, scheme = CASES[name]
    target = scheme if isinstance(scheme, str) else "x86"
    overrides = {} if isinstance(scheme, str) else scheme
    return QuantCallback(
        scheme=scheme_for_target(target, "ptq", **overrides), options=QuantOptions(**options), calibration_batches=2,
        calibration_data=DataLoader(random_images(32, seed=2), batch_size=16), progress=False, report=False, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Each case calibrated once in a Trainer: full and weights-only checkpoints, and the expected outputs."""
    root = tmp_path_factory.mktemp("reload")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    torch.save(x, root / "x.pt")
    val = DataLoader(random_images(16, seed=1), batch_size=16)
    for name in CASES:
        model = _lit()
        trainer = quiet_trainer(root / name, [_callback(name)])
        with pytest.warns() if CASES[name][1] == "dpu" else _nothing():
            trainer.validate(model, dataloaders=val, verbose=False)
        trainer.save_checkpoint(root / f"{name}.ckpt")
        trainer.save_checkpoint(root / f"{name}_weights.ckpt", weights_only=True)
        with torch.no_grad():
            torch.save(model.model.eval()(x), root / f"{name}_expected.pt")
    return root


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_reloaded_network_equals_the_calibrated_one_on_every_load_path(calibrated):
    """Fresh process: load_quantized_checkpoint (full and weights-only files) and Trainer.validate(ckpt_path=...)."""
    script = textwrap.dedent(f"""
        import json, warnings
        import torch
        from torch.utils.data import DataLoader
        from lightning_quant import load_quantized_checkpoint
        from tests.callbacks.test_options_reload import CASES, _callback, _lit
        from tests.helpers.models import quiet_trainer, random_images
        warnings.simplefilter("ignore")
        root = {str(calibrated)!r}
        x = torch.load(root + "/x.pt")
        results = {{}}
        for name in CASES:
            expected = torch.load(f"{{root}}/{{name}}_expected.pt")
            outs = {{}}
            for kind in ("", "_weights"):
                model = load_quantized_checkpoint(_lit(), f"{{root}}/{{name}}{{kind}}.ckpt")
                with torch.no_grad():
                    outs["load_quantized_checkpoint" + kind] = torch.equal(model.model(x), expected)
            for kind in ("", "_weights"):
                model = _lit()
                trainer = quiet_trainer(root + "/fresh", [_callback(name)])
                val = DataLoader(random_images(16, seed=1), batch_size=16)
                trainer.validate(model, dataloaders=val, ckpt_path=f"{{root}}/{{name}}{{kind}}.ckpt", verbose=False)
                with torch.no_grad():
                    outs["validate_ckpt_path" + kind] = torch.equal(model.model.eval()(x), expected)
            results[name] = outs
        print("RESULTS" + json.dumps(results))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS", 1)[1])
    failed = {name: [path for path, same in outs.items() if not same] for name, outs in results.items()}
    assert not any(failed.values()), f"reloaded outputs differ from the calibrated ones: {failed}"


def test_relu6_checkpoint_refuses_a_network_without_the_swap(calibrated):
    """The reported bug: ReLU weights loaded into the ReLU6 network gave outputs off by up to 37, silently."""
    model = _lit()
    callback = QuantCallback(calibration_batches=1, progress=False, report=False)
    val = DataLoader(random_images(16, seed=1), batch_size=16)
    with pytest.raises(CheckpointMismatchError, match=r"replace_relu6.*options=QuantOptions\(replace_relu6=True\)"):
        quiet_trainer(calibrated / "refuse", [callback]).validate(
            model, dataloaders=val, ckpt_path=calibrated / "replace_relu6_weights.ckpt", verbose=False
        )


def test_plain_state_dict_round_trip_of_quantize(calibrated):
    """quantize() output: torch.save(state_dict) and load_state_dict into a network quantized the same way."""
    data = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    options = QuantOptions(replace_relu6=True, cross_layer_equalization=True, bias_correction=True)
    qmodel = quantize(_lit().model, data, options=options, progress=False)
    torch.save(qmodel.state_dict(), calibrated / "plain.pt")
    same = quantize(_lit().model, data[:1], options=QuantOptions(replace_relu6=True, cross_layer_equalization=True),
                    progress=False)  # fmt: skip
    same.load_state_dict(torch.load(calibrated / "plain.pt", weights_only=True))
    x = torch.load(calibrated / "x.pt")
    assert torch.equal(same(x), qmodel(x))
    other = quantize(_lit().model, data[:1], progress=False)
    with pytest.raises(CheckpointMismatchError, match="network transforms"):
        other.load_state_dict(torch.load(calibrated / "plain.pt", weights_only=True))


def test_other_target_is_refused_with_the_target_to_pass(calibrated):
    model = _lit()
    callback = QuantCallback(target="tensorrt", options=QuantOptions(replace_relu6=True), calibration_batches=1,
                             progress=False, report=False)  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="target='x86'.*target='tensorrt'"):
        quiet_trainer(calibrated / "refuse2", [callback]).validate(
            model, dataloaders=DataLoader(random_images(16, seed=1), batch_size=16),
            ckpt_path=calibrated / "replace_relu6.ckpt", verbose=False,
        )  # fmt: skip
