"""QAT under ``torch.compile``: a prepared network traces as one graph (no ``.item()`` breaks), and
``trainer.fit(torch.compile(model))`` trains through the schedule's freezes with ``lightning.pytorch`` and
``pytorch_lightning``, giving what the eager run gives and a checkpoint that loads without compile."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from lightning_quant import QATSchedule, QuantCallback, scheme_for_target
from lightning_quant.quantizers import freeze_bn, prepare, set_observers
from lightning_quant.quantizers.prepare import iter_quantizers
from tests.helpers.models import TinyConvBN, random_images, warm_bn


def _graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    return explained.graph_break_count, [r.reason.splitlines()[0] for r in explained.break_reasons]


def _qat_network(model: torch.nn.Module, target: str, x: torch.Tensor, **scheme: object) -> torch.nn.Module:
    qmodel = prepare(model.train(), scheme_for_target(target, mode="qat", **scheme), mode="qat")
    with torch.no_grad():
        qmodel(x)
    return qmodel


@pytest.mark.parametrize(
    "target,scheme",
    [("x86", {}), ("tensorrt", {}), ("x86", {"activation_observer": "mean_minmax"}), ("x86", {"weight_bits": 4})],
    ids=["x86", "tensorrt", "mean_minmax_ranges", "4bit_weights"],
)
def test_qat_network_compiles_as_one_graph_while_observing_and_after_the_freezes(target, scheme):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    qmodel = _qat_network(TinyConvBN(), target, x, **scheme)
    assert _graph_breaks(qmodel, x) == (0, [])  # observers updating, batch statistics
    set_observers(qmodel, False)
    freeze_bn(qmodel, True)
    assert _graph_breaks(qmodel, x) == (0, [])  # frozen: each conv+BN is the deployed conv


def test_dpu_qat_network_compiles_as_one_graph_once_its_observers_freeze():
    """The DPU's fix-position search picks among candidate positions by their error (data-dependent Python), so the
    observing phase breaks the graph at each quantizer; after the observer freeze it is one graph."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    qmodel = _qat_network(TinyConvBN(), "dpu", x)
    breaks, _ = _graph_breaks(qmodel, x)
    assert breaks > 0
    set_observers(qmodel, False)
    assert _graph_breaks(qmodel, x) == (0, [])


def test_compiled_dpu_qat_fits_with_frozen_observers_and_refuses_updating_ones(tmp_path):
    """Updating DPU observers under compile would fail in the backward pass (a BatchNorm statistic saved by one graph
    and updated in place by the next): refused before the first step, with the two ways out; with the positions of
    the initial calibration kept (freeze_observer_step=0) the compiled fit trains."""
    pkg = importlib.import_module("lightning.pytorch")
    Lit = _lit_class(pkg)

    def fit(schedule, root):
        callback = QuantCallback(
            mode="qat", target="dpu", calibration_batches=1, qat_schedule=schedule, progress=False, report=False
        )
        trainer = pkg.Trainer(
            default_root_dir=root, callbacks=[callback], logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", max_epochs=1,
            limit_train_batches=3, limit_val_batches=0,
        )  # fmt: skip
        lit = Lit()
        torch._dynamo.reset()
        trainer.fit(torch.compile(lit, backend="aot_eager"), DataLoader(random_images(24, seed=0), batch_size=8))
        return lit, trainer

    with pytest.raises(ValueError, match=r"freeze_observer_step=0\).*ckpt_path"):
        fit(QATSchedule(freeze_observer_step=2, freeze_bn_epoch=None), tmp_path / "observing")
    lit, trainer = fit(QATSchedule(freeze_observer_step=0, freeze_bn_epoch=None), tmp_path / "frozen")
    assert trainer.global_step == 3
    assert all(fq.calibrated.item() and not fq.observer_enabled.item() for _, fq in iter_quantizers(lit.model))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["x86", "tensorrt", "x86_vnni"])
def test_mobilenet_v2_qat_compiles_as_one_graph(target):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    qmodel = _qat_network(torchvision.models.mobilenet_v2(num_classes=10), target, x)
    assert _graph_breaks(qmodel, x) == (0, [])
    set_observers(qmodel, False)
    freeze_bn(qmodel, True)
    assert _graph_breaks(qmodel, x) == (0, [])


