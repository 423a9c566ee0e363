"""QuantCallback: PTQ calibration and QAT inside any Lightning Trainer.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_quant import QuantCallback
    >>> ptq = pl.Trainer(callbacks=[QuantCallback(mode="ptq", target="x86", calibration_batches=16)], logger=False)
    >>> qat = pl.Trainer(max_epochs=2, callbacks=[QuantCallback(mode="qat", target="x86")], logger=False)

``trainer.validate(model, datamodule=dm)`` then calibrates on the calibration data and evaluates the INT8
(fake-quant) model; ``trainer.fit`` fine-tunes with fake-quant in the loop, and resumes from checkpoints.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_quant.algorithms.post_calibration import apply_network_transforms, refine_calibrated
from lightning_quant.calibration import calibrate, default_transform, move_to_device
from lightning_quant.callbacks.calibration_source import SOURCES, calibration_loader
from lightning_quant.config import (
    QATSchedule,
    QuantMode,
    QuantOptions,
    QuantScheme,
    Target,
    _coerce_enum,
    options_from_keywords,
    resolve_scheme,
)
from lightning_quant.distributed import (
    all_ranks_succeed,
    broadcast_state,
    check_all_ranks,
    rank_and_world,
    shard_batches,
    sync_quantizers,
)
from lightning_quant.errors import CheckpointMismatchError
from lightning_quant.quantizers.config_record import RECORD_ATTR, config_record, exclude_names, record_options
from lightning_quant.quantizers.prepare import (
    exclude_entries,
    freeze_bn,
    iter_quantizers,
    prepare,
    prepare_info,
    set_fake_quant,
    set_observers,
)
from lightning_quant.quantizers.state_checks import check_saved_config, require_matching_config
from lightning_quant.report import QuantReport, quantization_report

__all__ = ["DEFAULT_ATTRS", "QuantCallback", "network_attribute"]

DEFAULT_ATTRS = ("model", "net", "network", "backbone")


def network_attribute(pl_module: nn.Module, module_name: str | None = None) -> str:
    """The attribute name of the network: ``module_name`` if given, else the first of :data:`DEFAULT_ATTRS` that
    holds an ``nn.Module``, else the only child.

    Raises:
        ValueError: ``module_name`` is not an ``nn.Module`` attribute, or no rule picks one child (the message lists
            the children and the fix).
    """
    if module_name is not None:
        if not isinstance(getattr(pl_module, module_name, None), nn.Module):
            raise ValueError(
                f"module_name={module_name!r}: {type(pl_module).__name__} has no nn.Module attribute of that "
                f"name; its child modules are {[n for n, _ in pl_module.named_children()]}."
            )
        return module_name
    for attr in DEFAULT_ATTRS:
        if isinstance(getattr(pl_module, attr, None), nn.Module):
            return attr
    children = [n for n, _ in pl_module.named_children()]
    if len(children) == 1:
        return children[0]
    raise ValueError(
        f"cannot tell which child of {type(pl_module).__name__} is the network to quantize (children: {children}); "
        "pass QuantCallback(module_name='<attribute>')."
    )


class QuantCallback(Callback):
    """Insert fake-quant into a LightningModule's network and calibrate it (PTQ) or fine-tune it (QAT).

    Example:
        >>> cb = QuantCallback(mode="qat", target="tensorrt", qat_schedule=QATSchedule(freeze_bn_epoch=1))
        >>> cb.scheme.activation.signed
        True

    Args:
        mode: ``ptq`` (calibrate, then evaluate in ``validate``/``test``/``predict``) or ``qat`` (``fit``).
        target: ``x86`` (the default), ``x86_vnni``, ``tensorrt`` or ``dpu``; picks the default scheme.
        scheme: explicit :class:`~lightning_quant.config.QuantScheme`; its ``target`` is the callback's target (a
            contradicting ``target=`` is an error).
        options: what runs around calibration (:class:`~lightning_quant.config.QuantOptions`): the float-network
            transforms (``replace_relu6``, ``cross_layer_equalization``) run in ``setup()`` before quantizers are
            inserted, in PTQ and QAT alike; the refinements (range search, bias correction, AdaRound, fast finetune)
            after a PTQ calibration. Saved in checkpoints and checked on every load.
        calibration_batches: batches used to calibrate (PTQ) or to initialize ranges before QAT (0 = none).
        calibration_data: any iterable of batches. Without it (``calibration_source="auto"``) the callback takes
            the datamodule's ``calibration_dataloader()``, else a train dataloader wherever it was given (the
            datamodule's or the LightningModule's ``train_dataloader()``, ``fit``'s ``train_dataloaders=``), and logs
            which one it used; evaluation data only on request (see
            :mod:`~lightning_quant.callbacks.calibration_source`).
        calibration_source: ``auto``, ``calibration``, ``train`` or ``val`` (the loaders being evaluated: an opt-in
            that warns, since accuracy measured on the calibration data is optimistic).
        transform_fn: maps one batch to the network input (default: first element of ``(x, y)`` pairs).
        qat_schedule: when observers and BatchNorm statistics freeze during QAT.
        exclude: layers kept in float: glob patterns of layer names and/or ``nn.Module`` types.
        layer_weight_bits: ``{glob pattern: bits}`` weight widths of matching layers (mixed precision; see
            :func:`~lightning_quant.quantizers.prepare`); stored in checkpoints like ``exclude``.
        module_name: attribute of the LightningModule holding the network (default: ``model``, ``net``,
            ``network``, ``backbone``, or the only child module).
        report: print the quantization report and log its metrics.
        progress: show a calibration progress bar.
        calibrate_missing: after a saved state was loaded (``ckpt_path=``,
            :func:`~lightning_quant.load_quantized_checkpoint`), calibrate the quantizers it holds uncalibrated (and
            only those, with a warning). Otherwise they stay as loaded (pass-through, as in the saved model), with a
            warning: a loaded state is never recalibrated.
        **deprecated_options: the option switches as keyword arguments (``bias_correction=True``, ...), as older
            releases took them; they still work for one release, with a ``DeprecationWarning`` showing the
            ``options=QuantOptions(...)`` call.

    Raises:
        ValueError: unknown mode/target/source, a ``target`` that contradicts ``scheme.target``, negative
            ``calibration_batches``, refinements with ``mode='qat'``, ``range_search`` with activations that use
            neither the ``percentile`` estimator nor power-of-two scales.
        TypeError: ``qat_schedule``, ``scheme`` or ``options`` of the wrong type, or an unknown keyword.
    """

    def __init__(
        self,
        mode: QuantMode | str = QuantMode.PTQ,
        target: Target | str | None = None,
        *,
        scheme: QuantScheme | None = None,
        options: QuantOptions | None = None,
        calibration_batches: int = 16,
        calibration_data: Iterable[Any] | None = None,
        calibration_source: str = "auto",
        transform_fn: Callable[[Any], Any] | None = None,
        qat_schedule: QATSchedule | None = None,
        exclude: str | type[nn.Module] | Iterable[str | type[nn.Module]] = (),
        layer_weight_bits: Mapping[str, int] | None = None,
        module_name: str | None = None,
        report: bool = True,
        progress: bool = True,
        calibrate_missing: bool = False,
        **deprecated_options: Any,
    ) -> None:
        super().__init__()
        self.mode: QuantMode = _coerce_enum(QuantMode, mode, "mode")  # type: ignore[assignment]
        self.options = options_from_keywords(options, deprecated_options, "QuantCallback")
        self.scheme = resolve_scheme(target, scheme, self.mode)
        self.options = self.options.resolved(self.mode, self.scheme.target)
        self.options.check_mode(self.mode)
        self.options.check_scheme(self.scheme)
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise ValueError(f"calibration_batches={calibration_batches!r} must be an integer >= 0 (16 is typical).")
        if self.mode is QuantMode.PTQ and calibration_batches == 0:
            raise ValueError("mode='ptq' needs calibration_batches >= 1: PTQ ranges come from calibration.")
        if calibration_source not in SOURCES:
            raise ValueError(f"calibration_source={calibration_source!r}; use one of {', '.join(map(repr, SOURCES))}.")
        if qat_schedule is not None and not isinstance(qat_schedule, QATSchedule):
            raise TypeError(f"qat_schedule must be a QATSchedule, got {type(qat_schedule).__name__}.")
        self.calibration_batches = calibration_batches
        self.calibration_data = calibration_data
        self.calibration_source = calibration_source
        self.transform_fn = transform_fn or default_transform
        self.qat_schedule = qat_schedule or QATSchedule()
        self.exclude = exclude_entries(exclude)
        self.layer_weight_bits = dict(layer_weight_bits or {})
        self.module_name = module_name
        self.report = report
        self.progress = progress
        self.calibrate_missing = bool(calibrate_missing)
        self.calibration_batches_used: int | None = None  # batches the last calibration actually saw
        self.last_report: QuantReport | None = None
        self.calibration_seconds: float | None = None  # wall time of the last calibration pass
        self._report_inputs: Any = None
        self._legacy_pending = False  # an earlier release's checkpoint is loaded and not yet checked (see setup)
        self._applied: tuple[bool, bool] | None = None

    @property
    def target(self) -> Target | None:
        """The target of the scheme (None for a hand-built scheme without one)."""
        return self.scheme.target

    @property
    def _target_name(self) -> str:
        return "custom scheme" if self.target is None else self.target.value

    # -- helpers ----------------------------------------------------------------------------------------
    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The (prepared) network inside ``pl_module`` this callback quantizes."""
        return getattr(pl_module, network_attribute(pl_module, self.module_name))

    def _is_prepared(self, module: nn.Module) -> bool:
        try:
            prepare_info(module)
            return True
        except ValueError:
            return False

    def _run_calibration(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, *, refine: bool = True
    ) -> None:
        network = self.network(pl_module)
        # DDP: a failure on one rank raises RankFailedError on every rank (lightning_quant.distributed), never a hang
        distributed = trainer.world_size > 1
        try:
            loader, used = calibration_loader(trainer, pl_module, stage, self.calibration_data, self.calibration_source)
        except Exception as err:
            if distributed:  # the other ranks agree on success at the end of calibrate(shard=True)
                check_all_ranks(err, "calibration")
            raise
        first: list[Any] = []

        def transform(item: Any) -> Any:
            inputs = self.transform_fn(item)
            if not first:
                first.append(move_to_device(inputs, "cpu"))
            return inputs

        progress = self.progress and trainer.is_global_zero
        start = time.perf_counter()
        # DDP: each rank calibrates on its own share of the batches, then the observers are merged (see
        # lightning_quant.distributed); a rank whose share is empty still takes part in the merge.
        seen = calibrate(
            network,
            shard_batches(loader, self.calibration_batches) if distributed else loader,
            transform_fn=transform,
            num_batches=None if distributed else self.calibration_batches,
            progress=progress,
            desc=f"Calibrating ({self.mode.value}, {self._target_name})",
            shard=distributed,
        )
        seen = self._merge_across_ranks(trainer, network, seen)
        self.calibration_batches_used = seen
        if self.mode is QuantMode.PTQ and refine:
            # every rank refines on the same (unsharded) batches, then rank 0's weights are shared to be exact
            with all_ranks_succeed("post-calibration refinement"):
                steps = refine_calibrated(
                    network,
                    loader,
                    self.options,
                    target=self.scheme.target,
                    transform_fn=self.transform_fn,
                    num_batches=self.calibration_batches,
                    progress=progress,
                )
            if steps:
                broadcast_state(network)
                rank_zero_info(f"lightning_quant: after calibration: {', '.join(steps)}")
                if self.options.range_search:
                    rank_zero_info(f"lightning_quant: {prepare_info(network).range_search}")
        self.calibration_seconds = time.perf_counter() - start
        ranks = f" across {trainer.world_size} processes" if trainer.world_size > 1 else ""
        rank_zero_info(
            f"lightning_quant: calibrated {len(list(iter_quantizers(network)))} quantizers on {seen} batches{ranks} "
            f"of {used} in {self.calibration_seconds:.1f} s"
        )
        self._report_inputs = first[0] if first else None

    def _merge_across_ranks(self, trainer: pl.Trainer, network: nn.Module, seen: int) -> int:
        """Merge the ranks' observer state (DDP); returns the batches seen by all ranks together."""
        if trainer.world_size == 1 or rank_and_world()[1] == 1:
            return seen
        count = torch.tensor(float(seen), device=trainer.strategy.root_device)  # NCCL reduces device tensors only
        total = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        if total == 0:
            raise ValueError("calibration data is empty on every rank: give the calibration loader at least one batch.")
        sync_quantizers(network)
        return total

    def _emit_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.report or self._report_inputs is None or not trainer.is_global_zero:
            return
        self.last_report = quantization_report(self.network(pl_module), self._report_inputs)
        rank_zero_info(f"lightning_quant report ({self.mode.value}, target={self._target_name}):\n{self.last_report}")
        for logger in trainer.loggers:  # every logger the Trainer has (CSV, TensorBoard, W&B, MLflow, ...)
            logger.log_metrics(self.last_report.metrics(), step=trainer.global_step)

    def _calibrate_if_needed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        """Calibrate a network that was not calibrated yet; returns whether a calibration ran.

        A network restored from a saved state keeps the values it loaded: calibration never reruns behind the user's
        back. Quantizers the state holds uncalibrated (calibration never reached them, e.g. a branch its inputs did not
        take) stay as loaded, pass-through like in the calibrated model, with a warning; ``calibrate_missing=True``
        calibrates only them.
        """
        network = self.network(pl_module)
        quantizers = list(iter_quantizers(network))
        missing = [name for name, fq in quantizers if not fq.calibrated.item()]
        if not missing:
            return False
        if not prepare_info(network).restored:
            self._run_calibration(trainer, pl_module, stage)
            return True
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        if not self.calibrate_missing:
            rank_zero_warn(
                f"lightning_quant: the loaded quantization state holds {len(missing)} of {len(quantizers)} quantizers "
                f"uncalibrated ({shown}); they stay as loaded (pass-through, as in the model that was saved) and "
                "nothing is recalibrated. Pass QuantCallback(calibrate_missing=True) to calibrate only those."
            )
            return False
        rank_zero_warn(
            f"lightning_quant: calibrating only the {len(missing)} quantizers the loaded state left uncalibrated "
            f"({shown}); the other {len(quantizers) - len(missing)} keep their loaded values, and no refinement runs."
        )
        kept = {name: copy.deepcopy(fq.state_dict()) for name, fq in quantizers if name not in missing}
        self._run_calibration(trainer, pl_module, stage, refine=False)
        for name, fq in quantizers:
            if name in kept:
                fq.load_state_dict(kept[name])
        if self.scheme.target is Target.DPU:  # the new positions must satisfy the DPU's shift constraints too
            refine_calibrated(network, [], QuantOptions(bias_correction=False), target=Target.DPU, progress=False)
        return True

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = (
            self.qat_schedule.observers_frozen(trainer.current_epoch, trainer.global_step),
            self.qat_schedule.bn_frozen(trainer.current_epoch, trainer.global_step),
        )
        if state == self._applied:
            return
        network = self.network(pl_module)
        for _, fq in iter_quantizers(network):
            fq.enable_observer(not state[0] and not fq.spec.learnable)
        freeze_bn(network, state[1])
        newly_frozen_bn = state[1] and not (self._applied or (False, False))[1]
        equalized = self.options.cross_layer_equalization
        if newly_frozen_bn and equalized and any(isinstance(opt, torch.optim.SGD) for opt in trainer.optimizers):
            rank_zero_warn(
                "lightning_quant: BatchNorm now uses running statistics in a network trained with SGD after "
                "cross-layer equalization. Equalization spreads per-channel weight scales over orders of magnitude, "
                "which batch statistics had absorbed; SGD's step is not scale-invariant, and MobileNetV2 diverged "
                "within 5 steps of this freeze (lr 1e-4). Train with Adam/AdamW (scale-invariant steps; the DPU QAT "
                "recipe freezes BatchNorm from the first step with AdamW, lr 1e-5), or keep batch statistics "
                "(QATSchedule(freeze_bn_epoch=None))."
            )
        if self._applied is not None or any(state):
            rank_zero_info(
                f"lightning_quant: epoch {trainer.current_epoch} step {trainer.global_step}: observers "
                f"{'frozen' if state[0] else 'updating'}, BatchNorm {'frozen' if state[1] else 'updating'}"
            )
        self._applied = state

    # -- hooks ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.mode is QuantMode.PTQ and stage == "fit":
            raise ValueError(
                "QuantCallback(mode='ptq') calibrates without training: use trainer.validate/test/predict, "
                "or mode='qat' to fine-tune with trainer.fit."
            )
        name = network_attribute(pl_module, self.module_name)
        network = getattr(pl_module, name)
        if isinstance(network, torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError(
                f"{type(pl_module).__name__}.{name} is a torch.compile'd module: QuantCallback inserts quantizers into "
                "the network in setup(), which a compiled wrapper hides. Keep the network uncompiled and compile the "
                "LightningModule instead: trainer.fit(torch.compile(model)) (the compiled forward then traces the "
                "quantized network, and checkpoints keep the network's own parameter names)."
            )
        if self._is_prepared(network):  # a second run, or a network load_quantized_checkpoint rebuilt
            self._check_prepared_network(network)
            return
        for line in apply_network_transforms(network, self.options):
            rank_zero_info(f"lightning_quant: {line}")
        prepared = prepare(
            network, self.scheme, mode=self.mode, exclude=self.exclude, inplace=True,
            layer_weight_bits=self.layer_weight_bits,
        )  # fmt: skip
        record_options(prepared, self.options)
        setattr(pl_module, name, prepared)
        if self.mode is QuantMode.QAT:
            set_fake_quant(prepared, True)
            set_observers(prepared, True)
        info = prepare_info(prepared)
        pl_module.register_load_state_dict_pre_hook(functools.partial(self._note_legacy_state, name=name))
        rank_zero_info(
            f"lightning_quant: prepared {type(network).__name__} for {self.mode.value} ({self._target_name}): "
            f"{len(info.quantized_layers)} layers quantized, {len(info.folded_bn)} BatchNorms folded, "
            f"{len(info.float_layers) + len(info.untraced)} parts kept in float"
        )

    def _check_prepared_network(self, network: nn.Module) -> None:
        """A network that is already quantized must be quantized the way this callback would do it.

        Raises:
            CheckpointMismatchError: its mode, scheme, exclude list, mixed precision or network transforms differ.
        """
        own = config_record(network)
        if own is None:
            return
        wanted = dict(own)
        wanted.update(
            mode=self.mode.value, scheme=self.scheme.to_dict(), exclude=exclude_names(self.exclude),
            layer_weight_bits=dict(self.layer_weight_bits), options=self.options.to_dict(),
        )  # fmt: skip
        try:
            check_saved_config(wanted, own)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(
                f"the network is already quantized, not as this QuantCallback would: {err}"
            ) from None

    def _note_legacy_state(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any, name: str) -> None:
        """``load_state_dict`` pre-hook of the LightningModule: a checkpoint of an earlier release has no config record
        beside its weights. Let the network take it for now; Lightning restores this callback's state right after
        the model (:meth:`load_state_dict` compares it then), and a checkpoint without that state is refused when the
        run starts (:meth:`_require_verified_state`)."""
        quant_keys = any(k.startswith(f"{prefix}{name}.") and "fake_quant" in k for k in state_dict)
        if quant_keys and f"{prefix}{name}.{RECORD_ATTR}" not in state_dict:
            prepare_info(getattr(module, name)).legacy_state_checked = True
            self._legacy_pending = True

    def _require_verified_state(self) -> None:
        """Raises CheckpointMismatchError: an earlier release's checkpoint without QuantCallback state was loaded."""
        if self._legacy_pending:
            self._legacy_pending = False
            raise CheckpointMismatchError(
                "the checkpoint holds quantized weights but no record of the scheme and options they were calibrated "
                "with, and no QuantCallback state to check them against: it was written by an earlier release with "
                "save_weights_only=True. Quantize the float model again, or load the full checkpoint of that run."
            )

    def _ensure_calibrated(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._calibrate_if_needed(trainer, pl_module, stage):
            self._emit_report(trainer, pl_module)
        else:
            set_observers(self.network(pl_module), False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_verified_state()
        if self.mode is QuantMode.PTQ:
            self._ensure_calibrated(trainer, pl_module, "validate")
        else:  # QAT: evaluation never updates ranges; the schedule restores observers afterwards
            set_observers(self.network(pl_module), False)
            self._applied = None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode is QuantMode.QAT and trainer.state.fn == "fit":
            self._apply_schedule(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_verified_state()
        if self.mode is QuantMode.PTQ:
            self._ensure_calibrated(trainer, pl_module, "test")
        else:
            set_observers(self.network(pl_module), False)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_verified_state()
        if self.mode is QuantMode.PTQ:
            self._ensure_calibrated(trainer, pl_module, "predict")
        else:
            set_observers(self.network(pl_module), False)

    def _check_compiled_dpu_qat(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A compiled DPU QAT run whose observers still update fails in the backward pass: refuse it with the fix.

        The DPU's fix-position search breaks the compiled graph at each updating quantizer, and a graph that ends
        there saves the BatchNorm statistics that the next graph updates in place."""
        compiled = getattr(pl_module, "_compiler_ctx", None) is not None  # set by Lightning for fit(torch.compile(m))
        observing = not self.qat_schedule.observers_frozen(trainer.current_epoch, trainer.global_step)
        if compiled and observing and self.scheme.target is Target.DPU:
            raise ValueError(
                "DPU QAT under torch.compile needs its observers frozen: while they update, the fix-position search "
                "breaks the compiled graph at every quantizer and the backward pass fails on a BatchNorm statistic "
                "updated across the break. Keep the positions of the initial calibration with "
                "QATSchedule(freeze_observer_step=0), or train the observing steps uncompiled and resume compiled "
                "from that checkpoint (ckpt_path=...)."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_verified_state()
        self._check_compiled_dpu_qat(trainer, pl_module)
        if self.calibration_batches > 0 and self._calibrate_if_needed(trainer, pl_module, "fit"):
            pl_module.train()
        self._applied = None
        self._apply_schedule(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._report_inputs is None:
            self._report_inputs = move_to_device(self.transform_fn(batch), "cpu")
        self._apply_schedule(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # DDP: ranks observe different batches; merging after every step keeps their qparams identical at each
        # step boundary (and so in every checkpoint). Within a step each rank uses its own batch's update.
        if trainer.world_size > 1 and self._applied is not None and not self._applied[0]:
            sync_quantizers(self.network(pl_module), only_observing=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training is over: freeze ranges so later inference never moves them (a resumed fit re-applies the schedule).
        set_observers(self.network(pl_module), False)
        self._applied = None
        self._emit_report(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "mode": self.mode.value,
            "target": None if self.target is None else self.target.value,
            "scheme": self.scheme.to_dict(),
            "options": self.options.to_dict(),
            "exclude": exclude_names(self.exclude),
            "layer_weight_bits": dict(self.layer_weight_bits),
            "module_name": self.module_name,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        require_matching_config(self.state_dict(), state_dict)
        if self._legacy_pending:  # an earlier release's checkpoint: its callback state matched, so its weights stand
            self._legacy_pending = False
            rank_zero_warn(
                "lightning_quant: the checkpoint was written by an earlier release without a config record; its "
                "QuantCallback state matches this callback. Save it again to record the config with the weights."
            )
