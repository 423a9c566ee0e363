"""The app's structured config: a typed schema in Hydra's ConfigStore, and the checks that run right after composition.

``configs/train.yaml`` starts from the ``train_schema`` node, so a misspelled key or a value of the wrong type in
``quant``, ``export`` or the top level fails while Hydra composes the config (``+key=value`` cannot add one either),
and :func:`validate_config` then checks what a type cannot say (allowed values, observer names, the keys a
``_target_`` takes) before any model is built or evaluated. The option and schedule fields are generated from
:class:`~lightning_quant.config.QuantOptions`, :class:`~lightning_quant.config.QATSchedule` and
:class:`~lightning_quant.config.QuantSpec`: they are declared once, in the library.

Example:
    >>> from lightning_quant.app import compose_config
    >>> compose_config(["quant.options.bias_corection=true"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hydra.errors.ConfigCompositionException: ...bias_corection...
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lightning_quant.callbacks.calibration_source import SOURCES
from lightning_quant.config import QATSchedule, QuantOptions, QuantSpec, Target, scheme_for_target

__all__ = [
    "EXPORT_FORMATS",
    "MODES",
    "TrainSchema",
    "config_keys",
    "explain_override_error",
    "register_schema",
    "validate_config",
]

MODES = ("ptq", "qat", "float", "calib", "test", "inspect")
EXPORT_FORMATS = ("onnx", "torchscript", "xmodel")
_PROGRESS_BARS = ("rich", "tqdm")
_PLAIN = {"bool": bool, "int": int, "float": float, "str": str}


def _field_type(annotation: str) -> Any:
    """A library dataclass annotation (a string, PEP 563) as a type OmegaConf validates: enums become ``str``
    (checked by the library with a message naming the allowed values), ``X | None`` becomes ``Optional[X]``."""
    text = annotation.replace(" ", "")
    optional = text.endswith("|None")
    base = _PLAIN.get(text.removesuffix("|None"), str)
    return Optional[base] if optional else base  # noqa: UP045 - OmegaConf reads typing.Optional


def _mirror(cls: type, name: str, *, prefix: str = "", all_optional: bool = False) -> type:
    """A mutable dataclass with ``cls``'s fields and defaults, for OmegaConf (the library keeps the declaration)."""
    fields = []
    for f in dataclasses.fields(cls):
        kind = _field_type(str(f.type))
        if all_optional:
            fields.append((prefix + f.name, Optional[kind], field(default=None)))  # noqa: UP045
        else:
            fields.append((f.name, kind, field(default=f.default)))
    return dataclasses.make_dataclass(name, fields)


OptionsSchema = _mirror(QuantOptions, "OptionsSchema")
QATScheduleSchema = _mirror(QATSchedule, "QATScheduleSchema")
SchemeSchema = dataclasses.make_dataclass(
    "SchemeSchema",
    [
        (f.name, f.type, field(default=None))
        for prefix in ("weight_", "activation_")
        for f in dataclasses.fields(_mirror(QuantSpec, "_Spec", prefix=prefix, all_optional=True))
    ],
)


@dataclass
class AccuracyControlSchema:
    max_accuracy_drop: Optional[float] = None  # noqa: UP045
    tuning_size: int = 512
    fallback_weight_bits: Optional[int] = None  # noqa: UP045


@dataclass
class QuantSchema:
    target: str = "x86"
    calibration_batches: int = 16
    calibration_source: str = "auto"
    exclude: list[str] = field(default_factory=list)
    layer_weight_bits: Optional[dict[str, int]] = None  # noqa: UP045
    report: bool = True
    progress: bool = True
    qat_schedule: QATScheduleSchema = field(default_factory=QATScheduleSchema)  # type: ignore[valid-type]
    options: OptionsSchema = field(default_factory=OptionsSchema)  # type: ignore[valid-type]
    accuracy_control: AccuracyControlSchema = field(default_factory=AccuracyControlSchema)
    scheme: SchemeSchema = field(default_factory=SchemeSchema)  # type: ignore[valid-type]


@dataclass
class ExportSchema:
    formats: list[str] = field(default_factory=lambda: ["onnx", "torchscript"])
    verify: bool = True
    min_top1_agreement: float = 0.99
    verify_batches: int = 8
    opset: int = 18


