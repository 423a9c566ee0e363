"""calibrate(): errors that are not about the batch keep their type; degenerate ranges warn; exclude= takes types."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_quant import prepare, quantize, scheme_for_target
from lightning_quant.calibration import calibrate, is_input_error
from lightning_quant.quantizers import prepare_info
from tests.helpers.models import TinyConvBN, warm_bn

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Raising(nn.Module):
    """A conv whose forward raises ``error`` (an out-of-memory, the model's own bug...)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.error = error

    def forward(self, x):
        self.conv(x)
        raise self.error


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


def test_out_of_memory_is_raised_as_itself(tmp_path):
    # before: ValueError: calibration batch 0 could not be fed to the model ... Make transform_fn return ...
    model = Raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory") as caught:
        quantize(model, [X], progress=False)
    assert "calibration batch 0" in "".join(getattr(caught.value, "__notes__", ["calibration batch 0"]))


@pytest.mark.parametrize(
    "error",
    [RuntimeError("the lookup table was never loaded"), RuntimeError("CUDA error: an illegal memory access")],
    ids=["model-bug", "cuda"],
)
def test_errors_unrelated_to_the_batch_are_raised_as_themselves(error):
    with pytest.raises(RuntimeError, match=str(error)) as caught:
        quantize(Raising(error), [X], progress=False)
    assert caught.type is RuntimeError  # not the ValueError blaming transform_fn


def test_batch_mismatches_still_name_transform_fn(tiny):
    with pytest.raises(ValueError, match=r"calibration batch 0 could not be fed .*expected input.*Make transform_fn"):
        quantize(tiny, [torch.randn(2, 5, 16, 16)], progress=False)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TypeError("forward() takes 2 positional arguments but 3 were given"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"), True),
        (RuntimeError("Input type (double) and bias type (float) should be the same"), True),
        (RuntimeError("Expected all tensors to be on the same device"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (size 3)"), False),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), False),
        (RuntimeError("CUDA error: device-side assert triggered (shape)"), False),
        (RuntimeError("the lookup table was never loaded"), False),
        (KeyError("size"), False),
    ],
)
def test_is_input_error(error, expected):
    assert is_input_error(error) is expected


def test_all_zero_calibration_data_warns_about_the_degenerate_range(tiny):
    # before: silent; every activation scale a placeholder
    zeros = [torch.zeros(4, 3, 16, 16)] * 2
    expected = r"quantizer\(s\) observed a range of zero width during calibration: activation_quantizers\.x "
    with pytest.warns(UserWarning, match=expected + r"\(every value 0\).*probably all zeros or constant"):
        quantize(tiny, zeros, progress=False)


def test_real_calibration_data_does_not_warn(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(prepare(tiny, scheme_for_target("x86")), [X, X * 2], progress=False)


def test_sharded_calibration_warns_once_the_ranges_are_merged(tiny):
    from lightning_quant.distributed import sync_quantizers

    model = prepare(tiny, scheme_for_target("x86"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(model, [torch.zeros(4, 3, 16, 16)], progress=False, shard=True)  # estimates left to the merge
    with pytest.warns(UserWarning, match=r"range of zero width .*activation_quantizers\.x"):
        sync_quantizers(model)


def test_exclude_takes_module_types(tiny):
    # before: TypeError: object of type 'type' has no len()
    data = [X, X * 2]
    qmodel = quantize(tiny, data, exclude=[nn.Linear], progress=False)
    info = prepare_info(qmodel)
    assert "fc" in info.float_layers and "fc" not in info.quantized_layers and info.quantized_layers
    mixed = prepare(tiny, scheme_for_target("x86"), exclude=["conv1", nn.Linear])
    assert set(prepare_info(mixed).float_layers) >= {"conv1", "fc"}
    single = prepare(tiny, scheme_for_target("x86"), exclude=nn.Linear)  # one type counts as a list of one
    assert "fc" in prepare_info(single).float_layers


@pytest.mark.parametrize(
    ("exclude", "expected"),
    [
        ([nn.Linear(2, 2)], r"got an instance of Linear \(pass the type, exclude=\[Linear\]\)"),
        ([3], r"got 3 \(int\); pass e\.g\. exclude=\['classifier\.\*', nn\.Linear\]"),
        ([int], r"got <class 'int'> \(type\)"),
    ],
    ids=["instance", "int", "non-module-type"],
)
def test_bad_exclude_entries_are_named(tiny, exclude, expected):
    with pytest.raises(TypeError, match=expected):
        prepare(tiny, scheme_for_target("x86"), exclude=exclude)


def test_qat_exclude_by_type_keeps_conv_bn_pairs_float(tiny):
    qat = prepare(tiny, scheme_for_target("x86", "qat"), mode="qat", exclude=[nn.Conv2d])
    assert not any(name.startswith("conv") for name in prepare_info(qat).quantized_layers)


def test_progress_bar_counts_the_batches_that_exist(monkeypatch):
    """The bar showed /16 where 4 batches existed."""
    import lightning_quant.calibration as calibration_module

    totals = []
    real = calibration_module.tqdm

    def recording(*args, **kwargs):
        totals.append(kwargs.get("total"))
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration_module, "tqdm", recording)
    qmodel = prepare(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), scheme_for_target("x86"))
    seen = calibrate(qmodel, [torch.randn(2, 3, 8, 8) for _ in range(4)], num_batches=16, progress=False)
    assert seen == 4 and totals == [4]
