"""The Hydra app behind ``lightning-quant recipe=<name>`` / ``python train.py recipe=<name>``: the only package of
lightning_quant that imports Hydra.

One module per step of a run: :mod:`~lightning_quant.app.main` (composition, modes, the entry point),
:mod:`~lightning_quant.app.accuracy_control_step` (float layers chosen before calibration),
:mod:`~lightning_quant.app.export_step` (the deploy step) and :mod:`~lightning_quant.app.report_step`
(``report.json`` / ``report.md`` / ``sqnr.png``).

Example:
    >>> from lightning_quant.app import compose_config
    >>> compose_config(["recipe=resnet20_ptq_cifar10"]).quant.target
    'x86'
"""

try:
    import hydra  # noqa: F401 - the app's one optional dependency group: fail with the install line, not a traceback
except ModuleNotFoundError as err:  # pragma: no cover - the test environment has the [app] extra
    raise ModuleNotFoundError(
        "the lightning-quant app needs Hydra and the vision packages: pip install 'lightning-quant[app]' (the library "
        "itself, QuantCallback / quantize / the exporters, works without them)."
    ) from err

from lightning_quant.app.main import CONFIG_DIR, MODES, RECIPES_DIR, compose_config, main, summary_table, train  # noqa: E402

__all__ = ["CONFIG_DIR", "MODES", "RECIPES_DIR", "compose_config", "main", "summary_table", "train"]
