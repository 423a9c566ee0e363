"""Determinism: the same seed gives bit-identical qparams and identical artefacts, run to run.

ONNX files are byte-identical. TorchScript files are byte-identical between fresh processes (the slow test below
runs two); inside one process they cannot be, by TorchScript's design: every class compiled into the process-wide
compilation unit under a name already taken gets a new ``___torch_mangle_<n>`` suffix from a global counter, so
a second export of the same model names its classes (file paths, pickled type names) differently. The in-process
test therefore compares what the file means: its archive layout and tensor records, the loaded module's state,
code (mangle suffixes removed) and outputs.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import QATSchedule, QuantCallback, QuantOptions, export_onnx, export_torchscript, quantize
from lightning_quant.config import scheme_for_target
from tests.helpers.models import LitClassifier, TinyConvBN, TinyDataModule, quiet_trainer, warm_bn
from tests.robustness.random_nets import NetPlan, build

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parents[2]
# every block kind once: conv+BN+ReLU6, depthwise+hardswish, residual add, concat, both poolings, two linear layers
PLAN = NetPlan(
    channels=3,
    height=12,
    width=12,
    blocks=(
        ("conv", 8, 3, 1, "relu6", True),
        ("depthwise", 8, 3, 2, "hardswish", True),
        ("residual", 8, 3, 1, "relu", True),
        ("concat", 4, 1, 1, "relu", False),
        ("maxpool", 0, 1, 1, "none", False),
        ("avgpool", 0, 1, 1, "none", False),
    ),
    head="flatten",
    hidden=6,
    classes=4,
)


def _loader(seed: int) -> DataLoader:
    """Shuffled calibration loader: the order comes from its own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(48, 3, 12, 12, generator=g) * 1.5 + 0.25
    labels = torch.randint(0, 4, (48,), generator=g)
    return DataLoader(
        TensorDataset(images, labels), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def _quantized(
    seed: int, target: str = "x86", overrides: dict | None = None, options: QuantOptions | None = None
) -> torch.nn.Module:
    scheme = scheme_for_target(target, **(overrides or {}))
    return quantize(build(PLAN, seed), _loader(seed), scheme=scheme, options=options, num_batches=4, progress=False)


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("target", "settings"),
    [
        ("x86", {}),
        ("x86_vnni", {"overrides": {"activation_observer": "mse"}}),
        ("tensorrt", {"overrides": {"activation_observer": "percentile", "weight_granularity": "per_tensor"}}),
        ("tensorrt", {"overrides": {"activation_observer": "entropy"}}),
        ("dpu", {}),
        ("x86", {"options": QuantOptions(cross_layer_equalization=True, bias_correction=True, fast_finetune=True)}),
    ],
    ids=["x86_minmax", "vnni_mse", "trt_percentile", "trt_entropy", "dpu", "x86_cle_bc_adaquant"],
)
def test_same_seed_gives_bit_identical_qparams(target, settings):
    first = _quantized(3, target, **settings).state_dict()
    again = _quantized(3, target, **settings).state_dict()
    assert any(k.endswith("weight_fake_quant.scale") for k in first)
    _assert_bit_identical(first, again)


def test_another_seed_changes_the_qparams():
    """The comparison above is sensitive: another seed (weights, data, order) gives other scales."""
    a, b = _quantized(3).state_dict(), _quantized(4).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".scale"))


def test_same_seed_qat_run_gives_bit_identical_qparams(tmp_path):
    """QAT in a Trainer (shuffled batches, moving-average observers, BN freeze): same seed, same state."""

    class Shuffled(TinyDataModule):
        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def run() -> dict[str, torch.Tensor]:
        pl.seed_everything(11, verbose=False)
        model = LitClassifier(warm_bn(TinyConvBN()))
        callback = QuantCallback(
            mode="qat",
            calibration_batches=1,
            progress=False,
            report=False,
            qat_schedule=QATSchedule(freeze_observer_epoch=1, freeze_bn_epoch=1),
        )
        trainer = quiet_trainer(tmp_path, [callback], max_epochs=2, enable_checkpointing=False, deterministic=True)
        trainer.fit(model, datamodule=Shuffled())
        assert trainer.global_step == 8  # 2 epochs x 4 batches of QAT really ran
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, again = run(), run()
    assert any("activation_quantizers" in k for k in first)
    _assert_bit_identical(first, again)


