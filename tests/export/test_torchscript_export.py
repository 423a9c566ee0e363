"""TorchScript export: plain ``torch.jit.load`` in a process without lightning_quant, int8 weights, parity."""

from __future__ import annotations

import pytest
import torch

from lightning_quant import export_torchscript, quantize, verify_export
from lightning_quant.config import scheme_for_target
from tests.export.utils import fake_quant_output, load_torchscript_elsewhere
from tests.helpers.models import TinyConvBN, warm_bn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def loaded_elsewhere(tiny_torchscript, eval_batches, tmp_path_factory):
    """Output and facts from loading the file in a fresh interpreter where lightning_quant cannot be imported."""
    return load_torchscript_elsewhere(tiny_torchscript.path, (eval_batches[0],), tmp_path_factory.mktemp("plain"))


def test_loads_without_lightning_quant_in_a_subprocess_and_matches(loaded_elsewhere, tiny_torchscript, eval_batches):
    out, facts = loaded_elsewhere
    assert facts["import_refused"] is True  # the guard works: lightning_quant was not importable there
    assert facts["lightning_quant_loaded"] is False
    assert facts["repo_on_sys_path"] is False
    expected = torch.from_numpy(fake_quant_output(tiny_torchscript.qmodel, eval_batches[0]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_weights_are_stored_as_int8_with_scales(loaded_elsewhere, tiny_torchscript):
    _, facts = loaded_elsewhere
    # conv1 (8x3x3x3) + conv2 (8x8x3x3) + fc (10x8) weights, all int8; no float weight matrix left
    assert facts["int8_elements"] == 8 * 3 * 9 + 8 * 8 * 9 + 10 * 8
    assert facts["float_weight_elements"] == 0
    loaded = torch.jit.load(str(tiny_torchscript.path))
    scales = {name: b for name, b in loaded.named_buffers() if name.endswith("weight_scale")}
    assert {tuple(b.shape) for b in scales.values()} == {(8,), (10,)} and len(scales) == 3


@pytest.mark.parametrize("batch", [1, 5])
def test_any_batch_size_runs_and_matches(tiny_torchscript, eval_batches, batch):
    loaded = torch.jit.load(str(tiny_torchscript.path))
    x = eval_batches[1][:batch]
    with torch.inference_mode():
        got = loaded(x)
    torch.testing.assert_close(got, torch.from_numpy(fake_quant_output(tiny_torchscript.qmodel, x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pth", ".torchscript"])
def test_other_suffixes_export_and_verify(tiny_torchscript, calib_batches, tmp_path, suffix):
    path = export_torchscript(tiny_torchscript.qmodel, tmp_path / f"model{suffix}", calib_batches[0][:2])
    assert path.suffix == suffix and path.is_file()


def test_four_bit_weights_export_to_torchscript(tmp_path, calib_batches, eval_batches):
    """TorchScript is the format for sub-8-bit schemes (ONNX refuses them, see test_bad_inputs)."""
    torch.manual_seed(6)
    scheme = scheme_for_target("x86", weight_bits=4, activation_bits=6)
    qmodel = quantize(warm_bn(TinyConvBN()), calib_batches, scheme=scheme, progress=False)
    path = export_torchscript(qmodel, tmp_path / "w4a6.pt", calib_batches[0][:2])
    loaded = torch.jit.load(str(path))
    codes = torch.cat([b.flatten().float() for n, b in loaded.named_buffers() if n.endswith("weight_int8")])
    assert codes.abs().max() <= 7  # 4-bit symmetric narrow range codes, stored in int8 containers
    assert verify_export(qmodel, path, eval_batches, latency_runs=0).max_abs_diff < 1e-5


def test_export_and_verify_do_not_repeat_torch_jit_deprecation_notices(tmp_path, calib_batches):
    import warnings

    qmodel = quantize(warm_bn(TinyConvBN()), calib_batches, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # any torch.jit.* deprecation notice would raise here
        path = export_torchscript(qmodel, tmp_path / "m.pt", calib_batches[0])
        verify_export(qmodel, path, calib_batches[:1])
