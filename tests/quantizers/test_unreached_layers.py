"""Nothing stays float without saying so: a torch.nn TransformerEncoder model names every float Conv/Linear with its
reason and fix, quantize() warns when most weights stay float, and the model still exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_quant import export_onnx, export_torchscript, quantization_report, quantize
from lightning_quant.quantizers.prepare import prepare_info


class TokenTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tokens)).mean(1))


class TiedHead(nn.Module):
    """A Linear whose weight is read through F.linear and never called."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.conv(x).mean((2, 3)), self.proj.weight)


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = TokenTransformer().eval()
    data = [torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.warns(UserWarning, match=r"9\d% of the model's Conv/Linear weights stay float"):
        qmodel = quantize(model, data, progress=False)
    return model, qmodel, data


def test_every_float_linear_is_named_with_its_reason_and_fix(quantized):
    model, qmodel, data = quantized
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    info = prepare_info(qmodel)
    assert linears == set(info.quantized_layers) | (linears & set(info.float_layers))
    assert "F.multi_head_attention_forward" in info.float_layers["enc.layers.0.self_attn.out_proj"]
    assert "TransformerEncoderLayer 'enc.layers.1'" in info.float_layers["enc.layers.1.linear2"]
    assert "exclude=['enc.layers.1*']" in info.float_layers["enc.layers.1.linear2"]
    text = str(quantization_report(qmodel, data[0]))
    assert all(name in text for name in linears - {"head"})


def test_transformer_model_exports_to_onnx_and_torchscript(quantized, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, qmodel, data = quantized
    export_onnx(qmodel, tmp_path / "m.onnx", data[0])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: data[1].numpy()})[0]
    with torch.no_grad():
        expected = qmodel(data[1]).numpy()
    assert np.abs(out - expected).max() < 0.05 * np.abs(expected).max() + 1e-3
    export_torchscript(qmodel, tmp_path / "m.pt", data[0])
    assert torch.jit.load(str(tmp_path / "m.pt"))(data[1]).shape == (4, 5)


def test_a_linear_used_only_through_its_weight_is_reported():
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    qmodel = quantize(TiedHead().eval(), data, progress=False)
    assert "functional linear call" in prepare_info(qmodel).float_layers["linear"]


def test_excluded_layers_do_not_trigger_the_warning(recwarn):
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 400)).eval()
    quantize(model, data, exclude=["2"], progress=False)
    assert not [w for w in recwarn if "stay float" in str(w.message)]
