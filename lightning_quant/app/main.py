"""The Hydra app behind ``python train.py recipe=<name>``: the only module of the package that imports Hydra.

Modes (``mode=``, Vitis AI's ``--quant_mode`` plus the two combined flows):

- ``ptq``: float evaluation, calibration, INT8 evaluation, quantization state saved in the run directory,
  float-vs-INT8 table and ``metrics.json``; artefacts exported when ``deploy=true``.
- ``float``: evaluate the float model only.  ``calib``: calibrate and save the state file (``state_file``).
- ``test``: load ``state_file``, evaluate, export when ``deploy=true``.
- ``qat``: fine-tune with fake-quant in the loop (``trainer.max_epochs``), test, save, export when ``deploy=true``.
- ``inspect``: list which ops the Vitis AI DPU runs and which fall back to the CPU, with the reasons and the number
  of DPU subgraphs; writes ``dpu_inspection.json``, calibrates nothing.

Example:
    >>> cfg = compose_config(["recipe=resnet20_ptq_cifar10", "data.calibration_size=16"])
    >>> cfg.name, cfg.mode, cfg.quant.target, cfg.data.calibration_size
    ('resnet20_ptq_cifar10', 'ptq', 'x86', 16)
    >>> metrics = train(compose_config(["recipe=resnet20_ptq_cifar10", "paths.output_dir=/tmp/r20"]))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightning_quant.app.accuracy_control_step import accuracy_control_enabled, choose_float_layers, report_metrics
from lightning_quant.app.export_step import export_artefacts
from lightning_quant.app.help import help_page
from lightning_quant.app.inspect_step import inspect_model
from lightning_quant.app.overrides import app_unavailable_error
from lightning_quant.app.report_step import model_sizes, summary_table, write_run_report
from lightning_quant.app.schema import MODES, config_keys, explain_override_error, register_schema, validate_config
from lightning_quant.callbacks.quant_callback import QuantCallback
from lightning_quant.checkpoint import exclude_from_names, read_checkpoint, saved_config
from lightning_quant.config import QATSchedule, QuantOptions, QuantScheme, scheme_for_target
from lightning_quant.downloads import AssetUnavailableError
from lightning_quant.quantizers.prepare import prepare_info
from lightning_quant.report import quantization_report

__all__ = [
    "CONFIG_DIR",
    "MODES",
    "RECIPES_DIR",
    "compose_config",
    "main",
    "quant_options",
    "quant_scheme",
    "summary_table",
    "train",
]


def _resource_dir(name: str) -> Path:
    """``configs``/``recipes``: inside the installed package (a wheel), else at the top level of a checkout."""
    package = Path(__file__).resolve().parents[1]
    return package / name if (package / name).is_dir() else package.parent / name


CONFIG_DIR = _resource_dir("configs")
RECIPES_DIR = _resource_dir("recipes")
register_schema()
# configs/train.yaml adds this folder to Hydra's search path, so `recipe=<name>` works from any directory.
os.environ.setdefault("LIGHTNING_QUANT_RECIPES", str(RECIPES_DIR))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/train.yaml`` with command-line style overrides, without running anything.

    Example:
        >>> compose_config(["recipe=resnet20_qat_cifar10", "trainer.max_epochs=3"]).trainer.max_epochs
        3

    Raises:
        hydra.errors.ConfigCompositionException: an unknown recipe/group option or a bad override.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    validate_config(cfg)
    return cfg


def _check_config(cfg: DictConfig) -> None:
    """Fail before any work on overrides that cannot run (after the schema's own checks at composition)."""
    validate_config(cfg)
    formats = list(cfg.export.formats)
    if cfg.deploy and "xmodel" in formats and cfg.quant.target != "dpu":
        raise ValueError(
            f"export.formats has xmodel but quant={cfg.quant.target}: Vitis AI XModels hold the DPU scheme only; use "
            "quant=dpu (or a *_dpu recipe), or drop xmodel from export.formats."
        )
    if cfg.get("ckpt_path") is not None and cfg.mode != "qat":
        raise ValueError(
            f"ckpt_path resumes QAT training; mode={cfg.mode} does not train. For a calibrated state use "
            "mode=test state_file=<file>."
        )
    if cfg.deploy and cfg.mode in ("calib", "float", "inspect"):
        why = {"calib": "it only writes the calibration state file", "float": "it has no quantized model"}.get(
            cfg.mode, "it only lists which ops the DPU runs"
        )
        print(
            f"lightning-quant: deploy=true has no effect with mode={cfg.mode}: nothing is exported ({why}). Export "
            "with mode=ptq or mode=qat, or mode=test state_file=<the calibration state> deploy=true."
        )
    if cfg.mode == "calib" and Path(cfg.state_file).expanduser().exists() and not cfg.get("overwrite_state", False):
        raise FileExistsError(
            f"mode=calib: state file {cfg.state_file!r} already exists (another run wrote it) and is kept. Pass "
            "overwrite_state=true to replace it, or write elsewhere with name=<new name> or state_file=/path/x.ckpt."
        )
    if cfg.mode == "test" and not Path(cfg.state_file).is_file():
        raise FileNotFoundError(
            f"mode=test: state file {cfg.state_file!r} does not exist. Run mode=calib first with the same recipe "
            "(it writes that file), or pass state_file=/path/to/quant_state.ckpt (e.g. from a mode=ptq run dir)."
        )


def _output_dir(cfg: DictConfig) -> Path:
    try:
        out = cfg.paths.output_dir
    except Exception as err:  # noqa: BLE001 - ${hydra:...} cannot resolve outside a Hydra run
        raise ValueError(
            "paths.output_dir cannot be resolved outside `python train.py`; pass the override "
            "paths.output_dir=/some/folder when calling train() from Python."
        ) from err
    path = Path(out).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_model(cfg: DictConfig) -> pl.LightningModule:
    """Instantiate ``cfg.model``, re-raising the builder's own error (e.g. WeightsUnavailableError) unwrapped."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(cfg.model)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, AssetUnavailableError):  # offline first run: name the overrides (the data's too)
            raise app_unavailable_error(cfg, ("model", cause), *_data_unavailable(cfg)) from None
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _data_unavailable(cfg: DictConfig) -> list[tuple[str, AssetUnavailableError]]:
    """``[("data", error)]`` when the data cannot be had either, so that one error names every fix; else ``[]``."""
    try:
        _build_datamodule(cfg)
    except AssetUnavailableError as err:
        return [("data", err)]
    except Exception:  # noqa: BLE001 - any other data problem is raised when the data is built
        pass
    return []


def _build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    missing = [k for k in cfg.data if OmegaConf.is_missing(cfg.data, k)]
    no_train_split = "train_root" in missing and cfg.data.get("calibration_dir") and cfg.mode != "qat"
    if no_train_split:  # PTQ that calibrates on data.calibration_dir needs no train split
        missing.remove("train_root")
    if missing:
        raise ValueError(
            f"data.{missing[0]} is required by data={cfg.data._target_.rsplit('.', 1)[-1]}: pass "
            + " ".join(f"data.{k}=/path/to/{k.removesuffix('_root')}" for k in missing)
            + " (ImageFolder folders), or use an offline recipe such as recipe=resnet50_ptq_imagenette."
        )
    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)
    data.pop("calibration_dir", None)  # type: ignore[union-attr]
    if no_train_split:
        data["train_root"] = None  # type: ignore[index]
    dm = instantiate(data)
    if hasattr(dm, "check_source"):  # missing data fails here, naming the overrides, not inside the Trainer
        try:
            dm.check_source()
        except AssetUnavailableError as err:
            raise app_unavailable_error(cfg, ("data", err)) from None
    return dm


def _calibration_data(cfg: DictConfig, dm: pl.LightningDataModule) -> DataLoader | None:
    """A loader over ``data.calibration_dir`` (unlabeled images) when set; None uses the datamodule's train split."""
    folder = cfg.data.get("calibration_dir")
    if not folder:
        return None
    from lightning_quant.data import CalibrationFolder, imagenette_transform

    transform = dm.eval_transform() if hasattr(dm, "eval_transform") else imagenette_transform(dm.image_size, dm.resize)
    dataset = CalibrationFolder(folder, transform, size=cfg.data.calibration_size, seed=cfg.seed)
    return DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers)


