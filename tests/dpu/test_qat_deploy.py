"""DPU QAT through the Trainer: the trained network evaluates as it deploys, and its exports pass their gates.

On the DPU a folded conv+BN carries an 8-bit bias. QAT used to keep that bias in float until ``convert()``, so
the network a user evaluated was not the one that exported, and ``export_torchscript`` (which verifies the file
against the network it is given) failed on a trained MobileNetV2 (max |diff| 8.5)."""

from __future__ import annotations

import numpy as np
import torch

from lightning_quant import QuantCallback
from lightning_quant.config import QATSchedule
from lightning_quant.export import export_torchscript, export_xmodel
from lightning_quant.export.xmodel_interpreter import run_xmodel
from lightning_quant.quantizers import convert
from lightning_quant.quantizers.dpu_shifts import enforce_dpu_shifts
from lightning_quant.quantizers.modules import QuantConvBn
from tests.helpers.models import TinyDataModule, quiet_trainer, seeded_lit


def _trained_dpu_qat(tmp_path):
    lit = seeded_lit(0)
    callback = QuantCallback(mode="qat", target="dpu", qat_schedule=QATSchedule(freeze_observer_step=3))
    quiet_trainer(tmp_path, [callback], max_epochs=2, limit_val_batches=0).fit(lit, datamodule=TinyDataModule())
    return lit.model.eval()


def test_a_dpu_qat_network_evaluates_as_it_deploys(tmp_path):
    network = _trained_dpu_qat(tmp_path)
    layers = [m for m in network.modules() if isinstance(m, QuantConvBn)]
    assert layers and all(m.bias_fake_quant is not None and m.bias_fake_quant.calibrated.item() for m in layers)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        torch.testing.assert_close(network(x), convert(network)(x), rtol=0, atol=1e-5)


def test_dpu_qat_exports_pass_their_gates_and_run_bit_exactly(tmp_path):
    network = _trained_dpu_qat(tmp_path)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2
    held_out = [(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(s)), None) for s in (5, 6)]
    path = export_torchscript(network, tmp_path / "qat.pt", x, verification_data=held_out, transform_fn=lambda b: b[0])
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path))(x), network(x), rtol=0, atol=1e-5)
    xmodel = export_xmodel(network, tmp_path / "qat.xmodel", x[:1])
    deployed = convert(network)
    enforce_dpu_shifts(deployed)  # what export_xmodel does before writing (a no-op unless a shift limit is broken)
    (out,) = run_xmodel(xmodel, x.numpy())
    with torch.no_grad():
        assert np.array_equal(out, deployed(x).numpy())
