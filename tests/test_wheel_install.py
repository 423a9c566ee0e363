"""The product as users install it: build the wheel, install it into a fresh virtual environment (reusing this
environment's packages for torch and the other dependencies), and run ``lightning-quant`` from an empty directory:
``--help`` and a tiny recipe run on small generated data, without this repository on the path."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin`` folder of a fresh venv holding only the built wheel (its dependencies come from this venv)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if build.returncode != 0 and "No matching distribution" in build.stderr + build.stdout:
        pytest.skip(f"the build backend cannot be fetched here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("lightning_quant-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_quant/configs/train.yaml" in names
    assert sum(n.startswith("lightning_quant/recipes/recipe/") and n.endswith(".yaml") for n in names) >= 10
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    new_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # torch & co. from this environment (appended after the venv's own site-packages, so the wheel wins)
    Path(new_site, "_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir / "bin"


def _cifar_like(root: Path) -> Path:
    for split in ("train", "test"):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (25 * c, 40 * i, 90)).save(folder / f"{i}.png")
    return root


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIGHTNING_QUANT_RECIPES")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["lightning-quant", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_app_runs_from_an_empty_directory(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run(
        [str(installed / "python"), "-c", "import lightning_quant; print(lightning_quant.__file__)"],
        cwd=empty, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(REPO) not in where  # the installed package, not this checkout

    help_page = _run(installed, "--help", cwd=empty)
    assert help_page.returncode == 0, help_page.stderr
    assert "resnet20_ptq_cifar10" in help_page.stdout

    data = _cifar_like(tmp_path / "cifar")
    run = _run(
        installed, "recipe=resnet20_ptq_cifar10", f"data.root={data}", "model.model.pretrained=false",
        "data.batch_size=10", "data.calibration_size=10", "data.num_workers=0", "quant.calibration_batches=1",
        "trainer.enable_progress_bar=false", "quant.progress=false", "logger=none", cwd=empty,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = list((empty / "outputs" / "resnet20_ptq_cifar10").glob("*/metrics.json"))
    assert len(metrics) == 1 and (metrics[0].parent / "lightning-quant.log").is_file()