def quant_scheme(cfg: DictConfig, mode: str = "ptq") -> QuantScheme:
    """The scheme the app quantizes with: ``quant.target``'s default for ``mode``, with the recipe's non-null
    ``quant.scheme`` keys as overrides (``scheme_for_target(target, mode, **overrides)``).

    Example:
        >>> quant_scheme(compose_config(["recipe=mobilenetv2_ptq_imagenette"])).activation.observer
        'mean_minmax'
        >>> quant_scheme(compose_config(["recipe=mobilenetv2_ptq_imagenette_mse_bc"])).activation.observer
        'mse'
    """
    overrides = {k: v for k, v in (cfg.quant.get("scheme") or {}).items() if v is not None}
    return scheme_for_target(cfg.quant.target, mode, **overrides)


def quant_options(cfg: DictConfig, mode: str = "ptq") -> QuantOptions:
    """The recipe's ``quant.options`` as a :class:`~lightning_quant.config.QuantOptions`; for ``qat`` only the
    network transforms (the refinements tune a PTQ calibration).

    Example:
        >>> quant_options(compose_config(["recipe=mobilenetv2_ptq_imagenette_dpu"])).network_transforms
        ('replace_relu6', 'cross_layer_equalization')
    """
    options = QuantOptions.from_dict(OmegaConf.to_container(cfg.quant.options, resolve=True))  # type: ignore[arg-type]
    if mode == "qat":
        options = dataclasses.replace(options, **dict.fromkeys(options.refinements, False), adaround_per_sample=False)
    return options


