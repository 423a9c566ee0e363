"""Shared helpers for the Hydra app tests: tiny overrides that keep every run to seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_quant.app import compose_config
from lightning_quant.paths import shared_dir

needs_shared = pytest.mark.skipif(
    shared_dir() is None,
    reason="needs the shared data/weights folder (../shared or LIGHTNING_QUANT_SHARED); not found",
)

FAST = [
    "data.num_workers=0",
    "quant.progress=false",
    "quant.report=false",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


def tiny_config(recipe: str, tmp_path: Path, *overrides: str, batch_size: int = 16, val_batches: int = 2):
    """Compose ``recipe`` with small data, outputs in ``tmp_path``."""
    return compose_config(
        [
            f"recipe={recipe}",
            *FAST,
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.state_dir={tmp_path / 'state'}",
            f"data.batch_size={batch_size}",
            f"data.calibration_size={batch_size}",
            "quant.calibration_batches=1",
            f"trainer.limit_val_batches={val_batches}",
            f"trainer.limit_test_batches={val_batches}",
            *overrides,
        ]
    )
