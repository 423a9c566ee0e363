"""Graph capture ladder: plain tracing, specialized keyword constants, and per-submodule fallback."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from lightning_quant import quantize
from lightning_quant.capture.trace import capture, explain_trace_error
from lightning_quant.config import scheme_for_target
from lightning_quant.quantizers import iter_quantizers, prepare, prepare_info
from lightning_quant.quantizers.functional import sqnr_db
from lightning_quant.quantizers.modules import QuantConv2d, QuantLinear
from tests.helpers.models import TwoInputNet, UntraceableNet, warm_bn


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class IterRows(nn.Module):
    def forward(self, x):
        return sum(row for row in x)


class UsesLen(nn.Module):
    def forward(self, x):
        return x * len(x)


class ConfigKwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, mode: str = "scale", k: int = 2):
        if mode == "scale":
            return self.conv(x) * k
        return x


def test_capture_traceable_module():
    gm, reason = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert isinstance(gm, fx.GraphModule) and reason is None


@pytest.mark.parametrize(
    "module, needle",
    [
        (Branchy(), "data-dependent Python control flow"),
        (IterRows(), "iteration over a tensor"),
        (UsesLen(), "len() of a tensor"),
    ],
    ids=["control_flow", "iteration", "len"],
)
def test_capture_failure_reasons_have_hints(module, needle):
    gm, reason = capture(module)
    assert gm is None
    assert needle in reason
    assert "Error" in reason  # the original exception type is kept for reference


def test_explain_unknown_error_keeps_type_and_first_line():
    assert explain_trace_error(ValueError("boom\nsecond line")) == "ValueError: boom"
    assert explain_trace_error(RuntimeError("")) == "RuntimeError: RuntimeError"


def test_keyword_constants_are_specialized_and_guarded():
    model = ConfigKwargs().eval()
    gm, reason = capture(model)
    assert reason is None and isinstance(gm, fx.GraphModule)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(x, mode="scale", k=2), model(x))  # keyword names kept
    with pytest.raises(AssertionError, match="mode has been specialized"):
        gm(x, mode="identity")
    with pytest.raises(AssertionError, match="k has been specialized"):
        gm(x, k=3)


def test_two_input_net_traces_with_flag_specialized():
    gm, reason = capture(TwoInputNet())
    assert reason is None
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["rgb", "depth", "use_depth"]


# --- prepare() fallback on an untraceable model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def untraceable():
    torch.manual_seed(0)
    model = warm_bn(UntraceableNet())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 16, 16, generator=g) * 2 + 0.5 for _ in range(4)]
    return model, data


def test_untraceable_model_prepare_info(untraceable):
    model, _ = untraceable
    info = prepare_info(prepare(model, scheme_for_target("x86")))
    assert set(info.untraced) == {"<model>", "block"}
    assert all("control flow" in reason for reason in info.untraced.values())
    assert info.traced == ["stem", "head"]
    assert info.module_level == ["block.conv"]
    assert info.quantized_layers == ["stem.0", "block.conv", "head.2"]
    assert info.folded_bn == ["stem.1"]


def test_untraceable_model_quantized_layers_and_accuracy(untraceable):
    model, data = untraceable
    qmodel = quantize(model, data, progress=False)
    assert isinstance(qmodel.block.conv, QuantConv2d) and qmodel.block.conv.input_fake_quant is not None
    assert isinstance(qmodel.stem, fx.GraphModule) and isinstance(qmodel.head, fx.GraphModule)
    assert isinstance(qmodel.head.get_submodule("2"), QuantLinear)
    assert type(qmodel.block).__name__ == "DataDependentBlock"  # the untraceable code itself still runs
    assert all(fq.calibrated.item() for _, fq in iter_quantizers(qmodel))
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 + 0.5
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert not torch.equal(ref, out)
    assert sqnr_db(ref, out) > 20.0