def _build_callback(
    cfg: DictConfig,
    dm: pl.LightningDataModule,
    mode: str | None = None,
    exclude: Sequence[str] | None = None,
    layer_weight_bits: dict[str, int] | None = None,
) -> QuantCallback:
    q = cfg.quant
    mode = mode or ("qat" if cfg.mode == "qat" else "ptq")
    return QuantCallback(
        mode=mode,
        scheme=quant_scheme(cfg, mode),
        options=quant_options(cfg, mode),
        calibration_batches=q.calibration_batches,
        calibration_data=_calibration_data(cfg, dm),
        calibration_source=q.calibration_source,
        qat_schedule=QATSchedule(**OmegaConf.to_container(q.qat_schedule)),  # type: ignore[arg-type]
        exclude=list(q.exclude) if exclude is None else list(exclude),
        layer_weight_bits=dict(q.get("layer_weight_bits") or {}) if layer_weight_bits is None else layer_weight_bits,
        report=q.report,
        progress=q.progress,
    )


def _progress_bar(cfg: DictConfig) -> list[Any]:
    """Lightning's RichProgressBar when ``progress_bar=rich`` (the default) and ``rich`` imports; else its tqdm bar."""
    if cfg.get("progress_bar", "rich") == "tqdm" or not cfg.trainer.get("enable_progress_bar", True):
        return []
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar()]
    except (ImportError, ModuleNotFoundError):  # rich not installed: Lightning's default tqdm bar
        return []


# loggers that need a package the [app] extra does not install: logger target -> (module, extra)
_LOGGER_EXTRAS = {"WandbLogger": ("wandb", "wandb"), "MLFlowLogger": ("mlflow", "mlflow")}


def _build_logger(cfg: DictConfig) -> Any:
    """``cfg.logger`` instantiated (False for ``logger=none``).

    Raises:
        ModuleNotFoundError: the logger's package is missing; the message names the extra to install.
    """
    if not cfg.get("logger"):
        return False
    name = str(cfg.logger.get("_target_", "")).rsplit(".", 1)[-1]
    if name in _LOGGER_EXTRAS:
        module, extra = _LOGGER_EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"logger={module} needs the {module} package: pip install 'lightning-quant[{extra}]' (or pick "
                "logger=csv, logger=tensorboard or logger=none)."
            )
    return instantiate(cfg.logger)


