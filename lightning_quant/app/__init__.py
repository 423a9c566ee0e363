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

from lightning_quant.app.main import CONFIG_DIR, MODES, RECIPES_DIR, compose_config, main, summary_table, train

__all__ = ["CONFIG_DIR", "MODES", "RECIPES_DIR", "compose_config", "main", "summary_table", "train"]
