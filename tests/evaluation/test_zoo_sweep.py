"""torchvision zoo sweep: random-weight models through quantize -> ONNX -> onnxruntime, plus the bugs it found.

The whole zoo runs under the ``slow`` marker (``pytest -q -m slow tests/evaluation/test_zoo_sweep.py``, ~6 min);
the default run covers the machinery on one small model and the regressions on tiny stand-ins.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_quant import export_onnx, quantize
from lightning_quant.capture.patterns import is_shape_value
from lightning_quant.evaluation.zoo_sweep import (
    TIMM_SWEEP_MODELS,
    ZOO_SWEEP_MODELS,
    ZooResult,
    build_zoo_model,
    check_zoo_model,
    liven_random_model,
    zoo_table,
)
from lightning_quant.export.verify import load_runner
from lightning_quant.quantizers.prepare import prepare_info

pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")


class TinyViT(nn.Module):
    """Patchify with shape arithmetic (``h // p``), a class token expanded to the batch, a linear head."""

    def __init__(self, patch: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        tokens = self.proj(x).reshape(n, -1, (h // self.patch) * (w // self.patch)).permute(0, 2, 1)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        return self.head(tokens[:, 0] + tokens[:, 1:].mean(dim=1))


def test_shape_arithmetic_gets_no_quantizer():
    """``(h // p) * (w // p)`` is a Python int at run time; a quantizer there failed calibration (vit_b_16)."""
    data = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    qmodel = quantize(TinyViT().eval(), data, progress=False)
    graph = qmodel.graph if hasattr(qmodel, "graph") else None
    assert graph is not None
    shape_nodes = [n.name for n in graph.nodes if is_shape_value(n)]
    assert "mul" in shape_nodes and "floordiv" in shape_nodes
    assert set(prepare_info(qmodel).quantized_layers) == {"proj", "head"}


def test_expanded_class_token_exports_with_dynamic_batch(tmp_path):
    """An example batch > 1 exports without a ``batch != 1`` guard, and the file then runs a batch of 1."""
    data = [torch.randn(3, 3, 16, 16) for _ in range(2)]
    qmodel = quantize(TinyViT().eval(), data, progress=False)
    path = export_onnx(qmodel, tmp_path / "vit.onnx", data[0])
    run = load_runner(path)
    single = data[1][:1]
    np.testing.assert_allclose(run(single), qmodel(single).detach().numpy(), atol=0.05)


def test_liven_random_model_reestimates_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    nn.init.zeros_(model[3].weight)
    batches = [torch.randn(4, 3, 8, 8) * 5 + 2 for _ in range(2)]
    liven_random_model(model, batches)
    assert not model.training
    assert model[3].weight.any(), "a zero-initialized head is redrawn"
    expected_mean = torch.cat([model[0](b) for b in batches]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected_mean.detach(), rtol=1e-4, atol=1e-4)
    assert model(batches[0]).std(dim=0).max() > 0


def test_small_zoo_model_end_to_end():
    result = check_zoo_model("squeezenet1_1", image_size=64, batch_size=2, batches=1)
    assert result.status == "quantized", result.error
    assert result.quantized_layers == result.weight_layers == 26
    assert result.samples == 2 and result.onnx_bytes > 0
    assert result.artefact_sqnr_db is not None and result.quant_sqnr_db is not None


def test_failures_are_recorded_not_raised():
    result = check_zoo_model("resnet5", image_size=32, batch_size=1, batches=1)
    assert result.status == "failed: build"
    assert "unknown torchvision model 'resnet5'" in result.error


def test_table_lists_partial_reasons():
    rows = [
        ZooResult("a", "quantized", 3, 3, 4, samples=8, top1_agreement=1.0, artefact_sqnr_db=30.0, quant_sqnr_db=12.0),
        ZooResult(
            "b",
            "partial",
            2,
            3,
            4,
            {"MultiheadAttention has no INT8 kernel": "12x"},
            samples=8,
            top1_agreement=0.75,
            near_tie_flips=1,
            artefact_sqnr_db=14.0,
            quant_sqnr_db=13.0,
        ),
        ZooResult("c", "failed: export", error="RuntimeError: boom"),
    ]
    table = zoo_table(rows)
    assert "| a | 3/3 | 4 | 100% of 8 | 30.0 / 12.0 | - | quantized | - |" in table
    assert "12x MultiheadAttention has no INT8 kernel" in table and "75% of 8 (1 near-tie)" in table
    assert "failed: export (RuntimeError: boom)" in table


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_SWEEP_MODELS)
def test_zoo_model(name):
    result = check_zoo_model(name)
    assert not result.status.startswith("failed"), f"{result.status}: {result.error}"
    assert result.quantized_layers >= 0.5 * result.weight_layers


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_SWEEP_MODELS)
def test_timm_family(name):
    """One model per timm family: quantize -> ONNX (onnxruntime parity) and TorchScript."""
    pytest.importorskip("timm")
    result = check_zoo_model(name)
    assert not result.status.startswith("failed"), f"{result.status}: {result.error}"
    assert result.torchscript_sqnr_db is not None


def test_timm_models_need_timm_or_say_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError, match="needs timm: pip install timm"):
        build_zoo_model("timm:convnext_atto")