def _build_trainer(cfg: DictConfig, callbacks: list[Any], **overrides: Any) -> pl.Trainer:
    return instantiate(cfg.trainer, callbacks=[*callbacks, *_progress_bar(cfg)], logger=_build_logger(cfg), **overrides)


def _evaluate(
    trainer: pl.Trainer, model: pl.LightningModule, dm: Any, prefix: str, stage: str = "val", **kwargs: Any
) -> dict[str, float]:
    """``{prefix}_top1`` / ``{prefix}_top5`` percent from ``trainer.validate`` (or ``test``)."""
    results = (trainer.test if stage == "test" else trainer.validate)(model, datamodule=dm, **kwargs)[0]
    out = {f"{prefix}_top1": 100.0 * float(results[f"{stage}_acc"])}
    if f"{stage}_acc5" in results:
        out[f"{prefix}_top5"] = 100.0 * float(results[f"{stage}_acc5"])
    return out


_RunResult = tuple[dict[str, Any], "QuantCallback | None"]


def _run_float(cfg: DictConfig, model: pl.LightningModule, dm: Any, out: Path) -> _RunResult:
    return _evaluate(_build_trainer(cfg, []), model, dm, "float"), None


def _calibrate(cfg: DictConfig, model: pl.LightningModule, dm: Any, state_path: Path) -> _RunResult:
    metrics: dict[str, Any] = {}
    exclude, layer_bits = None, None
    if accuracy_control_enabled(cfg):  # choose layers first; the state file's exclude / layer_weight_bits keep them
        calibration = _calibration_data(cfg, dm)
        chosen = choose_float_layers(
            cfg, model, dm, scheme=quant_scheme(cfg, "ptq"), options=quant_options(cfg), calibration_data=calibration
        )
        metrics["accuracy_control"] = report_metrics(chosen)
        exclude = [*cfg.quant.exclude, *chosen.kept_float]
        moved_up = dict.fromkeys(chosen.higher_bits, chosen.fallback_weight_bits)
        layer_bits = {**(cfg.quant.get("layer_weight_bits") or {}), **moved_up}
    callback = _build_callback(cfg, dm, exclude=exclude, layer_weight_bits=layer_bits)
    trainer = _build_trainer(cfg, [callback])
    metrics.update(_evaluate(trainer, model, dm, "int8"))
    metrics["calibration_seconds"] = callback.calibration_seconds
    search = prepare_info(callback.network(model)).range_search
    if search is not None:  # the clipping percentile (power-of-two scales: fix position shift) chosen per group
        metrics["range_search"] = dict(search.chosen)
        metrics["range_search_parameter"] = search.parameter
    state_path.parent.mkdir(parents=True, exist_ok=True)
    # save_checkpoint's weights_only=False writes the QuantCallback state beside the weights (Lightning's default,
    # which it logs when left unset); it is not torch.load's flag: the file is read with weights_only=True
    trainer.save_checkpoint(state_path, weights_only=False)
    metrics["state_file"] = str(state_path)
    return metrics, callback


def _run_ptq(cfg: DictConfig, model: pl.LightningModule, dm: Any, out: Path) -> _RunResult:
    metrics, _ = _run_float(cfg, model, dm, out)
    calibrated, callback = _calibrate(cfg, model, dm, out / "quant_state.ckpt")
    metrics.update(calibrated)
    return metrics, callback


def _run_calib(cfg: DictConfig, model: pl.LightningModule, dm: Any, out: Path) -> _RunResult:
    state = Path(cfg.state_file).expanduser().resolve()
    metrics, callback = _calibrate(cfg, model, dm, state)
    print(f"lightning_quant: quantization state written to {state}; evaluate it with mode=test")
    return metrics, callback