def test_export_leaves_the_process_thread_count_alone(tmp_path):
    """The verification gate runs at 2 threads; it used to leave torch at 2 threads for the rest of the process, so
    a calibration after an export computed activation ranges with another summation order (scales one float ulp
    apart, hence ONNX files differing from those of a fresh process) and training slowed to 2 threads."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        qmodel = _quantized(5)
        export_onnx(qmodel, tmp_path / "m.onnx", PLAN.example(2, seed=0))
        export_torchscript(qmodel, tmp_path / "m.pt", PLAN.example(2, seed=0))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_onnx_export_is_byte_identical(tmp_path):
    example = PLAN.example(2, seed=0)
    a = export_onnx(_quantized(5), tmp_path / "a" / "model.onnx", example).read_bytes()
    b = export_onnx(_quantized(5), tmp_path / "b" / "model.onnx", example).read_bytes()
    renamed = export_onnx(_quantized(5), tmp_path / "other_name.onnx", example).read_bytes()
    assert a == b == renamed  # no path, file name or timestamp inside


_MANGLE = re.compile(r"\.?___torch_mangle_\d+")


def _code(module: torch.jit.ScriptModule) -> str:
    """TorchScript source of a module's forward ('' for containers without one)."""
    try:
        return module.code
    except (AttributeError, RuntimeError):
        return ""


def test_torchscript_export_has_identical_content_in_one_process(tmp_path):
    example = PLAN.example(2, seed=0)
    paths = [export_torchscript(_quantized(5), tmp_path / run / "model.pt", example) for run in ("a", "b")]
    archives = [zipfile.ZipFile(path) for path in paths]
    # the archive's top folder is named after the file, never after the temporary file it was written as
    assert [{name.split("/")[0] for name in z.namelist()} for z in archives] == [{"model"}, {"model"}]
    records = [sorted(z.read(n) for n in z.namelist() if re.fullmatch(r"model/data/\d+", n)) for z in archives]
    assert records[0] == records[1] and len(records[0]) > 0  # every tensor, byte for byte
    modules = [torch.jit.load(str(path)) for path in paths]
    _assert_bit_identical(modules[0].state_dict(), modules[1].state_dict())
    codes = [{name: _MANGLE.sub("", _code(m)) for name, m in module.named_modules()} for module in modules]
    assert codes[0] == codes[1] and "qdq" not in codes[0][""]  # plain torch ops, no custom ones
    with torch.inference_mode():
        assert torch.equal(modules[0](example), modules[1](example))


_RUN = textwrap.dedent(
    """
    import sys, warnings
    from pathlib import Path
    import torch
    warnings.simplefilter("ignore")
    from lightning_quant import export_onnx, export_torchscript
    from tests.robustness.test_determinism import PLAN, _quantized

    out = Path(sys.argv[1])
    qmodel = _quantized(5)
    torch.save(qmodel.state_dict(), out / "state.pt")
    export_onnx(qmodel, out / "model.onnx", PLAN.example(2, seed=0))
    export_torchscript(qmodel, out / "model.pt", PLAN.example(2, seed=0))
    """
)


@pytest.mark.slow
def test_fresh_processes_write_byte_identical_artefacts(tmp_path):
    """Run to run, as a CI job or a colleague would: qparams, ONNX and TorchScript files all byte-identical.
    (Before, the TorchScript zip named its top folder after a random temporary file name.)"""
    outs = [tmp_path / "run1", tmp_path / "run2"]
    runs = []
    for out in outs:
        out.mkdir()
        runs.append(subprocess.Popen([sys.executable, "-c", _RUN, str(out)], cwd=REPO, stderr=subprocess.PIPE))
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr.decode()[-3000:]
    _assert_bit_identical(*(torch.load(out / "state.pt") for out in outs))
    for name in ("model.onnx", "model.pt"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert io.BytesIO((outs[0] / "model.pt").read_bytes()).getbuffer().nbytes > 0
