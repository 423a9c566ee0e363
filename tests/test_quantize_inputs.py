"""Sharp edges of quantize()'s model argument: a model in training mode, a model on the meta device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import quantize
from tests.helpers.models import TinyConvBN, warm_bn


def _data():
    return [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


def test_train_mode_model_warns_and_comes_back_in_eval_mode():
    model = _model().train()
    with pytest.warns(UserWarning, match=r"training mode.*call model.eval\(\) before quantize"):
        qmodel = quantize(model, _data(), progress=False)
    assert not qmodel.training and not any(m.training for m in qmodel.modules())
    assert model.training  # the input model is left as it was
    reference = quantize(_model().eval(), _data(), progress=False)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(qmodel(x), reference(x))  # calibrated exactly as the eval-mode model


def test_meta_device_model_gets_its_own_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        quantize(model.eval(), _data(), progress=False)


def test_not_a_module():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        quantize(lambda x: x, _data(), progress=False)