def _run_test(cfg: DictConfig, model: pl.LightningModule, dm: Any, out: Path) -> _RunResult:
    state = Path(cfg.state_file).expanduser().resolve()
    checkpoint = read_checkpoint(state)  # safe (weights_only) and clear errors for a damaged or foreign file
    name, saved = saved_config(model, checkpoint)
    # the network is rebuilt as the state file says (scheme, options, exclude, mixed precision), not as the recipe
    # says: what was calibrated is what is evaluated
    callback = QuantCallback(
        mode=saved["mode"],
        scheme=QuantScheme.from_dict(saved["scheme"]),
        options=QuantOptions.from_dict(saved["options"]),
        exclude=exclude_from_names(saved["exclude"], getattr(model, name)),
        layer_weight_bits=saved["layer_weight_bits"],
        module_name=name,
        calibration_batches=max(int(cfg.quant.calibration_batches), 1),
        report=cfg.quant.report,
        progress=cfg.quant.progress,
    )
    print(
        f"lightning-quant: evaluating {state.name} as it was quantized: {saved['mode']}, target "
        f"{saved['scheme'].get('target')}, refinements {', '.join(saved.get('refinements') or []) or 'none'}"
    )
    # weights_only: a state file from someone else can hold tensors and plain containers, never code that runs
    metrics = _evaluate(_build_trainer(cfg, [callback]), model, dm, "int8", ckpt_path=state, weights_only=True)
    metrics["state_file"] = str(state)
    return metrics, callback


def _run_qat(cfg: DictConfig, model: pl.LightningModule, dm: Any, out: Path) -> _RunResult:
    resume = _resume_path(cfg, out)  # before any work: a wrong ckpt_path fails fast
    metrics, _ = _run_float(cfg, model, dm, out)
    callback = _build_callback(cfg, dm)
    # every epoch end writes <run dir>/checkpoints/last.ckpt: an interrupted run resumes with ckpt_path=last
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)
    trainer = _build_trainer(cfg, [callback, checkpoints], enable_checkpointing=True)
    model.train()  # the builders return eval-mode networks and Lightning keeps the mode it finds
    if resume is not None:
        print(f"lightning-quant: resuming QAT from {resume}")
        metrics["resumed_from"] = str(resume)
    trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True if resume is not None else None)
    metrics.update(_evaluate(trainer, model, dm, "int8", stage="test"))
    metrics["calibration_seconds"] = callback.calibration_seconds
    state = out / "quant_state.ckpt"
    # save_checkpoint's weights_only=False writes the QuantCallback state beside the weights (Lightning's default,
    # which it logs when left unset); it is not torch.load's flag: the file is read with weights_only=True
    trainer.save_checkpoint(state, weights_only=False)
    metrics["state_file"] = str(state)
    return metrics, callback


