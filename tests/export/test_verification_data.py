"""export_onnx / export_torchscript verify on held-out batches when given them, not on the example input alone."""

from __future__ import annotations

import pytest
import torch

from lightning_quant import ExportVerificationError, export_onnx, export_torchscript, quantize
from tests.helpers.models import TinyConvBN, random_images, warm_bn


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    data = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return quantize(warm_bn(TinyConvBN()), data, progress=False)


@pytest.mark.parametrize("exporter, suffix", [(export_onnx, ".onnx"), (export_torchscript, ".pt")])
def test_the_gate_runs_on_every_verification_batch(qmodel, tmp_path, exporter, suffix):
    pairs = torch.utils.data.DataLoader(random_images(24, seed=3), batch_size=8)  # (image, label) batches
    path = tmp_path / f"m{suffix}"
    exporter(qmodel, path, torch.randn(1, 3, 16, 16), verification_data=pairs)  # agrees: written
    assert path.is_file()
    before = path.read_bytes()
    with pytest.raises(ExportVerificationError, match=r"on 24 samples.*Nothing was written"):  # 3 batches x 8 images
        exporter(qmodel, path, torch.randn(1, 3, 16, 16), verification_data=pairs, min_top1_agreement=1.01)
    assert path.read_bytes() == before  # a failed gate leaves the earlier file as it was


def test_empty_verification_data_is_an_error(qmodel, tmp_path):
    with pytest.raises(ValueError, match="verification_data yielded no batch"):
        export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), verification_data=[])