def test_compiled_forward_follows_the_switches_it_was_compiled_with():
    """A compiled graph specializes on the quantizers' flags: switching one recompiles, never reuses a stale graph."""
    torch.manual_seed(0)
    qmodel = prepare(warm_bn(TinyConvBN()), scheme_for_target("x86", mode="qat"), mode="qat").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        qmodel(x)  # calibrates
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        graphs = torch._dynamo.utils.counters["stats"]
        compiled = torch.compile(qmodel, backend="aot_eager")
        quantized = compiled(x)
        assert torch.equal(compiled(x), quantized) and graphs["unique_graphs"] == 1
        for _, fq in iter_quantizers(qmodel):
            fq.disable_fake_quant()
        assert torch.equal(compiled(x), qmodel(x))  # the float network now
        assert not torch.equal(compiled(x), quantized)
        assert graphs["unique_graphs"] == 2  # one recompile for the change, reused after it
        state = qmodel.state_dict()
        fresh = prepare(warm_bn(TinyConvBN()), scheme_for_target("x86", mode="qat"), mode="qat").eval()
        fresh.load_state_dict(state)  # loading a state sets the mirrors the compiled forward reads
        assert not any(fq._flags["fake_quant_enabled"] for _, fq in iter_quantizers(fresh))


def _lit_class(pkg):
    class Lit(pkg.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = warm_bn(TinyConvBN())

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Lit


def _fit(pkg, tmp_path, model, **trainer_kwargs):
    schedule = QATSchedule(freeze_observer_step=3, freeze_bn_step=4, freeze_bn_epoch=None)
    callback = QuantCallback(mode="qat", calibration_batches=1, qat_schedule=schedule, progress=False, report=False)
    trainer = pkg.Trainer(
        default_root_dir=tmp_path, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", max_epochs=1, limit_train_batches=6, limit_val_batches=2,
        deterministic=True, **trainer_kwargs,
    )  # fmt: skip
    loader = DataLoader(random_images(48, seed=0), batch_size=8)
    trainer.fit(model, loader, DataLoader(random_images(16, seed=1), batch_size=8))
    return trainer


@pytest.mark.parametrize("pkg_name", ["lightning.pytorch", "pytorch_lightning"])
def test_trainer_fits_a_compiled_qat_model_like_the_eager_one(pkg_name, tmp_path):
    """``trainer.fit(torch.compile(model))``: the callback quantizes the network inside, the compiled forward trains
    it through the observer and BatchNorm freezes (steps 3 and 4 of 6), the weights end where eager training ends
    them, and the checkpoint loads into an uncompiled model."""
    pkg = importlib.import_module(pkg_name)
    Lit = _lit_class(pkg)
    eager = Lit()
    _fit(pkg, tmp_path / "eager", eager)
    lit = Lit()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = _fit(pkg, tmp_path / "compiled", torch.compile(lit, backend="aot_eager"))
    counters = copy.deepcopy(torch._dynamo.utils.counters)
    # Lightning compiles the *_step methods too; its self.log is compiler.disable'd and breaks the graph by design
    ours = [reason for reason in counters["graph_break"] if "_ResultCollection.log" not in reason]
    assert ours == []  # no .item() breaks in the quantized network
    compiled_state, eager_state = lit.state_dict(), eager.state_dict()
    assert compiled_state.keys() == eager_state.keys()
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert all(fq.calibrated.item() and not fq.observer_enabled.item() for _, fq in iter_quantizers(lit.model))

    reloaded = Lit()
    ckpt = next((tmp_path / "compiled").rglob("*.ckpt"))
    reload_callback = QuantCallback(mode="qat", progress=False, report=False)
    reload_trainer = pkg.Trainer(
        default_root_dir=tmp_path, callbacks=[reload_callback], logger=False, enable_progress_bar=False,
        accelerator="cpu",
    )  # fmt: skip
    reload_trainer.validate(reloaded, DataLoader(random_images(16, seed=1), batch_size=8), ckpt_path=ckpt)
    assert trainer.callback_metrics["val_acc"] == reload_trainer.callback_metrics["val_acc"]


def test_inductor_compiled_qat_step_matches_eager():
    """The default backend (Inductor, which generates C++ on CPU): a QAT step's loss and gradients as eager's."""
    torch.manual_seed(0)
    qmodel = prepare(warm_bn(TinyConvBN()).train(), scheme_for_target("x86", mode="qat"), mode="qat")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        qmodel(x)
    eager = copy.deepcopy(qmodel)
    torch._dynamo.reset()
    compiled = torch.compile(qmodel)
    losses = []
    for model, net in ((compiled, qmodel), (eager, eager)):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append((loss.detach(), [p.grad for p in net.parameters()]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(losses[0][1], losses[1][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_a_compiled_network_attribute_is_refused_with_the_fix(tmp_path):
    """``self.model = torch.compile(net)`` hides the network from the callback: a clear error, nothing half-done."""
    pkg = importlib.import_module("lightning.pytorch")
    lit = _lit_class(pkg)()
    lit.model = torch.compile(lit.model, backend="aot_eager")
    with pytest.raises(ValueError, match=r"Lit\.model is a torch\.compile'd module.*trainer\.fit\(torch\.compile"):
        _fit(pkg, tmp_path, lit)
    assert not list(iter_quantizers(lit.model))
