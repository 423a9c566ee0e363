"""Selecting the estimators by name: QuantSpec, scheme_for_target, FakeQuantize and quantize() on a tiny model."""

from __future__ import annotations

import pytest
import torch

from lightning_quant import quantize
from lightning_quant.algorithms import EntropyObserver, MSEObserver, PercentileObserver
from lightning_quant.config import QuantSpec, scheme_for_target
from lightning_quant.quantizers import FakeQuantize, iter_quantizers, observer_names
from lightning_quant.quantizers.functional import sqnr_db
from tests.helpers.models import TinyConvBN, warm_bn

CLASSES = {"percentile": PercentileObserver, "mse": MSEObserver, "entropy": EntropyObserver}


def test_names_registered_after_the_builtins():
    names = observer_names()
    assert names[:2] == ["minmax", "moving_average"] and set(CLASSES) <= set(names)


@pytest.mark.parametrize("name", list(CLASSES))
def test_scheme_for_target_selects_by_name(name):
    scheme = scheme_for_target("x86", activation_observer=name, weight_observer=name)
    assert scheme.activation.observer == name
    fq = FakeQuantize(scheme.activation, name="act")
    assert isinstance(fq.observer, CLASSES[name])
    out = fq(torch.randn(64) * 3)
    assert fq.calibrated.item() and out.shape == (64,)


@pytest.fixture(scope="module")
def tiny_and_data():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 16, 16, generator=g) * 2 + 0.5, torch.zeros(8)) for _ in range(3)]
    return warm_bn(TinyConvBN()), data


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("target", ["x86", "tensorrt", "dpu"])
def test_quantize_with_each_estimator(tiny_and_data, name, target):
    model, data = tiny_and_data
    scheme = scheme_for_target(target, activation_observer=name, weight_observer=name)
    qmodel = quantize(model, data, scheme=scheme, progress=False)
    acts = [fq for n, fq in iter_quantizers(qmodel) if n.startswith("activation_quantizers")]
    assert acts and all(isinstance(fq.observer, CLASSES[name]) for fq in acts)
    x = data[0][0]
    with torch.no_grad():
        # KL on the 10-logit output (a few hundred values) clips hard, as TensorRT's calibrator does
        assert sqnr_db(model(x), qmodel(x)) > (8 if name == "entropy" else 15)


def test_quantize_is_deterministic_with_histograms(tiny_and_data):
    model, data = tiny_and_data
    scheme = scheme_for_target("x86", activation_observer="entropy")
    a, b = (quantize(model, data, scheme=scheme, progress=False) for _ in range(2))
    for (name, fa), (_, fb) in zip(iter_quantizers(a), iter_quantizers(b), strict=True):
        assert torch.equal(fa.scale, fb.scale) and torch.equal(fa.zero_point, fb.zero_point), name


def test_unknown_name_lists_the_estimators():
    with pytest.raises(
        ValueError, match=r"observer='kl' is not registered; use one of 'minmax', 'moving_average', .*'percentile'"
    ):
        QuantSpec(observer="kl")
