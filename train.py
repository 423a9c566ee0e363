"""Run a recipe: ``python train.py recipe=resnet20_ptq_cifar10 [overrides]`` (docs/app.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from any directory without installing

from lightning_quant.app import main  # noqa: E402

if __name__ == "__main__":
    main()
