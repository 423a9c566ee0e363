"""quantize()/convert() end to end: input conventions, error messages, QAT conversion, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_quant import NotCalibratedError, NothingToQuantizeError, convert, prepare, quantize
from lightning_quant.calibration import calibrate
from lightning_quant.config import QuantOptions, scheme_for_target
from lightning_quant.quantizers import FakeQuantize, iter_quantizers, prepare_info, set_observers
from lightning_quant.quantizers.functional import sqnr_db
from lightning_quant.quantizers.modules import QuantConv2d, QuantConvBn, QuantLinear
from tests.helpers.models import DictInputNet, EmptyDataset, TinyConvBN, TwoInputNet, random_images, warm_bn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return warm_bn(TinyConvBN())


@pytest.fixture(scope="module")
def image_batches():
    g = _gen(1)
    return [(torch.randn(8, 3, 16, 16, generator=g) * 2 + 0.5, torch.zeros(8)) for _ in range(4)]


def test_quantize_leaves_input_model_untouched(tiny, image_batches):
    before = copy.deepcopy(tiny.state_dict())
    qmodel = quantize(tiny, image_batches, progress=False)
    assert qmodel is not tiny
    assert not any(isinstance(m, FakeQuantize) for m in tiny.modules())
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert not qmodel.training and all(fq.calibrated.item() for _, fq in iter_quantizers(qmodel))
    assert all(not fq.observer_enabled.item() and fq.fake_quant_enabled.item() for _, fq in iter_quantizers(qmodel))
    x = torch.randn(4, 3, 16, 16, generator=_gen(2)) * 2 + 0.5
    with torch.no_grad():
        ref, out = tiny(x), qmodel(x)
    assert not torch.equal(ref, out)
    assert sqnr_db(ref, out) > 25


def test_quantize_dataloader_default_transform_and_num_batches(tiny):
    loader = DataLoader(random_images(40, seed=3), batch_size=8)
    scheme = scheme_for_target("x86", activation_observer="minmax")  # the range of what was seen, exactly
    qmodel = prepare(tiny, scheme)
    assert calibrate(qmodel, loader, num_batches=2, progress=False) == 2
    assert calibrate(prepare(tiny, scheme), loader, progress=False) == 5
    # only the first two batches were seen: the input range equals theirs
    seen = torch.cat([b[0] for _, b in zip(range(2), loader, strict=False)])
    fq = qmodel.get_submodule("activation_quantizers.x")
    assert fq.observer.min_val.item() == seen.min().item()
    assert fq.observer.max_val.item() == seen.max().item()


def test_quantize_with_explicit_scheme_and_target(tiny, image_batches):
    dpu = quantize(tiny, image_batches, target="dpu", progress=False)
    for _, fq in iter_quantizers(dpu):
        exponent = torch.log2(fq.scale)
        assert torch.equal(exponent, exponent.round())  # power-of-two scales
    scheme = scheme_for_target("tensorrt", weight_bits=4)
    trt = quantize(tiny, image_batches, scheme=scheme, progress=False)
    assert prepare_info(trt).scheme is scheme
    assert trt.get_submodule("conv1").weight_fake_quant.spec.bits == 4


# --- multi-input / kwargs / dict models --------------------------------------------------------------------------


def _two_input_batches(n: int = 3):
    g = _gen(4)
    return [
        (torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g), torch.zeros(2)) for _ in range(n)
    ]


def test_two_input_net_positional_transform():
    torch.manual_seed(0)
    model = TwoInputNet().eval()
    data = _two_input_batches()
    qmodel = quantize(model, data, transform_fn=lambda b: (b[0], b[1]), progress=False)
    assert prepare_info(qmodel).quantized_layers == ["a", "b", "head"]
    assert {"activation_quantizers.rgb", "activation_quantizers.depth"} <= {n for n, _ in iter_quantizers(qmodel)}
    rgb, depth, _ = data[0]
    with torch.no_grad():
        ref = model(rgb, depth)
        assert sqnr_db(ref, qmodel(rgb, depth)) > 25
        torch.testing.assert_close(qmodel(rgb, depth, use_depth=True), qmodel(rgb, depth))
        torch.testing.assert_close(qmodel(rgb=rgb, depth=depth), qmodel(rgb, depth))


def test_two_input_net_keyword_transform():
    torch.manual_seed(0)
    model = TwoInputNet().eval()
    data = _two_input_batches()
    qmodel = quantize(
        model, data, transform_fn=lambda b: {"rgb": b[0], "depth": b[1], "use_depth": True}, progress=False
    )
    rgb, depth, _ = data[0]
    with torch.no_grad():
        assert sqnr_db(model(rgb, depth), qmodel(rgb=rgb, depth=depth)) > 25


def test_two_input_net_specialized_flag_cannot_be_changed():
    torch.manual_seed(0)
    model = TwoInputNet().eval()
    data = _two_input_batches()
    qmodel = quantize(model, data, transform_fn=lambda b: b[:2], progress=False)
    rgb, depth, _ = data[0]
    with pytest.raises(AssertionError, match="use_depth has been specialized to have value True"):
        qmodel(rgb, depth, use_depth=False)
    with pytest.raises(AssertionError, match="use_depth has been specialized"):
        qmodel(rgb, depth, False)


def test_dict_input_net():
    torch.manual_seed(0)
    model = DictInputNet().eval()
    g = _gen(5)
    data = [
        ({"image": torch.randn(2, 3, 8, 8, generator=g), "extra": torch.randn(2, 2, generator=g)}, 0) for _ in range(3)
    ]
    # the dict is one positional argument, so wrap it in a tuple
    qmodel = quantize(model, data, transform_fn=lambda item: (item[0],), progress=False)
    assert prepare_info(qmodel).quantized_layers == ["conv", "fc"]
    batch = data[0][0]
    with torch.no_grad():
        assert sqnr_db(model(batch), qmodel(batch)) > 25
    # without the tuple the dict is spread as keyword arguments: the error explains what the model received
    received = r"The model received \{'image': Tensor\(shape=\(2, 3, 8, 8\).*dict as keyword"
    with pytest.raises(ValueError, match=received):
        quantize(model, data, progress=False)


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU()), nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)), nn.ReLU()],
    ids=["relu_seq", "no_weights", "leaf"],
)
def test_nothing_to_quantize(model):
    with pytest.raises(NothingToQuantizeError, match="nothing to quantize in .*no Conv/Linear layers"):
        quantize(model, [torch.randn(2, 4)], progress=False)


def test_exclude_everything_is_nothing_to_quantize(tiny, image_batches):
    with pytest.raises(NothingToQuantizeError, match=r"conv1: excluded \(exclude=.*check `exclude=` patterns"):
        quantize(tiny, image_batches, exclude=["*"], progress=False)


def test_exclude_does_not_need_matching_all(tiny, image_batches):
    qmodel = quantize(tiny, image_batches, exclude=["conv*"], progress=False)
    assert prepare_info(qmodel).quantized_layers == ["fc"]
    assert type(qmodel.get_submodule("conv1")) is nn.Conv2d


@pytest.mark.parametrize(
    "data", [[], DataLoader(EmptyDataset(), batch_size=4), iter(())], ids=["list", "loader", "iterator"]
)
def test_empty_calibration_data(tiny, data):
    with pytest.raises(ValueError, match="calibration data is empty"):
        quantize(tiny, data, progress=False)


def test_wrong_batch_shape_names_what_model_received(tiny):
    data = [(torch.randn(2, 5, 16, 16), torch.zeros(2))]
    with pytest.raises(
        ValueError,
        match=r"batch 0 could not be fed .*received Tensor\(shape=\(2, 5, 16, 16\), "
        r"dtype=torch.float32\)\. Make transform_fn",
    ):
        quantize(tiny, data, progress=False)


def test_failed_calibration_restores_switches(tiny):
    qmodel = prepare(tiny, scheme_for_target("x86")).train()
    with pytest.raises(ValueError):
        calibrate(qmodel, [torch.randn(2, 5, 16, 16)], progress=False)
    assert qmodel.training
    assert all(not fq.observer_enabled.item() for _, fq in iter_quantizers(qmodel))


@pytest.mark.parametrize("n", [0, -1])
def test_num_batches_must_be_positive(tiny, image_batches, n):
    with pytest.raises(ValueError, match=rf"num_batches={n} must be >= 1"):
        quantize(tiny, image_batches, num_batches=n, progress=False)


def test_convert_before_calibration_raises(tiny):
    qmodel = prepare(tiny, scheme_for_target("x86"))
    with pytest.raises(
        NotCalibratedError,
        match=r"cannot convert: 9 quantizer\(s\) have not been calibrated "
        r"\(conv1.weight_fake_quant, .* and 4 more\)",
    ):
        convert(qmodel)


def test_prepare_info_requires_prepared_model(tiny):
    with pytest.raises(ValueError, match="not prepared by lightning_quant"):
        prepare_info(tiny)


def test_deepcopy_of_a_quantized_model_keeps_its_info(tiny, image_batches):
    """fx rebuilds a deep-copied GraphModule from its code; the copy must still be a lightning_quant model (range
    search, export and the callback read prepare_info), with its own record."""
    qmodel = quantize(tiny, image_batches, options=QuantOptions(bias_correction=False), progress=False)
    assert isinstance(qmodel, torch.fx.GraphModule)
    copied = copy.deepcopy(qmodel)
    info, copied_info = prepare_info(qmodel), prepare_info(copied)
    assert copied_info is not info and copied_info.quantized_layers == info.quantized_layers
    assert copied_info.scheme == info.scheme
    copied_info.refinements.append("bias_correction")
    assert info.refinements == []
    x = torch.randn(2, 3, 16, 16, generator=_gen(3))
    with torch.no_grad():
        assert torch.equal(copied(x), qmodel(x))
    assert prepare_info(convert(copied)) is copied_info


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode='int4' is not supported"):
        prepare(TinyConvBN(), scheme_for_target("x86"), mode="int4")


# --- convert -----------------------------------------------------------------------------------------------------


def test_convert_ptq_is_identical_frozen_copy(tiny, image_batches):
    qmodel = quantize(tiny, image_batches, progress=False)
    frozen = convert(qmodel)
    assert frozen is not qmodel and not frozen.training
    assert prepare_info(frozen) is prepare_info(qmodel)
    x = torch.randn(4, 3, 16, 16, generator=_gen(6))
    with torch.no_grad():
        assert torch.equal(frozen(x), qmodel(x))
    qsd, fsd = qmodel.state_dict(), frozen.state_dict()
    assert qsd.keys() == fsd.keys() and all(torch.equal(qsd[k], fsd[k]) for k in qsd)


def test_convert_folds_qat_conv_bn(tiny, image_batches):
    qmodel = prepare(tiny, scheme_for_target("x86", mode="qat"), mode="qat")
    assert sum(isinstance(m, QuantConvBn) for m in qmodel.modules()) == 2
    calibrate(qmodel, [b for b, _ in image_batches[:2]], progress=False)
    # a few QAT steps: observers and batch statistics keep moving, weights change
    qmodel.train()
    set_observers(qmodel, True)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    for x, _ in image_batches:
        loss = qmodel(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    frozen = convert(qmodel)
    assert not any(isinstance(m, (QuantConvBn, nn.BatchNorm2d)) for m in frozen.modules())
    assert [type(frozen.get_submodule(n)) for n in ("conv1", "conv2", "fc")] == [QuantConv2d, QuantConv2d, QuantLinear]
    assert not any(k.startswith("bn") or ".bn." in k for k in frozen.state_dict())
    assert all(not fq.observer_enabled.item() and fq.fake_quant_enabled.item() for _, fq in iter_quantizers(frozen))
    # the source model is untouched
    assert sum(isinstance(m, QuantConvBn) for m in qmodel.modules()) == 2 and qmodel.training
    qmodel.eval()
    set_observers(qmodel, False)
    x = torch.randn(8, 3, 16, 16, generator=_gen(7)) * 2 + 0.5
    with torch.no_grad():
        ref, out = qmodel(x), frozen(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # the converted model does not drift: running it again changes nothing
    with torch.no_grad():
        assert torch.equal(frozen(x), out)


# --- determinism -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["x86", "dpu"])
def test_quantize_twice_gives_bit_identical_state(tiny, image_batches, target):
    a = quantize(tiny, image_batches, target=target, progress=False).state_dict()
    b = quantize(tiny, image_batches, target=target, progress=False).state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert any(k.endswith("activation_quantizers.x.scale") for k in a)