def _resume_path(cfg: DictConfig, out: Path) -> Path | None:
    """``ckpt_path``: None, a checkpoint file, or ``last``: the newest ``checkpoints/last.ckpt`` of an earlier run of
    this recipe (``<output_dir>/../*/checkpoints/last.ckpt``).

    Raises:
        FileNotFoundError: no such file, or no earlier run of this recipe left a ``last.ckpt``.
    """
    wanted = cfg.get("ckpt_path")
    if wanted is None:
        return None
    if str(wanted) == "last":
        found = sorted(out.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last: no earlier run of {cfg.name} left a checkpoint ({out.parent}/*/checkpoints/"
                "last.ckpt). Pass ckpt_path=/path/to/last.ckpt, or start without ckpt_path."
            )
        return found[-1]
    path = Path(str(wanted)).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(wanted)!r} does not exist; pass a last.ckpt an earlier QAT run wrote.")
    return path


_RUNS = {"ptq": _run_ptq, "qat": _run_qat, "float": _run_float, "calib": _run_calib, "test": _run_test}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one recipe in its ``mode`` and return its metrics (also written to ``<output_dir>/metrics.json``;
    ``mode=inspect`` writes ``<output_dir>/dpu_inspection.json`` instead).

    Example:
        >>> cfg = compose_config(["recipe=resnet20_ptq_cifar10", "paths.output_dir=/tmp/run"])
        >>> train(cfg)["int8_top1"]  # doctest: +SKIP
        80.2

    Raises:
        ValueError: unknown mode or export format, xmodel export for a non-DPU target, a required data path unset,
            ``paths.output_dir`` unresolvable outside a Hydra run, or a ``name`` holding ``/``, ``\\`` or ``..``.
        FileNotFoundError: ``mode=test`` without the state file (run ``mode=calib`` first), or missing data/weights.
        FileExistsError: ``mode=calib`` onto an existing state file without ``overwrite_state=true``.
        lightning_quant.models.WeightsUnavailableError: online-only weights while offline (names the offline recipe).
    """
    _check_config(cfg)
    out = _output_dir(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = _build_model(cfg)  # before the data: online-only weights fail fast here
    dm = _build_datamodule(cfg)
    if cfg.mode == "inspect":  # no Trainer, no calibration: the DPU's verdict on every op of the graph
        return inspect_model(cfg, model, dm, out)
    metrics: dict[str, Any] = {"name": cfg.name, "mode": cfg.mode, "target": cfg.quant.target, "seed": cfg.seed}
    start = time.perf_counter()
    run_metrics, callback = _RUNS[cfg.mode](cfg, model, dm, out)
    metrics.update(run_metrics)
    if rank_zero_only.rank != 0:  # DDP (torchrun/SLURM): one process writes the artefacts and reports
        return metrics
    report = None
    if callback is not None:
        if callback.target is not None:  # mode=test: the state file's target, which may not be the recipe's
            metrics["target"] = callback.target.value
        network = callback.network(model).cpu().eval()
        metrics["sizes"] = model_sizes(network)
        report = quantization_report(network, _first_val_inputs(dm))
        if cfg.deploy and cfg.mode != "calib":
            metrics["artefacts"] = export_artefacts(cfg, network, dm, out)
    metrics.update(
        # the batches calibration actually saw (the loader may hold fewer than quant.calibration_batches)
        calibration_batches=getattr(callback, "calibration_batches_used", None) or cfg.quant.calibration_batches,
        calibration_size=cfg.data.calibration_size,
        batch_size=cfg.data.batch_size,
        wall_seconds=round(time.perf_counter() - start, 1),
        output_dir=str(out),
    )
    from lightning_quant.export._atomic import atomic_path

    with atomic_path(out / "metrics.json") as tmp:  # never a half-written file, like the reports
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    metrics["reports"] = write_run_report(out, metrics, report)
    print(summary_table(metrics))
    return metrics


def _first_val_inputs(dm: Any) -> torch.Tensor:
    """Up to 32 images of the first validation batch: the input of the per-layer SQNR report."""
    return next(iter(dm.val_dataloader()))[0][:32]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    """Command-line entry point: ``lightning-quant recipe=<name> [overrides]`` (also ``python -m lightning_quant``
    and ``python train.py`` in a checkout). ``--help`` prints the app's page; the overrides are composed and checked
    first, so a typo fails with the key it most likely meant before Hydra starts a run.

    Example:
        >>> # lightning-quant recipe=resnet20_ptq_cifar10 deploy=true
    """
    args = sys.argv[1:]
    if any(a in ("--help", "-h") for a in args):
        print(help_page(RECIPES_DIR))
        return
    plain = not any(a.startswith(("-", "hydra.", "+hydra.", "~hydra.")) for a in args)
    if plain:  # no multirun sweep, Hydra flag or Hydra setting (Hydra checks those itself): check it first
        problem = _override_problem(args)
        if problem:
            sys.exit(f"lightning-quant: {problem}")
    _hydra_main()


def _override_problem(overrides: list[str]) -> str | None:
    """What is wrong with the command line's overrides, in the app's words; None when they compose and validate."""
    from hydra.errors import ConfigCompositionException

    try:
        compose_config(overrides)
    except ConfigCompositionException as err:
        base = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("recipe", "model", "data", "quant")]
        try:
            keys = config_keys(compose_config(base))
        except Exception:  # noqa: BLE001 - the base itself fails: Hydra's message says why
            keys = []
        return explain_override_error(str(err), keys)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return None