@dataclass
class TrainSchema:
    name: str = "default"
    mode: str = "ptq"
    deploy: bool = False
    deploy_check: bool = False  # after the XModel export: per-layer dump of both sides, fail on a difference
    seed: int = 0
    progress_bar: str = "rich"
    state_file: str = "${paths.state_dir}/${name}.ckpt"
    overwrite_state: bool = False
    ckpt_path: Optional[str] = None  # noqa: UP045
    quant: QuantSchema = field(default_factory=QuantSchema)
    export: ExportSchema = field(default_factory=ExportSchema)
    # groups whose keys depend on the chosen ``_target_``: validate_config checks them against its signature
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    paths: Any = None


def register_schema() -> None:
    """Store the schema as ``train_schema`` (configs/train.yaml's first default). Idempotent."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


def validate_config(cfg: DictConfig) -> None:
    """What a type cannot check, before anything is built: allowed values, observer names and option combinations
    (through the library's own constructors), and the keys of every ``_target_`` node against its signature.

    Raises:
        ValueError: the first problem found, naming the key, the allowed values and the fix.
    """
    _check_schema_keys(cfg, TrainSchema, "")
    _check_name(cfg.name)
    _one_of("mode", cfg.mode, MODES, "(Vitis AI --quant_mode float|calib|test is mode=float|calib|test)")
    _one_of("progress_bar", cfg.get("progress_bar", "rich"), _PROGRESS_BARS)
    _one_of("quant.target", cfg.quant.target, [t.value for t in Target])
    _one_of("quant.calibration_source", cfg.quant.calibration_source, SOURCES)
    unknown = [f for f in cfg.export.formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"export.formats has {unknown}; use a list of {', '.join(EXPORT_FORMATS)}.")
    _check_deploy_check(cfg)
    overrides = {k: v for k, v in (cfg.quant.get("scheme") or {}).items() if v is not None}
    try:
        scheme_for_target(cfg.quant.target, "qat" if cfg.mode == "qat" else "ptq", **overrides)
        QuantOptions.from_dict(OmegaConf.to_container(cfg.quant.options, resolve=True))  # type: ignore[arg-type]
        QATSchedule(**OmegaConf.to_container(cfg.quant.qat_schedule, resolve=True))  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"quant: {err}") from None
    for key in ("model", "data", "trainer", "logger"):
        node = cfg.get(key)
        if isinstance(node, DictConfig):
            _check_target_keys(key, node, ignore={"calibration_dir"} if key == "data" else set())


def _check_schema_keys(node: DictConfig, schema: type, path: str) -> None:
    """Keys the schema does not declare (``+key=value`` adds them past Hydra's own check) are errors too."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            dotted = f"{path}{key}"
            near = _suggest(dotted, _schema_keys(TrainSchema))
            hint = f" (did you mean {near}?)" if near else ""
            raise ValueError(
                f"{dotted} is not a setting{hint}: nothing would read it. `lightning-quant --cfg job` prints every key."
            )
        kind = fields[key].type
        if isinstance(kind, str):
            kind = typing.get_type_hints(schema).get(key)
        child = node._get_node(key)
        if dataclasses.is_dataclass(kind) and isinstance(child, DictConfig):
            _check_schema_keys(child, kind, f"{path}{key}.")


def _schema_keys(schema: type, path: str = "") -> list[str]:
    keys = []
    for name, kind in typing.get_type_hints(schema).items():
        keys.append(f"{path}{name}")
        if dataclasses.is_dataclass(kind):
            keys += _schema_keys(kind, f"{path}{name}.")
    return keys


def _suggest(key: str, keys: typing.Sequence[str]) -> str | None:
    """The real key a misspelled or misplaced one most likely means: one with the same last part (a key from an
    older layout, e.g. ``quant.bias_correction`` -> ``quant.options.bias_correction``), else the closest spelling."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
    if same_leaf:
        return same_leaf[0]
    near = difflib.get_close_matches(key, list(keys), n=1)
    return near[0] if near else None


def explain_override_error(message: str, known_keys: typing.Iterable[str]) -> str:
    """Hydra's "Could not override 'a.b'. To append to your config use +a.b=..." for a misspelled key, rewritten:
    the closest real key, and why ``+`` is not the fix.

    Example:
        >>> explain_override_error("Could not override 'quant.bias_correction'.", ["quant.options.bias_correction"])
        ... # doctest: +ELLIPSIS
        "quant.bias_correction is not a setting (did you mean quant.options.bias_correction?); adding it with '+'..."
    """
    if not message.startswith("Could not override '"):
        return message
    key = message.split("'")[1]
    near = _suggest(key, list(known_keys))
    hint = f" (did you mean {near}?)" if near else ""
    return (
        f"{key} is not a setting{hint}; adding it with '+' would not be used either. `lightning-quant --cfg job` "
        "prints every key."
    )


def config_keys(cfg: DictConfig, path: str = "") -> list[str]:
    """Every dotted key of ``cfg`` (nothing is resolved)."""
    keys = []
    for key in cfg:
        child = cfg._get_node(key)
        keys.append(f"{path}{key}")
        if isinstance(child, DictConfig):
            keys += config_keys(child, f"{path}{key}.")
    return keys


def _check_name(name: Any) -> None:
    """``name`` becomes a file and folder name (``<state_dir>/<name>.ckpt``, ``outputs/<name>/``): no path in it."""
    text = str(name)
    if not text or ".." in text or any(sep in text for sep in ("/", "\\", "\0")):
        raise ValueError(
            f"name={text!r} must be a plain run name (no '/', '\\' or '..'): it names the state file and the output "
            "folder, so it cannot point outside them. Use e.g. name=resnet20_ptq_v2; to write elsewhere set "
            "paths.state_dir=/some/folder or state_file=/path/to/state.ckpt."
        )


def _check_deploy_check(cfg: DictConfig) -> None:
    """``deploy_check=true`` compares the exported XModel with the fake-quant model: the run must export one."""
    if not cfg.get("deploy_check", False):
        return
    formats = list(cfg.export.formats)
    if cfg.mode not in ("ptq", "qat", "test"):
        why = f"mode={cfg.mode} exports nothing"
    elif not cfg.deploy:
        why = "deploy=false: nothing is exported"
    elif "xmodel" not in formats:
        why = f"export.formats={formats} has no xmodel"
    elif cfg.quant.target != "dpu":
        why = f"quant.target={cfg.quant.target}: XModels hold the DPU scheme only"
    else:
        return
    raise ValueError(
        f"deploy_check=true compares the exported XModel with the fake-quant model layer by layer, but this run "
        f"writes no XModel ({why}). Add deploy=true with xmodel in export.formats and target=dpu (quant=dpu, or a "
        "*_dpu recipe, e.g. recipe=resnet20_ptq_cifar10_dpu deploy=true deploy_check=true), or drop deploy_check."
    )


def _one_of(key: str, value: Any, allowed: typing.Sequence[str], extra: str = "") -> None:
    if value not in allowed:
        near = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {key}={near[0]}?)" if near else ""
        raise ValueError(f"{key}={value!r} is not allowed{hint}; use one of {', '.join(allowed)} {extra}".rstrip())


def _check_target_keys(path: str, node: DictConfig, ignore: set[str]) -> None:
    """Every key of a node with ``_target_`` must be a parameter of the target (unless it takes ``**kwargs``)."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return
    params = _parameters(target)
    if params is not None:
        for key in node:
            if str(key).startswith("_") or key in ignore:
                continue
            if key not in params:
                near = difflib.get_close_matches(str(key), sorted(params), n=1)
                hint = f" (did you mean {path}.{near[0]}?)" if near else ""
                raise ValueError(
                    f"{path}.{key} is not a parameter of {target}{hint}; it takes {', '.join(sorted(params))}."
                )
    for key in node:
        child = node._get_node(key)  # the node itself: no interpolation is resolved (paths need a Hydra run)
        if isinstance(child, DictConfig):
            _check_target_keys(f"{path}.{key}", child, set())


def _parameters(target: str) -> set[str] | None:
    """The keyword parameters of ``target`` (a dotted path), following ``**kwargs`` up a class's bases; None when
    they stay open or the target cannot be found (instantiation reports a missing target itself)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - an unimportable target is reported by instantiate, with Hydra's message
        return None
    if isinstance(obj, type):
        callables = [(k.__dict__["__init__"], k.__module__) for k in obj.__mro__ if "__init__" in k.__dict__]
    else:
        callables = [(obj, getattr(obj, "__module__", ""))]
    names: set[str] = set()
    for func, module in callables:
        try:
            params = list(inspect.signature(func).parameters.values())
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
        if not str(module).startswith("lightning_quant."):  # only this project's **kwargs are known to go up
            return None
    return None
